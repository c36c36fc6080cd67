"""docs/finetune.md, run as written: COCO-format annotations -> shards -> LoRA fine-tuning on Ray
Train + DeepSpeed (one training worker killed mid-way) -> caption with the adapter -> merged
export -> the registered adapter served. Then what the run must have achieved."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import free_port
from PIL import Image
from pycocotools import mask as mask_utils

import osprey

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "finetune.md"
TRAIN_IMAGES, VAL_IMAGES = 96, 24
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def doc_blocks() -> list[str]:
    """The page's ```bash blocks, in order; the first holds the settings."""
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)


def write_coco(folder: Path, n: int, seed: int) -> None:
    """`folder/images/*.png` and `folder/annotations.json` (COCO instances, compressed RLE):
    synthetic shapes whose category names are "<colour> <shape>"."""
    from osprey.data.shapes import COLOURS, SHAPES, ShapesConfig, render_sample

    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    ids = {name: i + 1 for i, name in enumerate(names)}
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for k in range(n):
        scene = render_sample(rng, ShapesConfig(image_size=128))
        file_name = f"{k:05d}.png"
        Image.fromarray(scene.image).save(folder / "images" / file_name)
        h, w = scene.image.shape[:2]
        images.append({"id": k + 1, "file_name": file_name, "height": h, "width": w})
        for mask, label in zip(scene.masks, scene.labels, strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": k + 1, "iscrowd": 0,
                "category_id": ids[label.category], "area": int(mask.sum()),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
            })  # fmt: skip
    categories = [{"id": i, "name": name} for name, i in ids.items()]
    (folder / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


def kill_one_train_worker(root, timeout: float = 600) -> int:
    """SIGKILL a Ray Train worker of this run (a process of its own cluster), never another's."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [
            p for p in root.children(recursive=True) if "RayTrainWorker" in " ".join(_cmdline(p))
        ]
        if workers:
            workers[0].kill()
            return workers[0].pid
        time.sleep(1)
    raise AssertionError("no training worker of the run to kill")


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except Exception:
        return []


def wait_for(predicate, timeout: float, what: str, process=None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(
                f"the command ended (rc {process.returncode}) before {what}\n{tail}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster():
    """A cluster of its own for the page's commands (they join it through RAY_ADDRESS): the
    session's one may hold Serve replicas' CPUs, and a Ray each command starts itself timed out
    waiting for its raylet on a busy machine."""
    import tempfile

    from conftest import RayCluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = RayCluster(tempfile.mkdtemp(prefix="ray", dir="/tmp"), num_cpus=6)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def documented_run(tmp_path_factory, cluster):
    import psutil

    from osprey.infer.tiny import write_tiny_model

    work = tmp_path_factory.mktemp("finetune-doc")
    write_coco(work / "my_data", TRAIN_IMAGES, seed=11)
    write_coco(work / "held_out", VAL_IMAGES, seed=12)
    base = write_tiny_model(work / "base")
    port = free_port()
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    env.update(
        MODEL=str(base), PRESET="tiny", DATA="my_data", PORT=str(port),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        PATH=os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
    )  # fmt: skip
    blocks = doc_blocks()
    assert "export MODEL=" in blocks[0]
    logs: dict[str, str] = {}
    served = None
    for i, block in enumerate(blocks[1:], start=1):
        log = work / f"block{i}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                ["bash", "-ec", block], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            if "osprey finetune" in block:
                # Mid-way: after the first checkpoint, one training worker dies.
                ckpt = lambda: any((work / "work" / "ft" / "ray").glob("**/checkpoint_*"))  # noqa: E731
                wait_for(ckpt, 900, "the first checkpoint", proc, log)
                logs["killed"] = str(kill_one_train_worker(psutil.Process(cluster.proc.pid)))
            if "osprey serve" in block:
                try:
                    wait_for(lambda: _ready(port), 600, "the server", proc, log)
                    served = describe(port)
                finally:
                    os.killpg(proc.pid, signal.SIGINT)
                    proc.wait(timeout=120)
                continue
            rc = proc.wait(timeout=1200)
        logs[block.strip()] = log.read_text()
        assert rc == 0, f"{block}\n{logs[block.strip()][-4000:]}"
    return work, base, logs, served


def _ready(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def held_out_regions(n: int = 4):
    from osprey.data.shapes import ShapesConfig, render_sample

    scene = render_sample(np.random.default_rng(99), ShapesConfig(image_size=128))
    regions = []
    for mask in scene.masks[:n]:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        regions.append({"size": list(rle["size"]), "counts": rle["counts"].decode()})
    return scene, regions


def describe(port: int) -> list[dict]:
    import base64
    import io

    scene, regions = held_out_regions()
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="PNG")
    body = {
        "image": base64.b64encode(buffer.getvalue()).decode(),
        "regions": [{"rle": r} for r in regions],
        "tasks": ["category"],
        "max_new_tokens": 6,
    }
    response = requests.post(f"http://127.0.0.1:{port}/v1/describe", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["answers"]


def finetune_log(logs: dict[str, str]) -> str:
    return next(text for block, text in logs.items() if "osprey finetune" in block)


def test_a_killed_worker_resumes_from_the_checkpoint_and_the_run_completes(documented_run):
    work, _, logs, _ = documented_run
    text = finetune_log(logs)
    assert logs["killed"]
    resumed = [int(s) for s in re.findall(r"resumed finetune-lora at step (\d+)", text)]
    assert resumed and resumed[0] >= 1, text[-3000:]
    result, _ = json.JSONDecoder().raw_decode(text[text.rindex('{\n  "stage"') :])
    assert result["adapter"] and result["stage"] == "finetune-lora"
    assert result["steps"] > resumed[0]


def test_loss_falls_and_the_adapter_is_small_and_registered(documented_run):
    from mlflow.tracking import MlflowClient

    work, base, _, _ = documented_run
    client = MlflowClient(f"sqlite:///{work / 'work' / 'ft' / 'mlflow.db'}")
    version = client.get_model_version_by_alias("my-osprey", "finetune-lora")
    assert version.tags["osprey.kind"] == "adapter"
    history = sorted(client.get_metric_history(version.run_id, "loss"), key=lambda m: m.step)
    losses = [m.value for m in history]
    assert len(losses) >= 8
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    adapter = work / "work" / "ft" / "finetune-lora" / "adapter"
    weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert (adapter / "adapter_model.safetensors").stat().st_size < weights / 10


def held_out_token_accuracy(model, model_dir: Path, shards: Path) -> float:
    """Teacher-forced next-token accuracy on the answer tokens of held-out category questions,
    the batches built by the training pipeline's own example code."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from osprey.data.examples import ExampleConfig
    from osprey.data.pipeline import collate, map_examples

    table = pa.concat_tables([pq.read_table(p) for p in sorted(shards.glob("*.parquet"))])
    batch = collate(map_examples(table, str(model_dir), ExampleConfig(vision=model.config.vision)))
    model.eval()
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, batch.images, batch.masks, batch.labels)
    predicted = out.logits[:, :-1].argmax(-1)
    target = out.labels[:, 1:]
    answer = target != -100
    return float((predicted[answer] == target[answer]).float().mean())


