"""Pretrained stand-in bases for the `tiny` preset: the quickstart's first step.

Osprey's recipe starts from LAION CLIP (a frozen vision tower) and Vicuna (the LLM). Neither
exists offline at tiny size, and random ones do not work (STACK.md: a frozen random tower loses
shape, a random LLM lets stages 1-2 learn nothing). `prepare_bases` pretrains both on the shapes
data set and returns the `tiny` config pointing at them:

    out_dir/tokenizer/              the tiny tokenizer (trained on shapes_corpus())
    out_dir/vision/open_clip_pytorch_model.bin   `visual.*` keys, as open_clip ships them
    out_dir/llm/                    LlamaForCausalLM (safetensors) + tokenizer
    out_dir/osprey_config.json      the returned config (OspreyConfig.to_dict())

Pretraining them takes ~8 minutes on 2 cores, so the package ships them as a versioned
artifact (`osprey/assets/tiny_bases/`, built by `osprey bases --out DIR`, see its MANIFEST.json):
the quickstart and the end-to-end tests install it (`install_bases`) as a real user downloads
CLIP and Vicuna, and `osprey demo --rebuild-bases` pretrains them afresh.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from osprey.cluster import init_ray
from osprey.data.shapes import shapes_corpus
from osprey.data.shards import iter_rows
from osprey.model.config import OspreyConfig, tiny
from osprey.prompts import save_tokenizer, train_tokenizer
from osprey.train.config import BasesConfig
from osprey.train.pretrain_llm import pretrain_llm
from osprey.train.pretrain_vision import pretrain_vision_tower

VISION_FILE = "vision/open_clip_pytorch_model.bin"
LLM_DIR = "llm"
TOKENIZER_DIR = "tokenizer"
CONFIG_FILE = "osprey_config.json"
MANIFEST_FILE = "MANIFEST.json"
# Raise when a change to the bases' recipe (steps, data, tokenizer) makes a rebuild necessary.
BASES_VERSION = 1
ARTIFACT_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_bases"
_ARTIFACT_PARTS = (TOKENIZER_DIR, os.path.dirname(VISION_FILE), LLM_DIR)


def shard_rows(shapes_dir: str | os.PathLike, split: str = "train") -> Iterator[dict[str, Any]]:
    """Every row of a shapes data set split (written by write_shapes_dataset)."""
    paths = sorted(glob.glob(os.path.join(os.fspath(shapes_dir), split, "*.parquet")))
    if not paths:
        raise FileNotFoundError(f"no {split} shards under {shapes_dir}; write the data set first")
    for path in paths:
        yield from iter_rows(path)


def prepare_bases(
    out_dir: str | os.PathLike,
    shapes_dir: str | os.PathLike,
    bases: BasesConfig | None = None,
    *,
    config: OspreyConfig | None = None,
) -> OspreyConfig:
    """Train the tokenizer, the vision tower and the LLM; return `config` (default `tiny`)
    with `vision.weights` and `llm.weights` pointing at them.

    With `bases.parallel` and at least 2 torch threads, the tower trains in a child process on
    half of the threads while the LLM trains here on the rest."""
    bases = bases or BasesConfig()
    out = Path(out_dir)
    config = config or tiny()
    tokenizer = train_tokenizer(shapes_corpus(), vocab_size=config.llm.vocab_size)
    save_tokenizer(tokenizer, out / TOKENIZER_DIR)
    print(f"bases: tokenizer saved to {out / TOKENIZER_DIR}", flush=True)

    vision_file = out / VISION_FILE
    rows = list(shard_rows(shapes_dir))
    threads = torch.get_num_threads()
    vision_threads = threads // 2 if bases.parallel else 0

    def llm() -> dict[str, float]:
        return pretrain_llm(
            out / LLM_DIR,
            tokenizer,
            rows,
            config=config.llm,
            steps=bases.llm_steps,
            reading_steps=bases.llm_reading_steps,
            seed=bases.seed,
        )

    if vision_threads:
        # The two are independent, and models this small use a second thread poorly (2 cores,
        # 1 -> 2 threads: vision 1.73 -> 2.35 steps/s, LLM 2.32 -> 3.89): one thread each,
        # side by side, finishes both in ~3/4 of the time of one after the other.
        with VisionProcess(vision_file, config, bases, vision_threads) as vision:
            torch.set_num_threads(threads - vision_threads)
            try:
                llm_metrics = llm()
            finally:
                torch.set_num_threads(threads)
            vision_metrics = vision.wait()
    else:
        vision_metrics = pretrain_vision_tower(
            vision_file, config=config.vision, steps=bases.vision_steps, seed=bases.seed
        )
        llm_metrics = llm()
    print(f"bases: vision tower saved to {vision_file}: {vision_metrics}", flush=True)
    print(f"bases: LLM saved to {out / LLM_DIR}: {llm_metrics}", flush=True)

    config.vision.weights = str(vision_file)
    config.llm.weights = str(out / LLM_DIR)
    # Later stages and `osprey.build_model` read this to find the bases.
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    return config


class VisionProcess:
    """pretrain_vision_tower in a child process (`python -m osprey.train.pretrain_vision`).

    A process, not a thread: both trainings hold the GIL in Python between kernels. Leaving the
    `with` block before `wait()` (an error in the parent) terminates the child.
    """

    def __init__(
        self, out_file: Path, config: OspreyConfig, bases: BasesConfig, threads: int
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="osprey-vision-")
        config_file = Path(self._tmp.name) / "config.json"
        config_file.write_text(json.dumps(config.to_dict()))
        self._metrics = Path(self._tmp.name) / "metrics.json"
        self.command = [
            sys.executable,
            "-m",
            "osprey.train.pretrain_vision",
            "--out",
            os.fspath(out_file),
            "--steps",
            str(bases.vision_steps),
            "--seed",
            str(bases.seed),
            "--threads",
            str(threads),
            "--config",
            os.fspath(config_file),
            "--metrics",
            os.fspath(self._metrics),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self._process = subprocess.Popen(self.command, env=env)

    def wait(self) -> dict[str, float]:
        code = self._process.wait()
        if code != 0:
            raise RuntimeError(
                f"vision tower pretraining exited with status {code} (its log is above): "
                + " ".join(self.command)
            )
        return json.loads(self._metrics.read_text())

    def __enter__(self) -> VisionProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._tmp.cleanup()


def read_bases_config(out_dir: str | os.PathLike) -> OspreyConfig:
    """The config prepare_bases wrote into `out_dir`."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run prepare_bases first")
    return OspreyConfig.from_dict(json.loads(path.read_text()))


