"""Two Ray nodes on this machine, as a cluster of two machines would run: a training stage whose
two workers sit on different nodes and share one `storage_path`, and a captioning job whose
captioner actors are spread over both nodes.

The head (`ray start --head --block`) and the second node are separate process groups on
127.0.0.1, each with its own CPUs and a custom resource naming it. The driver runs in a
subprocess (as `ray job submit` would run it), so this test never joins or disturbs the
session's own test cluster. Both nodes are stopped by signalling their own process groups (never
`ray stop`, which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, wait_for_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CPUS_PER_NODE = 3
# Two minutes on an idle 2-core machine; much more when other work shares its cores.
DRIVER_TIMEOUT = 480


# The second node, started as `ray start --address=HEAD --block` starts one (the same
# `ray._private.node.Node` call), but left on 127.0.0.1: the `ray start` command refuses to add a
# node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with it set to 1 Ray swaps 127.0.0.1 for
# the machine's own address and its servers listen on every interface.
SECOND_NODE = """
import json, signal, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams

node = Node(RayParams(**json.loads(sys.argv[1])), head=False, shutdown_at_exit=True,
            spawn_reaper=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit runs Node's shutdown hook
while True:
    time.sleep(1)
"""


class RayNode:
    """One Ray node in its own process group: the head (`ray start --head --block`) when
    `head_address` is None, else a node joining that head."""

    def __init__(self, temp_dir: str, resources: dict, head_address: str | None = None) -> None:
        bin_dir = os.path.dirname(sys.executable)
        self.env = dict(
            os.environ,
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
            RAY_AUTH_MODE="disabled",  # loopback only, for the length of one test
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every node and server on 127.0.0.1
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM
        )
        # Every port is chosen here: two nodes on one machine (and other Ray instances on it)
        # must not meet on Ray's fixed defaults.
        ports = {
            name: free_port()
            for name in ("node_manager_port", "object_manager_port", "dashboard_agent_listen_port",
                         "dashboard_agent_grpc_port", "runtime_env_agent_port",
                         "metrics_export_port")
        }  # fmt: skip
        if head_address is None:
            self.port, self.dashboard_port = free_port(), free_port()
            command = [
                os.path.join(bin_dir, "ray"), "start", "--head", "--block",
                "--node-ip-address=127.0.0.1", f"--port={self.port}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                "--include-dashboard=true", f"--num-cpus={CPUS_PER_NODE}", "--num-gpus=0",
                f"--resources={json.dumps(resources)}", "--object-store-memory=300000000",
                "--disable-usage-stats", f"--temp-dir={temp_dir}",
                *(f"--{name.replace('_', '-')}={port}" for name, port in ports.items()),
            ]  # fmt: skip
        else:
            ports["metrics_agent_port"] = ports.pop("dashboard_agent_grpc_port")  # RayParams' name
            params = {
                "gcs_address": head_address, "node_ip_address": "127.0.0.1",
                "num_cpus": CPUS_PER_NODE, "num_gpus": 0, "resources": resources,
                "object_store_memory": 300_000_000, "temp_dir": temp_dir,
                "min_worker_port": 0, "max_worker_port": 0, **ports,
            }  # fmt: skip
            command = [sys.executable, "-c", SECOND_NODE, json.dumps(params)]
        self.proc = subprocess.Popen(
            command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped without `ray stop`
        )  # fmt: skip
        if head_address is None:
            wait_for_port(self.port, self.proc, timeout=120)
            wait_for_port(self.dashboard_port, self.proc, timeout=120)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM to the node's process group, then SIGKILL to whatever of it is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass


def stop_leftovers(temp_dir: str, grace: float = 15) -> list[int]:
    """Ray's worker processes run in sessions of their own and exit when their raylet is gone;
    SIGKILL any still running after `grace` seconds. Only this test's processes name its
    temp_dir on their command line."""
    import psutil

    def ours() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
                found.append(proc)
        return found

    deadline = time.monotonic() + grace
    while ours() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = ours()
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in left]


@pytest.fixture(scope="module")
def two_nodes():
    # Ray's socket paths must stay short: a pytest tmp_path is too long for AF_UNIX.
    temp_dir = tempfile.mkdtemp(prefix="ray2n", dir="/tmp")
    head = RayNode(temp_dir, {"head": 1})
    second = None
    try:
        second = RayNode(temp_dir, {"node2": 1}, head_address=head.address)
        yield head
    finally:
        for node in (second, head):
            if node is not None:
                node.stop()
        stop_leftovers(temp_dir)


# --------------------------------------------------------------------------------------------
# The driver: runs in its own process, connected to the two-node cluster.
# --------------------------------------------------------------------------------------------


def drive(address: str, work: str) -> None:
    """Train a tiny stage with its workers spread over both nodes, then caption images with
    one captioner per node; write what Ray's state says about where each actor ran."""
    import ray
    import ray.data
    from ray.util.state import list_actors

    from osprey.infer.job import CaptionJobConfig, ResourceConfig, run_caption_job
    from osprey.train.config import StageConfig
    from osprey.train.runner import RunOptions, run_stage

    work = Path(work)
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    nodes = _wait_for_nodes(2)
    result = {"nodes": nodes}

    stage = StageConfig(
        name="stage1", preset="tiny", trains=["projector"], data=[str(work / "shapes" / "train")],
        tasks=["caption"], init=str(work / "model"), lr=1e-3, global_batch_size=4,
        micro_batch_size=2, epochs=1, max_steps=2, max_length=512, zero_stage=2,
        checkpoint_every=2,  # one checkpoint, at the end
    )  # fmt: skip
    options = RunOptions(
        output_dir=str(work / "run"), pipeline="multinode", num_workers=2, max_failures=0,
        placement_strategy="STRICT_SPREAD",
    )  # fmt: skip
    began = time.monotonic()
    trained = run_stage(stage, options)
    result["train"] = {**trained.__dict__, "seconds": time.monotonic() - began}
    result["train_workers"] = [
        a.node_id
        for a in list_actors(
            address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=100
        )
    ]

    # Each pool starts only once all its actors are up: with one captioner up early and the
    # other still importing, a job this small could finish on one node.
    ray.data.DataContext.get_current().wait_for_min_actors_s = 120
    began = time.monotonic()
    config = CaptionJobConfig(
        source=str(work / "images"), out=str(work / "captions"), model=str(work / "model"),
        category_tokens=3, short_tokens=3, images_per_file=2,
        # Two CPUs per captioner on 3-CPU nodes: no node can hold both, so one runs on each.
        resources=ResourceConfig(
            segmenters=2, segmenter_cpus=0.5, captioners=2, captioner_cpus=2, segment_batch=2,
            caption_batch=2,
        ),
    )  # fmt: skip
    summary = run_caption_job(config)
    result["caption"] = {**summary.__dict__, "seconds": time.monotonic() - began}
    result["actors"] = [
        {"class_name": a.class_name, "state": a.state, "node_id": a.node_id}
        for a in list_actors(address=address, limit=1000)
    ]
    (work / "result.json").write_text(json.dumps(result, indent=2))


def _wait_for_nodes(count: int, timeout: float = 60) -> dict[str, str]:
    """{custom resource naming the node: node id} once `count` nodes are alive."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= count:
            return {
                name: n["NodeID"]
                for n in alive
                for name in ("head", "node2")
                if name in n["Resources"]
            }
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(alive)} of {count} Ray nodes alive after {timeout} s")
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    from osprey.data.shapes import ShapesConfig, render_sample

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = render_sample(rng, ShapesConfig(image_size=96, max_shapes=3))
        Image.fromarray(scene.image).save(folder / f"img{i:03d}.png")
    return folder


def expected_regions(folder: Path) -> set[tuple[str, int, bytes]]:
    from osprey.data.images import decode_image
    from osprey.infer.segment import ClassicalSegmenter

    segmenter = ClassicalSegmenter()
    rows = set()
    for path in sorted(folder.iterdir()):
        image = np.asarray(decode_image(path.read_bytes()))
        for i, region in enumerate(segmenter.segment(image)):
            rows.add((str(path), i, region.counts))
    return rows


@pytest.fixture(scope="module")
def driven(two_nodes, tmp_path_factory):
    from osprey.data.shapes import write_shapes_dataset
    from osprey.infer.tiny import write_tiny_model

    work = tmp_path_factory.mktemp("multinode")
    write_tiny_model(work / "model")
    write_shapes_dataset(work / "shapes", n=16, seed=3, val_fraction=0.0, progress=False)
    write_images(work / "images", 6)
    command = [
        sys.executable, "-c", "import sys, test_multinode; test_multinode.drive(*sys.argv[1:])",
        two_nodes.address, str(work),
    ]  # fmt: skip
    env = dict(two_nodes.env, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    began = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=DRIVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(
            f"driver still running after {DRIVER_TIMEOUT} s:\n{output[-4000:]}"
        ) from None
    (work / "driver.log").write_text(output)
    assert proc.returncode == 0, output[-4000:]
    result = json.loads((work / "result.json").read_text())
    result["driver_seconds"] = time.monotonic() - began
    print(json.dumps({k: result[k] for k in ("driver_seconds", "train", "caption")}, default=str))
    return work, result


def test_training_workers_run_on_both_nodes_and_share_storage(driven):
    import osprey

    work, result = driven
    nodes = result["nodes"]
    assert set(nodes) == {"head", "node2"} and nodes["head"] != nodes["node2"]
    assert sorted(result["train_workers"]) == sorted(nodes.values()), "one worker on each node"
    train = result["train"]
    assert train["steps"] == 2
    # The checkpoint in the shared storage_path holds both ranks' ZeRO shards: the node-2
    # worker's shard reached it too.
    checkpoint = Path(train["checkpoint"])
    assert checkpoint.is_relative_to(work / "run" / "ray")
    shards = sorted(p.name for p in checkpoint.rglob("*optim_states.pt"))
    assert len(shards) == 2 and any("rank_0" in s for s in shards), shards
    assert any("rank_1" in s for s in shards), shards
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == 2
    model = osprey.load_model(train["model_dir"])
    assert model.config.llm.hidden_size == osprey.get_config("tiny").llm.hidden_size
    # Rank 0, on whichever node, logged both steps into the run's MLflow store on shared storage.
    from mlflow.tracking import MlflowClient

    from osprey.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(work / "run"))
    assert client.get_run(train["run_id"]).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(train["run_id"], "loss")] == [1, 2]


def test_caption_actors_run_on_both_nodes_with_exact_rows(driven):
    import pandas as pd

    work, result = driven
    nodes = set(result["nodes"].values())
    captioners = [a for a in result["actors"] if a["class_name"].endswith("(CaptionStage))")]
    assert len(captioners) == 2, result["actors"]
    assert {a["node_id"] for a in captioners} == nodes, "one captioner on each node"
    summary = result["caption"]
    assert summary["images"] == 6 and summary["errors"] == 0
    frame = pd.read_parquet(work / "captions")
    rows = [(r.image_path, int(r.mask_index), r.mask["counts"]) for r in frame.itertuples()]
    assert len(rows) == len(set(rows)) == summary["masks"]
    assert set(rows) == expected_regions(work / "images")
    assert frame.category.notna().all() and frame.short_caption.notna().all()