def test_held_out_accuracy_rises_above_the_starting_models(documented_run):
    from osprey.cli import main as osprey_main

    work, base, _, _ = documented_run
    shards = work / "held_out_shards"
    assert osprey_main(["prepare", "coco", "--annotations", str(work / "held_out" / "annotations.json"),
                        "--images", str(work / "held_out" / "images"), "--out", str(shards)]) == 0  # fmt: skip
    adapter = work / "work" / "ft" / "finetune-lora" / "adapter"
    before = held_out_token_accuracy(osprey.load_model(base), base, shards)
    after = held_out_token_accuracy(osprey.load_model(base, adapter=adapter), base, shards)
    assert after > before + 0.2, (before, after)


def test_captions_merged_model_and_served_answers(documented_run):
    from osprey.infer.config import Task
    from osprey.infer.engine import STANDARD_TASKS, RegionCaptioner

    work, base, _, served = documented_run
    import pandas as pd

    captions = pd.read_parquet(work / "work" / "captions")
    assert captions["error"].isna().all() and captions["category"].notna().any()
    merged = RegionCaptioner.from_pretrained(work / "work" / "merged")
    scene, regions = held_out_regions()
    masks = np.stack([mask_utils.decode({**r, "counts": r["counts"].encode()}) for r in regions])
    task = Task("category", STANDARD_TASKS["category"].question, 6)
    expected = merged.caption([scene.image], [masks], [task])[0]
    assert [a["category"] for a in served] == [a["category"] for a in expected]
