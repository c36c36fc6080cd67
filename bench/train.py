"""Training throughput of the `tiny` preset on Ray Train with DeepSpeed: 1 vs 2 workers.

    python bench/train.py [--steps 30] [--images 200]

Runs the same stage-3 configuration (everything but the vision tower trains) with 1 and then 2
workers on a local loopback Ray, reads the per-step metrics the workers log to MLflow, and
prints median tokens/s, samples/s, data-wait fraction and peak memory per worker, with the
2-worker/1-worker ratio. On a GPU machine pass --gpu (one GPU per worker, bf16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def run(workers: int, root: Path, args) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from osprey.train.config import StageConfig
    from osprey.train.runner import RunOptions, run_stage

    stage = StageConfig(
        name=f"bench-{workers}w",
        preset=args.preset,
        trains=["projector", "mask_extractor", "llm"],
        data=[str(root / "shapes" / "train")],
        tasks=["category", "conversation"],
        tokenizer=str(root / "tokenizer"),
        lr=1e-4,
        global_batch_size=args.micro_batch * 2,
        micro_batch_size=args.micro_batch,
        max_steps=args.steps,
        epochs=100,
        max_length=512,
        zero_stage=args.zero,
        checkpoint_every=10**6,
    )
    options = RunOptions(
        output_dir=str(root / f"run-{workers}"), pipeline="bench", num_workers=workers,
        use_gpu=args.gpu,
    )  # fmt: skip
    result = run_stage(stage, options)
    client = MlflowClient(options.tracker().tracking_uri)
    out = {}
    for key in ("tokens_per_s", "samples_per_s", "data_wait_fraction", "peak_rss_mb"):
        history = [m.value for m in client.get_metric_history(result.run_id, key)]
        # The first steps include start-up (data pipeline warm-up, allocator): skip them.
        steady = history[len(history) // 4 :] or history
        out[key] = max(steady) if key == "peak_rss_mb" else statistics.median(steady)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    import ray

    from osprey.data.shapes import shapes_corpus, write_shapes_dataset
    from osprey.prompts import save_tokenizer, train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="osprey-bench-train-"))
    write_shapes_dataset(root / "shapes", n=args.images, seed=0, val_fraction=0.0, progress=False)
    save_tokenizer(train_tokenizer(shapes_corpus(), 1024), root / "tokenizer")
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    results = {w: run(w, root, args) for w in (1, 2)}
    ray.shutdown()

    print(
        f"\n{args.preset} preset, stage-3 trainables, micro-batch {args.micro_batch}, ZeRO-{args.zero}"
    )
    print(f"{'metric':<22}{'1 worker':>12}{'2 workers':>12}{'2w/1w':>8}")
    for key, label in (
        ("tokens_per_s", "tokens/s"),
        ("samples_per_s", "samples/s"),
        ("data_wait_fraction", "data-wait fraction"),
        ("peak_rss_mb", "peak RSS/worker (MB)"),
    ):
        a, b = results[1][key], results[2][key]
        print(f"{label:<22}{a:>12.3f}{b:>12.3f}{b / a if a else float('nan'):>8.2f}")


if __name__ == "__main__":
    main()
