"""Two Ray nodes on this machine, as a cluster of two machines would run: a training stage whose
two workers sit on different nodes and share one `storage_path`, and a captioning job whose
captioner actors are spread over both nodes.

The head and the second node are separate `ray start --block` processes on 127.0.0.1, each with
its own CPUs and a custom resource naming it. The driver runs in a subprocess (as `ray job submit`
would run it), so this test never joins or disturbs the session's own test cluster.
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


class RayNode:
    """One `ray start --block` process group: the head (`address=None`) or a node joining it."""

    def __init__(self, temp_dir: str, resources: dict, address: str | None = None) -> None:
        bin_dir = os.path.dirname(sys.executable)
        self.env = dict(
            os.environ,
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
            RAY_AUTH_MODE="disabled",  # loopback only, for the length of one test
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        )
        # Every port of this node is chosen here: two nodes on one machine (and other Ray
        # instances on it) must not meet on Ray's fixed defaults.
        ports = {
            "node-manager-port": free_port(),
            "object-manager-port": free_port(),
            "dashboard-agent-listen-port": free_port(),
            "dashboard-agent-grpc-port": free_port(),
            "runtime-env-agent-port": free_port(),
            "metrics-export-port": free_port(),
        }
        command = [
            os.path.join(bin_dir, "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
            f"--num-cpus={CPUS_PER_NODE}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
            "--object-store-memory=300000000", "--disable-usage-stats", f"--temp-dir={temp_dir}",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]  # fmt: skip
        if address is None:
            self.port, self.dashboard_port = free_port(), free_port()
            command += [
                "--head", f"--port={self.port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
            ]  # fmt: skip
        else:
            command.append(f"--address={address}")
        self.proc = subprocess.Popen(
            command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped without `ray stop`
        )  # fmt: skip
        if address is None:
            wait_for_port(self.port, self.proc)
            wait_for_port(self.dashboard_port, self.proc)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass


@pytest.fixture(scope="module")
def two_nodes():
    # Ray's socket paths must stay short: a pytest tmp_path is too long for AF_UNIX.
    temp_dir = tempfile.mkdtemp(prefix="ray2n", dir="/tmp")
    head = RayNode(temp_dir, {"head": 1})
    second = None
    try:
        second = RayNode(temp_dir, {"node2": 1}, address=head.address)
        yield head
    finally:
        for node in (second, head):
            if node is not None:
                node.stop()


# --------------------------------------------------------------------------------------------
# The driver: runs in its own process, connected to the two-node cluster.
# --------------------------------------------------------------------------------------------


def drive(address: str, work: str) -> None:
    """Train a tiny stage with its workers spread over both nodes, then caption images with
    one captioner per node; write what Ray's state says about where each actor ran."""
    import ray
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
        checkpoint_every=1,
    )  # fmt: skip
    options = RunOptions(
        output_dir=str(work / "run"), pipeline="multinode", num_workers=2, max_failures=0,
        placement_strategy="STRICT_SPREAD",
    )  # fmt: skip
    began = time.monotonic()
    trained = run_stage(stage, options)
    result["train"] = {**trained.__dict__, "seconds": time.monotonic() - began}
    result["train_workers"] = [
        a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=100)
    ]

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
        {"class_name": a.class_name, "repr_name": a.repr_name, "node_id": a.node_id}
        for a in list_actors(detail=True, limit=1000)
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
                name: n["NodeID"] for n in alive for name in ("head", "node2") if name in n["Resources"]
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
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"driver still running after 300 s:\n{output[-4000:]}") from None
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


def test_caption_actors_run_on_both_nodes_with_exact_rows(driven):
    import pandas as pd

    work, result = driven
    nodes = set(result["nodes"].values())
    captioners = [a for a in result["actors"] if "CaptionStage" in (a["repr_name"] or "")]
    assert len(captioners) == 2, result["actors"]
    assert {a["node_id"] for a in captioners} == nodes, "one captioner on each node"
    summary = result["caption"]
    assert summary["images"] == 6 and summary["errors"] == 0
    frame = pd.read_parquet(work / "captions")
    rows = [(r.image_path, int(r.mask_index), r.mask["counts"]) for r in frame.itertuples()]
    assert len(rows) == len(set(rows)) == summary["masks"]
    assert set(rows) == expected_regions(work / "images")
    assert frame.category.notna().all() and frame.short_caption.notna().all()
