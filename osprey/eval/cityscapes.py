"""Cityscapes scored by its own evaluators (`cityscapesscripts`), as the paper's numbers were.

The reference scores Cityscapes through detectron2's CityscapesSemSegEvaluator and
CityscapesInstanceEvaluator, which write the predictions as files and call cityscapesScripts'
`evalPixelLevelSemanticLabeling` (mIoU = the class average of IoU over the 19 evaluated classes,
void pixels ignored) and `evalInstanceLevelSemanticLabeling` (AP over overlaps 0.5:0.95 and AP50,
against the instances of `*_gtFine_instanceIds.png`, with its minimum region sizes). We do the
same: every image's ground-truth PNGs and our predictions go to a scratch folder, and the
evaluators run once at the end.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

GT_LABELS = "_gtFine_labelIds.png"
GT_INSTANCES = "_gtFine_instanceIds.png"


class CityscapesEvaluation:
    """Collects per-image predictions; `summary()` runs cityscapesScripts' two evaluators."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="osprey-cityscapes-"))
        for sub in ("gt", "semantic", "instances"):
            (self.root / sub).mkdir()
        self.names: list[str] = []

    def add(
        self,
        name: str,
        gt_label_ids: bytes,
        gt_instance_ids: bytes,
        semantic: np.ndarray,
        detections: list[tuple[np.ndarray, int, float]],
    ) -> None:
        """One image: its gtFine label-id and instance-id PNGs (file bytes), our per-pixel label
        ids, and our instances as (binary mask, label id, score)."""
        if "/" in name or not name:
            raise ValueError(f"image name {name!r} must be a plain Cityscapes id")
        (self.root / "gt" / f"{name}{GT_LABELS}").write_bytes(gt_label_ids)
        (self.root / "gt" / f"{name}{GT_INSTANCES}").write_bytes(gt_instance_ids)
        Image.fromarray(semantic.astype(np.uint8)).save(self.root / "semantic" / f"{name}.png")
        lines = []
        for k, (mask, label_id, score) in enumerate(detections):
            mask_file = f"{name}_{k}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(self.root / "instances" / mask_file)
            lines.append(f"{mask_file} {int(label_id)} {float(score)!r}\n")
        (self.root / "instances" / f"{name}.txt").write_text("".join(lines))
        self.names.append(name)

    def summary(self) -> dict[str, float]:
        """{"miou", "ap", "ap50"} in percent; {} before any image."""
        if not self.names:
            return {}
        gt = self.root / "gt"
        with _quiet(self.root):
            semantic = self._semantic(gt)
            instances = self._instances(gt)
        return {
            "miou": 100 * float(semantic["averageScoreClasses"]),
            "ap": 100 * _finite(instances["averages"]["allAp"]),
            "ap50": 100 * _finite(instances["averages"]["allAp50%"]),
        }

    def _semantic(self, gt: Path) -> dict:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as pixel

        args = copy.deepcopy(pixel.args)
        args.predictionPath = str(self.root / "semantic")
        args.JSONOutput = False
        args.colorized = False
        args.quiet = True
        return pixel.evaluateImgLists(
            [str(self.root / "semantic" / f"{n}.png") for n in self.names],
            [str(gt / f"{n}{GT_LABELS}") for n in self.names],
            args,
        )

    def _instances(self, gt: Path) -> dict:
        from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as instance

        args = copy.deepcopy(instance.args)
        args.predictionPath = str((self.root / "instances").resolve())
        args.gtInstancesFile = str(self.root / "gtInstances.json")  # its cache: ours alone
        args.JSONOutput = False
        args.colorized = False
        args.quiet = True
        args.instLabels = []
        predictions = [str(self.root / "instances" / f"{n}.txt") for n in self.names]
        truths = [str(gt / f"{n}{GT_INSTANCES}") for n in self.names]
        # evaluateImgLists' own steps, without its debug dump of the matches to matches.json
        # (json cannot write the NumPy 2 integers in it).
        instance.setInstanceLabels(args)
        matches = instance.matchGtWithPreds(
            predictions, truths, instance.getGtInstances(truths, args), args
        )
        return {"averages": instance.computeAverages(instance.evaluateMatches(matches, args), args)}

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _finite(value) -> float:
    # The evaluators give NaN when no evaluated class has an instance: no AP to report.
    value = float(value)
    return value if np.isfinite(value) else 0.0


@contextlib.contextmanager
def _quiet(workdir: Path):
    """Run the evaluators in `workdir` (they may write files to the current folder), their
    prints captured, and their exit on bad input (they call sys.exit) a
    ValueError."""
    out = io.StringIO()
    # cityscapesScripts 2.3.0 calls np.in1d, which NumPy 2.4 removed; np.isin is its successor
    # with the same arguments and result.
    shim = not hasattr(np, "in1d")
    if shim:
        np.in1d = np.isin
    try:
        with contextlib.chdir(workdir), contextlib.redirect_stdout(out):
            yield
    except SystemExit as exc:
        raise ValueError(f"cityscapesScripts rejected the files: {out.getvalue()[-500:]}") from exc
    finally:
        if shim:
            del np.in1d