def prepare_bases_on_ray(
    out_dir: str | os.PathLike,
    shapes_dir: str | os.PathLike,
    bases: BasesConfig | None = None,
    *,
    num_cpus: int = 2,
    ray_address: str | None = None,
) -> OspreyConfig:
    """prepare_bases inside one Ray task holding `num_cpus` CPUs (a GPU is not needed).

    The task writes to `out_dir`, so on a multi-node cluster it must be shared storage.
    """
    import ray

    if num_cpus < 1:
        raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
    init_ray(ray_address)
    task = ray.remote(num_cpus=num_cpus)(_prepare_in_task)
    bases = bases or BasesConfig()
    data = ray.get(task.remote(os.fspath(out_dir), os.fspath(shapes_dir), bases, num_cpus))
    return OspreyConfig.from_dict(data)


def _prepare_in_task(
    out_dir: str, shapes_dir: str, bases: BasesConfig, threads: int
) -> dict[str, Any]:
    # Ray sets OMP_NUM_THREADS, but torch may have read it before; match the CPUs held.
    torch.set_num_threads(threads)
    return prepare_bases(out_dir, shapes_dir, bases).to_dict()


def build_bases_artifact(
    out_dir: str | os.PathLike,
    bases: BasesConfig | None = None,
    *,
    n_images: int = 600,
) -> Path:
    """Pretrain the bases on a fresh shapes data set (`n_images`, seeded by `bases.seed`) and
    write them to `out_dir` as an artifact: the bases' files and a MANIFEST.json holding the
    recipe, the data set's size and seed, and each file's SHA-256. The quickstart's own data
    (600 images, seed 0) is the data set the shipped artifact was built on."""
    from osprey.data.shapes import write_shapes_dataset

    bases = bases or BasesConfig()
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory(prefix="osprey-bases-") as tmp:
        shapes = Path(tmp) / "shapes"
        write_shapes_dataset(shapes, n=n_images, seed=bases.seed, overwrite=True, progress=False)
        prepare_bases(out, shapes, bases)
    # The config names absolute paths of this machine; install_bases writes the installer's.
    (out / CONFIG_FILE).unlink()
    manifest = {
        "version": BASES_VERSION,
        "bases": dataclasses.asdict(bases),
        "shapes": {"n_images": n_images, "seed": bases.seed},
        "built_by": "osprey bases --out DIR (osprey.train.bases.build_bases_artifact)",
        "files": _hashes(out),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def install_bases(
    out_dir: str | os.PathLike, artifact: str | os.PathLike = ARTIFACT_DIR
) -> OspreyConfig:
    """Copy a bases artifact into `out_dir` after checking every file against its manifest,
    and write the `tiny` config pointing at the copies (what prepare_bases returns)."""
    source, out = Path(artifact), Path(out_dir)
    manifest_path = source / MANIFEST_FILE
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{manifest_path} not found: build the bases with `osprey bases --out {source}`"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != BASES_VERSION:
        raise ValueError(
            f"{source} holds bases version {manifest.get('version')}, this code needs "
            f"{BASES_VERSION}: rebuild them with `osprey bases --out {source}`"
        )
    found = _hashes(source)
    for name, digest in manifest["files"].items():
        if found.get(name) != digest:
            raise ValueError(
                f"bases artifact {source}: {name} is missing or does not match its SHA-256"
            )
    for part in _ARTIFACT_PARTS:
        shutil.copytree(source / part, out / part, dirs_exist_ok=True)
    config = tiny()
    config.vision.weights = str((out / VISION_FILE).resolve())
    config.llm.weights = str((out / LLM_DIR).resolve())
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    return config


def _hashes(root: Path) -> dict[str, str]:
    files = sorted(p for part in _ARTIFACT_PARTS for p in (root / part).rglob("*") if p.is_file())
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }
