"""Region-captioning speed of the engine against the reference loop, and the job's memory.

    python bench/caption.py                      # both parts, defaults below
    python bench/caption.py --skip-job           # engine only (about a minute)
    python bench/caption.py --job-images 200 800 --runner local

Engine (tiny preset, random weights, the shapes tokenizer): an image with 8 and with 32 regions
(--images to caption several together), tasks
category and short description, --tokens new tokens each. The end token is disabled in both
paths so that both decode exactly the same number of tokens. Printed per region count:
regions/s of the reference loop (one region per call, vision and whole prompt each time), of the
engine, the speed-up (both timed alike: one warm-up call each, then --repeats rounds that
run reference, engine and bound back to back, the median of each), and the lower bound "vision once + prefix once + batched decode": the
forward passes alone (no sampling or bookkeeping), against which the engine's time is compared.

Job: `python -m jobs.caption` over --job-images synthetic images (classical segmenter, tiny
model), in a subprocess whose memory is sampled every 0.5 s: the peak RSS of the driver and the
peak PSS summed over its whole process tree (Ray's processes included; PSS counts a shared page
once overall). Memory must not grow with the number of images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from osprey.data.shapes import ShapesConfig, render_sample, shapes_corpus  # noqa: E402
from osprey.infer.baseline import caption_one_at_a_time  # noqa: E402
from osprey.infer.engine import CATEGORY, SHORT, EngineConfig, RegionCaptioner, Task  # noqa: E402
from osprey.model import build_model, get_config  # noqa: E402
from osprey.model.image_processing import preprocess_image  # noqa: E402
from osprey.model.modeling import MultimodalInputs  # noqa: E402
from osprey.prompts import train_tokenizer  # noqa: E402


def random_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """n random rectangles and ellipses covering 2-25% of the image each."""
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        w, h = rng.integers(size // 6, size // 2, 2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        if i % 2:
            masks[i, y : y + h, x : x + w] = True
        else:
            cx, cy = x + w / 2, y + h / 2
            masks[i] = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
    return masks


# Engine timings read this clock: CPU seconds of this process by default (--clock), so that other
# work on a shared machine does not skew the comparison (with one torch thread, CPU time is what
# wall time would be on an idle machine).
CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCK["cpu"]


def timed(fn) -> float:
    """Seconds of one run of `fn` on `clock`."""
    start = clock()
    fn()
    return clock() - start


@torch.no_grad()
def lower_bound(engine: RegionCaptioner, images: list[np.ndarray], n: int, tasks) -> float:
    """Seconds for the engine's work as bare forward passes: the vision tower once over the
    images, the prefix once over them, and per task the rows (n per image, in batches of
    max_batch_regions like the engine) through their suffix and tokens - 1 single-token steps.
    No sampling, no bookkeeping, no early stops: what batching alone cannot go below."""
    from transformers import DynamicCache

    model = engine.model
    prompts = engine._prompts(tasks)
    pixels = torch.stack([preprocess_image(image, model.config.vision) for image in images])
    t_vision = timed(lambda: model.encode_images(pixels))
    image_embeds, _ = model.encode_images(pixels)
    ids = torch.tensor([prompts.prefix] * len(images))
    spliced = model.splice(ids, image_embeds=image_embeds)

    def prefix():
        return model.model(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids,
            use_cache=True,
        ).past_key_values

    t_prefix = timed(prefix)
    kv = [(layer.keys, layer.values) for layer in prefix().layers]
    length = spliced.inputs_embeds.shape[1]
    hidden = model.config.llm.hidden_size
    rows = [k for k in range(len(images)) for _ in range(n)]
    step = engine.config.max_batch_regions
    chunks = [rows[i : i + step] for i in range(0, len(rows), step)]

    def decode(task: Task, chunk: list[int]) -> None:
        index = torch.tensor(chunk)
        cache = DynamicCache(ddp_cache_data=[(k[index], v[index]) for k, v in kv])
        b, s = len(chunk), len(prompts.suffixes[task.name])
        pos = torch.arange(length, length + s)[None].repeat(b, 1)
        attn = torch.ones(b, length + s, dtype=torch.long)
        first = MultimodalInputs(torch.randn(b, s, hidden), attn, pos, None)
        model.forward_embeds(first, cache, use_cache=True)
        token = torch.full((b, 1), 5)
        for _ in range(task.max_new_tokens - 1):
            pos = pos[:, -1:] + 1
            attn = torch.cat([attn, attn.new_ones(b, 1)], 1)
            nxt = MultimodalInputs(model.model.embed_tokens(token), attn, pos, None)
            model.forward_embeds(nxt, cache, use_cache=True)

    t_decode = sum(timed(lambda t=t, c=c: decode(t, c)) for t in tasks for c in chunks)
    return t_vision + t_prefix + t_decode


def bench_engine(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    config = get_config("tiny")
    tokenizer = train_tokenizer(shapes_corpus(), vocab_size=config.llm.vocab_size)
    model = build_model(config, seed=0).eval()
    tasks = (
        Task(CATEGORY.name, CATEGORY.question, args.tokens),
        Task(SHORT.name, SHORT.question, args.tokens),
    )
    rng = np.random.default_rng(0)
    size = config.vision.image_size
    images = [render_sample(rng, ShapesConfig(image_size=size)).image for _ in range(args.images)]
    engine = RegionCaptioner(model, tokenizer, EngineConfig(eos_token_id=-1, max_batch_regions=64))
    print(
        f"engine: tiny preset, {args.images} images x N regions, tasks {[t.name for t in tasks]}, "
        f"{args.tokens} tokens each, {torch.get_num_threads()} torch thread(s), {args.clock} time, "
        f"median of {args.repeats} interleaved repeats"
    )
    print(
        f"{'N':>4} {'reference r/s':>14} {'engine r/s':>11} {'speed-up':>9} {'bound r/s':>10} {'engine/bound':>13}"
    )
    for n in args.regions:
        masks = [random_masks(rng, n, size) for _ in images]
        # The same warm-up for both paths (one untimed call each), then every repeat times the
        # reference, the engine and the bound back to back, so all three see the same machine;
        # each is the median of its repeats.
        caption_one_at_a_time(model, tokenizer, images[:1], masks[:1], tasks, eos_token_id=-1)
        engine.generate_ids(images[:1], masks[:1], tasks)
        runs: dict[str, list[float]] = {"reference": [], "engine": [], "bound": []}
        for _ in range(args.repeats):
            runs["reference"].append(
                timed(
                    lambda m=masks: caption_one_at_a_time(
                        model, tokenizer, images, m, tasks, eos_token_id=-1
                    )
                )
            )
            runs["engine"].append(timed(lambda m=masks: engine.generate_ids(images, m, tasks)))
            runs["bound"].append(lower_bound(engine, images, n, tasks))
        t_reference, t_engine, t_bound = (statistics.median(runs[k]) for k in runs)
        regions = n * len(images)
        print(
            f"{n:>4} {regions / t_reference:>14.1f} {regions / t_engine:>11.1f} "
            f"{t_reference / t_engine:>8.1f}x {regions / t_bound:>10.1f} {t_bound / t_engine:>12.0%}"
        )
    s = engine.stats
    print(
        f"engine time split: vision {s.vision:.2f} s, region tokens {s.region_tokens:.2f} s, "
        f"prefix {s.prefix:.2f} s, decode {s.decode:.2f} s ({s.decode_steps} steps)"
    )


# --------------------------------------------------------------------------------------------
# Job memory
# --------------------------------------------------------------------------------------------


def tree_memory(proc) -> tuple[int, int]:
    """(driver RSS, PSS summed over the driver and all its descendants) in bytes.

    PSS shares each shared page among the processes mapping it, so Ray's object store (mapped by
    every worker) counts once, not once per worker as summed RSS would.
    """
    import psutil

    try:
        driver = proc.memory_info().rss
        tree = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for member in tree:
        try:
            total += member.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return driver, total


def bench_job(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="osprey-bench-caption-"))
    try:
        _bench_job(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _bench_job(args: argparse.Namespace, work: Path) -> None:
    import psutil

    from osprey.infer.tiny import write_tiny_model

    model_dir = write_tiny_model(work / "model")
    rng = np.random.default_rng(0)
    print(f"job: {args.runner} runner, classical segmenter, tiny model; files in {work}")
    print(
        f"{'images':>7} {'masks':>7} {'seconds':>8} {'img/s':>6} {'driver RSS peak':>16} "
        f"{'all processes PSS peak':>23}"
    )
    for count in args.job_images:
        src = work / f"images-{count}"
        src.mkdir()
        for i in range(count):
            Image.fromarray(render_sample(rng, ShapesConfig(image_size=128)).image).save(
                src / f"{i:06d}.png"
            )
        out = work / f"out-{count}"
        command = [
            sys.executable, "-m", "jobs.caption", str(src), "--out", str(out),
            "--model", str(model_dir), "--category-tokens", str(args.job_tokens),
            "--short-tokens", str(args.job_tokens),
        ]  # fmt: skip
        if args.runner == "local":
            command.append("--local")
        # One torch thread per process, as Ray gives each 1-CPU actor: on a small shared machine
        # more threads only contend.
        env = dict(os.environ, OMP_NUM_THREADS="1")
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        watched = psutil.Process(proc.pid)
        driver_peak = tree_peak = 0
        while proc.poll() is None:
            driver, total = tree_memory(watched)
            driver_peak, tree_peak = max(driver_peak, driver), max(tree_peak, total)
            time.sleep(0.5)
        seconds = time.perf_counter() - start
        summary = proc.stdout.read().strip().splitlines()
        if proc.returncode != 0:
            raise SystemExit(f"job over {count} images failed ({proc.returncode})")
        line = next((s for s in summary if s.startswith("caption:")), "")
        masks = line.split(" masks")[0].rsplit(" ", 1)[-1] if " masks" in line else "?"
        print(
            f"{count:>7} {masks:>7} {seconds:>8.1f} {count / seconds:>6.1f} "
            f"{driver_peak / 2**20:>12.0f} MiB {tree_peak / 2**20:>19.0f} MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--images", type=int, default=1, help="images per engine measurement")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per region and task")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (engine part)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCK), default="cpu", help="engine part: CPU or wall seconds"
    )
    parser.add_argument("--job-images", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--job-tokens", type=int, default=4)
    parser.add_argument("--runner", choices=("ray", "local"), default="ray")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the job's images and output")
    args = parser.parse_args()
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    if not args.skip_engine:
        bench_engine(args)
    if not args.skip_job:
        bench_job(args)


if __name__ == "__main__":
    main()
