"""The offline quickstart (`make demo`): synthetic data, pretrained tiny bases, the three Osprey
stages on a local Ray cluster with DeepSpeed and MLflow, then the `shapes` benchmark.

Step 0 stands in for what the real model downloads: a tiny vision tower pretrained on the
shapes images (in place of LAION CLIP), a tiny LLaMA pretrained on the shapes text (in place of
Vicuna) and a tokenizer trained offline. The stages then freeze and train what the paper does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from osprey.train.config import BasesConfig

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@dataclass(kw_only=True)
class QuickstartConfig:
    out: str = "outputs/demo"
    n_images: int = 600
    workers: int = 2
    seed: int = 0
    bases: BasesConfig = field(default_factory=BasesConfig)  # its seed is `seed`
    # Pretrain the bases here (~8 min on 2 cores) instead of installing the shipped artifact.
    rebuild_bases: bool = False
    overrides: tuple[str, ...] = ()  # `key=value` applied to every stage config
    # Everything on the terminal; else one line per step and log interval, the rest in
    # <out>/quickstart.log.
    verbose: bool = False


def prepare_inputs(cfg: QuickstartConfig, say=print) -> Path:
    """Shapes data and pretrained bases under `cfg.out` (kept if already there)."""
    from osprey.data.shapes import write_shapes_dataset
    from osprey.train.bases import install_bases, prepare_bases

    out = Path(cfg.out).resolve()
    if not (out / "shapes" / "meta.json").exists():
        say(f"[0/4] generating {cfg.n_images} synthetic shapes images in {out / 'shapes'}")
        write_shapes_dataset(out / "shapes", n=cfg.n_images, seed=cfg.seed, overwrite=True)
    if not (out / "bases" / "done").exists():
        if cfg.rebuild_bases:
            say(
                f"[0/4] pretraining the tiny bases (vision tower, LLM, tokenizer) in {out / 'bases'}"
            )
            prepare_bases(out / "bases", out / "shapes", replace(cfg.bases, seed=cfg.seed))
        else:
            say(
                f"[0/4] installing the pretrained tiny bases (vision tower, LLM, tokenizer) in {out / 'bases'}"
            )
            install_bases(out / "bases")
        (out / "bases" / "done").write_text("ok\n")
    return out


def run_quickstart(cfg: QuickstartConfig) -> dict:
    from osprey.console import quiet_console

    log_path = Path(cfg.out).resolve() / "quickstart.log"
    if not cfg.verbose:
        print(f"Quickstart in {Path(cfg.out).resolve()}; the full log: {log_path}")
    # Ray Data's progress bars (one per stage and epoch) are for --verbose only.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0" if cfg.verbose else "1")
    with quiet_console(log_path, enabled=not cfg.verbose) as say:
        summary = _run(cfg, say)
    for line in summary.pop("lines"):
        print(line)
    return summary


def _run(cfg: QuickstartConfig, say) -> dict:
    from osprey.cluster import init_ray
    from osprey.eval.run_shapes import evaluate_shapes
    from osprey.train.config import load_stage_config
    from osprey.train.runner import RunOptions, configure_logging, run_stage

    configure_logging()
    started = time.time()
    out = prepare_inputs(cfg, say)
    options = RunOptions(
        output_dir=str(out), pipeline="quickstart", num_workers=cfg.workers,
        progress=not cfg.verbose, progress_writer=say,
    )  # fmt: skip
    init_ray(num_cpus=max(4, cfg.workers + 2), log_to_driver=cfg.verbose)
    tracker = options.tracker()
    parent = tracker.pipeline_run(options.pipeline, running=True)
    with tracker.ending(parent):
        results = {}
        for i, name in enumerate(("stage1", "stage2", "stage3"), start=1):
            say(f"[{i}/4] training {name} on Ray Train ({cfg.workers} workers, DeepSpeed)")
            stage = load_stage_config(f"tiny/{name}", list(cfg.overrides), output_dir=str(out))
            results[name] = run_stage(stage, options)
        final = results["stage3"].model_dir
        say("[4/4] shapes benchmark on the held-out images")
        score = evaluate_shapes(final, out / "shapes")
        # The names and units `osprey eval` gives the model's run (percentages).
        for key, value in score.as_metrics().items():
            tracker.client.log_metric(results["stage3"].run_id, f"shapes/{key}", value)
    summary = {
        "model": final,
        "shapes_accuracy_pct": 100 * score.accuracy,
        "regions": score.total,
        "minutes": (time.time() - started) / 60,
        "mlflow_ui": f"mlflow ui --backend-store-uri {tracker.tracking_uri}",
    }
    summary["lines"] = [
        f"\nDone in {summary['minutes']:.1f} min. Held-out category accuracy "
        f"{score.accuracy:.1%} on {score.total} regions (colour and shape both right).",
        *(f"  predicted {p!r:<24} truth {t!r}" for p, t in score.examples[:5]),
        f"Model: {final}",
        f"See the runs: {summary['mlflow_ui']}",
    ]
    return summary
