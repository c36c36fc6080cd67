"""The evaluation job: the `shapes` benchmark as a Ray job with its metrics in MLflow beside
the model's run, and real-format benchmarks end to end on tiny files with a tiny model."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from osprey.eval.benchmarks import BenchmarkData
from osprey.eval.job import EvalConfig, add_eval_arguments, config_from_args, run_eval
from osprey.eval.openvocab import id2rgb, rgb2id
from osprey.infer.tiny import write_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_model(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from osprey.data.shapes import write_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(str(out), n=40, seed=2, progress=False)
    return out


def answer_one_at_a_time(model_dir, shapes_dir):
    """(prediction, truth) per region: each region's category question alone through the
    model's plain `generate`, prompts built here (an independent path to the job's engine)."""
    import re

    import numpy as np
    import torch

    import osprey
    from osprey.data.images import decode_image
    from osprey.data.masks import decode_region
    from osprey.data.shards import iter_rows
    from osprey.model.image_processing import preprocess_image
    from osprey.prompts import TEMPLATES, build_generation_ids, load_tokenizer

    model, tokenizer = osprey.load_model(model_dir).eval(), load_tokenizer(model_dir)
    out = []
    for shard in sorted((shapes_dir / "val").glob("*.parquet")):
        for row in iter_rows(str(shard)):
            if row["task"] != "category":
                continue
            question = re.sub(r"<region\d+>", "<region1>", row["conversations"][0]["value"])
            ids = build_generation_ids(
                tokenizer, question, template=TEMPLATES["vicuna_v1"], num_regions=1
            ).input_ids
            pixels = preprocess_image(decode_image(row["image"]), model.config.vision)[None]
            for region in row["regions"]:
                mask = torch.from_numpy(decode_region(region)[None].astype(np.uint8))
                [answer] = model.generate([ids], pixels, [mask], max_new_tokens=8)
                out.append((tokenizer.decode(answer, skip_special_tokens=True), region["category"]))
    return out


def test_shapes_job_answers_as_one_region_at_a_time(model_dir, shapes_dir, tmp_path):
    from osprey.data.shapes import normalize_answer
    from osprey.eval.run_shapes import evaluate_shapes
    from osprey.eval.shapes import ShapesScore, score_answer

    config = EvalConfig(
        benchmark="shapes", model=model_dir, data=BenchmarkData(root=str(shapes_dir)),
        out=str(tmp_path / "out"), mlflow=False,
    )  # fmt: skip
    result = run_eval(config, local=True)
    frame = pd.read_parquet(tmp_path / "out" / "predictions")
    alone = answer_one_at_a_time(model_dir, shapes_dir)
    expected = ShapesScore()
    for prediction, truth in alone:
        score_answer(expected, prediction, truth)
    assert result.metrics["regions"] == expected.total == len(frame)
    assert result.metrics["accuracy"] == pytest.approx(100 * expected.accuracy)
    assert frame["error"].isna().all()
    # The same greedy answers as one region at a time, region for region.
    ours = Counter(
        (normalize_answer(p), json.loads(t))
        for p, t in zip(frame.prediction, frame.truth, strict=True)
    )
    assert ours == Counter((normalize_answer(p), t) for p, t in alone)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written == result.metrics | {"decoding": "greedy"}
    # The quickstart's in-process scorer is this job.
    score = evaluate_shapes(model_dir, shapes_dir, batch_size=4)
    assert (score.total, score.correct) == (expected.total, expected.correct)


def test_a_rerun_resumes_and_a_rerun_with_other_options_is_refused(model_dir, shapes_dir, tmp_path):
    from osprey.eval.job import EvalResources

    out = tmp_path / "out"
    config = EvalConfig(
        benchmark="shapes", model=model_dir, data=BenchmarkData(root=str(shapes_dir)),
        out=str(out), mlflow=False, resources=EvalResources(batch=2),
    )  # fmt: skip
    first = run_eval(config, local=True)
    before = pd.read_parquet(out / "predictions")
    parts = sorted((out / "predictions").glob("part-*.parquet"))
    assert len(parts) > 1
    # As if killed before the first part was committed, while writing another.
    lost = pd.read_parquet(parts[0])["item_id"].nunique()
    parts[0].unlink()
    (out / "predictions" / ".tmp-0123-part-x.parquet").write_bytes(b"half a file")
    second = run_eval(config, local=True)
    assert second.already_done == first.items - lost
    assert second.metrics == first.metrics
    after = pd.read_parquet(out / "predictions")
    key = ["item_id", "region_id"]
    pd.testing.assert_frame_equal(
        before.sort_values(key).reset_index(drop=True),
        after.sort_values(key).reset_index(drop=True),
    )
    assert not list((out / "predictions").glob(".tmp-*"))
    with pytest.raises(ValueError, match="other options"):
        run_eval(EvalConfig(**{**config.__dict__, "max_new_tokens": 3}), local=True)
    third = run_eval(
        EvalConfig(**{**config.__dict__, "max_new_tokens": 3, "overwrite": True}), local=True
    )
    assert third.already_done == 0 and third.metrics["regions"] == first.metrics["regions"]


def write_pope(folder: Path) -> Path:
    images = folder / "val2014"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(images / name)
        for j, label in enumerate(("yes", "no")):
            lines.append(
                {"question_id": 2 * i + j, "image": name, "label": label,
                 "text": f"Is there a {'dog' if j else 'cat'} in the image?"}
            )  # fmt: skip
    (folder / "coco_pope_random.json").write_text("\n".join(json.dumps(x) for x in lines))
    return folder


def test_pope_job_on_tiny_files(model_dir, tmp_path):
    write_pope(tmp_path)
    config = EvalConfig(
        benchmark="pope", model=model_dir, data=BenchmarkData(root=str(tmp_path)),
        out=str(tmp_path / "out"), max_new_tokens=4, mlflow=False,
    )  # fmt: skip
    result = run_eval(config, local=True)
    frame = pd.read_parquet(tmp_path / "out" / "predictions")
    assert len(frame) == 6 and frame["error"].isna().all()
    assert frame["region_id"].isna().all()
    metrics = result.metrics
    assert metrics["questions"] == 6
    assert metrics["accuracy"] == pytest.approx(100 * (metrics["tp"] + metrics["tn"]) / 6)


def test_benchmark_files_and_output_on_s3(moto_s3, model_dir, tmp_path):
    fs, options = moto_s3
    fs.create_dir("eval-test")
    local = write_pope(tmp_path / "pope")
    for path in local.rglob("*"):
        if path.is_file():
            with fs.open_output_stream(f"eval-test/pope/{path.relative_to(local)}") as stream:
                stream.write(path.read_bytes())
    config = EvalConfig(
        benchmark="pope", model=model_dir, out="s3://eval-test/out", max_new_tokens=4,
        data=BenchmarkData(root="s3://eval-test/pope", s3=options), mlflow=False,
    )  # fmt: skip
    result = run_eval(config, local=True)
    assert result.metrics["questions"] == 6 and result.metrics["errors"] == 0
    with fs.open_input_stream("eval-test/out/metrics.json") as stream:
        assert json.loads(stream.readall()) == result.metrics | {"decoding": "greedy"}
    assert run_eval(config, local=True).already_done == 6


def test_command_line_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(
        ["--benchmark", "ade20k", "--model", "m", "--data", "d", "--evaluators", "3",
         "--evaluator-gpus", "0.5", "--class-names", "c.txt", "--limit", "5", "--no-mlflow"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.resources.evaluators == 3 and config.resources.evaluator_gpus == 0.5
    assert config.data.class_names == "c.txt" and config.limit == 5 and not config.mlflow
    assert config.engine().temperature == 0  # greedy by default
    assert config.engine().template == "osprey_v1"
    help_text = parser.format_help()
    for name in ("lvis", "paco", "refcocog", "ade20k", "cityscapes", "pope", "shapes"):
        assert f"  {name} " in help_text
    assert "65.24" in help_text and "108.3" in help_text and "29.94" in help_text
    with pytest.raises(ValueError, match="unknown benchmark"):
        EvalConfig(benchmark="coco", model="m")


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


def write_ade20k(root: Path, n: int = 2) -> int:
    """A tiny ADE20K-150 panoptic validation set; returns the number of segments."""
    rng = np.random.default_rng(1)
    (root / "images" / "validation").mkdir(parents=True)
    (root / "ade20k_panoptic_val").mkdir()
    images, annotations, count = [], [], 0
    for i in range(n):
        name = f"ADE_val_{i + 1:08d}"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(
            root / "images" / "validation" / f"{name}.jpg"
        )
        ids = np.zeros((48, 64), np.int64)
        ids[:24], ids[24:, :32], ids[24:40, 40:60] = 1, 2, 3 + i
        segments = [
            {"id": 1, "category_id": 0, "iscrowd": 0, "area": int((ids == 1).sum())},
            {"id": 2, "category_id": 2, "iscrowd": 0, "area": int((ids == 2).sum())},
            {"id": 3 + i, "category_id": 12, "iscrowd": 0, "area": int((ids == 3 + i).sum())},
        ]
        count += len(segments)
        Image.fromarray(id2rgb(ids)).save(root / "ade20k_panoptic_val" / f"{name}.png")
        images.append({"id": name, "file_name": f"{name}.jpg", "height": 48, "width": 64})
        annotations.append(
            {"image_id": name, "file_name": f"{name}.png", "segments_info": segments}
        )
    categories = [
        {"id": 0, "name": "wall", "isthing": 0},
        {"id": 2, "name": "sky", "isthing": 0},
        {"id": 12, "name": "person, individual, someone, somebody, mortal, soul", "isthing": 1},
    ]
    (root / "ade20k_panoptic_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    # The instance JSON (prepare_ade20k_ins_seg.py's output) that reference scoring takes AP from.
    from pycocotools import mask as mask_utils

    instances = []
    for i, image in enumerate(images):
        ids = rgb2id(np.asarray(Image.open(root / "ade20k_panoptic_val" / f"{image['id']}.png")))
        rle = mask_utils.encode(np.asfortranarray((ids == 3 + i).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        instances.append(
            {"id": i + 1, "image_id": image["id"], "iscrowd": 0, "category_id": 12,
             "segmentation": rle, "area": int(mask_utils.area(rle))}
        )  # fmt: skip
    (root / "ade20k_instance_val.json").write_text(
        json.dumps({"images": images, "annotations": instances, "categories": categories[2:]})
    )
    return count


def _minilm():
    from sentence_transformers import SentenceTransformer

    from osprey.eval.semantic import minilm_path

    return SentenceTransformer(minilm_path(), device="cpu")


def openvocab_independently(root: Path, frame: pd.DataFrame) -> dict[str, float]:
    """PQ / SQ / RQ and mIoU by torchmetrics, mask AP by pycocotools, from the answers: each
    segment takes the class whose best synonym sentence ("There is a {} in the scene.") is the
    nearest to its answer (the reference's matching, written here again)."""
    import torch
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from sentence_transformers import util
    from torchmetrics.classification import MulticlassJaccardIndex
    from torchmetrics.detection import PanopticQuality

    data = json.loads((root / "ade20k_panoptic_val.json").read_text())
    cats = data["categories"]
    things = {c["id"] for c in cats if c["isthing"]}
    model = _minilm()
    sentences = [(k, f"There is a {s.strip()} in the scene.") for k, c in enumerate(cats)
                 for s in c["name"].split(",") if s.strip()]  # fmt: skip
    class_vectors = model.encode([s for _, s in sentences], convert_to_tensor=True)
    answer = dict(zip(frame["region_id"], frame["prediction"], strict=True))
    pq = PanopticQuality(things=things, stuffs={c["id"] for c in cats} - things,
                         allow_unknown_preds_category=True, return_sq_and_rq=True)  # fmt: skip
    jaccard = MulticlassJaccardIndex(num_classes=len(cats), ignore_index=-1, average="none")
    gt_instances, detections, images = [], [], []
    for image_number, ann in enumerate(data["annotations"], start=1):
        rgb = np.asarray(Image.open(root / "ade20k_panoptic_val" / ann["file_name"]), np.int64)
        ids = rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)
        segments = sorted(ann["segments_info"], key=lambda s: s["id"])
        texts = [answer[f"{ann['image_id']}:{s['id']}"].strip() for s in segments]
        cosine = util.cos_sim(model.encode(texts, convert_to_tensor=True), class_vectors)
        scores = torch.full((len(segments), len(cats)), -torch.inf)
        for column, (k, _) in enumerate(sentences):
            scores[:, k] = torch.maximum(scores[:, k], cosine[:, column])
        probabilities = scores.double().softmax(-1)
        chosen = probabilities.argmax(-1).tolist()
        # Pixels of no segment are void: a category id that is no class (0 is ADE20K's wall).
        void = max(c["id"] for c in cats) + 1
        gt_pair = np.zeros(ids.shape + (2,), np.int64)
        gt_pair[..., 0] = void
        pred_pair = gt_pair.copy()
        gt_class = np.full(ids.shape, -1)
        pred_class = np.zeros(ids.shape, np.int64)
        for row, (s, k) in enumerate(zip(segments, chosen, strict=True)):
            pixels = ids == s["id"]
            gt_pair[pixels] = (s["category_id"], s["id"])
            pred_pair[pixels] = (cats[k]["id"], s["id"])
            gt_class[pixels] = next(j for j, c in enumerate(cats) if c["id"] == s["category_id"])
            pred_class[pixels] = k
            rle = mask_utils.encode(np.asfortranarray(pixels.astype(np.uint8)))
            if s["category_id"] in things:
                gt_instances.append({"id": len(gt_instances) + 1, "image_id": image_number,
                                     "category_id": s["category_id"], "segmentation": rle,
                                     "area": float(pixels.sum()), "iscrowd": 0,
                                     "bbox": list(mask_utils.toBbox(rle))})  # fmt: skip
            for j, c in enumerate(cats):
                if c["id"] in things:
                    detections.append({"image_id": image_number, "category_id": c["id"],
                                       "segmentation": rle,
                                       "score": float(probabilities[row, j])})  # fmt: skip
        images.append({"id": image_number, "height": ids.shape[0], "width": ids.shape[1]})
        pq.update(torch.from_numpy(pred_pair)[None], torch.from_numpy(gt_pair)[None])
        jaccard.update(torch.from_numpy(pred_class), torch.from_numpy(gt_class))
    pq_value, sq, rq = (100 * float(v) for v in pq.compute())
    present = jaccard.confmat.sum(1) > 0
    coco = COCO()
    coco.dataset = {"images": images, "annotations": gt_instances,
                    "categories": [{"id": c} for c in sorted(things)]}  # fmt: skip
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(detections), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {"pq": pq_value, "sq": sq, "rq": rq, "ap": 100 * float(evaluator.stats[0]),
            "miou": 100 * float(jaccard.compute()[present].mean())}  # fmt: skip


def category_independently(frame: pd.DataFrame) -> dict[str, float]:
    """The paper's Semantic Similarity and Semantic IoU, written here again."""
    from sentence_transformers import util

    def answer(text: str) -> str:
        text = text.strip()
        text = text.split(":")[1] if ":" in text else text
        return text.replace(".", " ").replace(":", " ").replace(",", " ")

    preds = [answer(p) for p in frame["prediction"]]
    truths = [json.loads(t).replace("_", " ").replace(":", " ") for t in frame["truth"]]
    model = _minilm()
    similarity = util.cos_sim(model.encode(preds), model.encode(truths)).diagonal()
    ious = []
    for p, t in zip(preds, truths, strict=True):
        a, b = set(p.lower().split()), set(t.lower().split())
        ious.append(len(a & b) / len(a | b) if a | b else 0.0)
    return {
        "semantic_similarity": 100 * float(similarity.mean()),
        "semantic_iou": 100 * float(np.mean(ious)),
    }


def captions_independently(frame: pd.DataFrame) -> dict[str, float]:
    """METEOR and CIDEr by pycocoevalcap, called directly on the text after any "...:"."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    refs = {r.region_id: [{"caption": c} for c in json.loads(r.truth)] for r in frame.itertuples()}
    preds = {}
    for r in frame.itertuples():
        text = r.prediction.strip()
        preds[r.region_id] = [{"caption": (text.split(":")[1] if ":" in text else text).strip()}]
    gts, res = tokenizer.tokenize(refs), tokenizer.tokenize(preds)
    return {
        "meteor": 100 * Meteor().compute_score(gts, res)[0],
        "cider": 100 * Cider().compute_score(gts, res)[0],
    }


@pytest.mark.slow
def test_ade20k_on_ray_data_end_to_end(local_ray, model_dir, tmp_path):
    segments = write_ade20k(tmp_path / "ade")
    config = EvalConfig(
        benchmark="ade20k", model=model_dir, data=BenchmarkData(root=str(tmp_path / "ade")),
        out=str(tmp_path / "out"), max_new_tokens=4,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    result = run_eval(config)
    frame = pd.read_parquet(tmp_path / "out" / "predictions")
    assert len(frame) == segments and frame["error"].isna().all()
    expected = openvocab_independently(tmp_path / "ade", frame)
    for key in ("pq", "sq", "rq", "miou", "ap"):
        assert result.metrics[key] == pytest.approx(expected[key], abs=1e-4), key
    assert result.metrics["images"] == 2
    # Greedy: a second run (here in-process) gives the same answers and the same scores.
    again = run_eval(
        EvalConfig(**{**config.__dict__, "out": str(tmp_path / "again"), "mlflow": False}),
        local=True,
    )
    other = pd.read_parquet(tmp_path / "again" / "predictions")
    assert other["prediction"].tolist() == frame["prediction"].tolist()
    assert again.metrics == result.metrics
    assert result.run_id and result.model_run_id is None


@pytest.mark.slow
def test_lvis_and_refcocog_on_tiny_files(model_dir, tmp_path):
    from pycocotools import mask as mask_utils

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(2)
    for name in ("000000000139.jpg", "000000000042.jpg"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(images / name)
    square = [[5, 5, 20, 5, 20, 20, 5, 20]]
    rle = mask_utils.encode(
        np.asfortranarray(np.pad(np.ones((10, 10), np.uint8), ((20, 0), (30, 0))))
    )
    rle["counts"] = rle["counts"].decode()
    lvis = [{"file_name": "000000000139.jpg", "height": 30, "width": 40,
             "categories": ["baseball_bat", "mug:handle"],
             "annotations": [{"segmentation": square}, {"segmentation": rle}]}]  # fmt: skip
    (tmp_path / "lvis_val_1k_category.json").write_text(json.dumps(lvis))
    refcocog = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000042.jpg", "height": 30,
                    "width": 40, "caption": "the square on the left"}],
        "annotations": [{"id": 9, "image_id": 1, "segmentation": square, "category_id": 1}],
    }  # fmt: skip
    (tmp_path / "finetune_refcocog_val_with_mask.json").write_text(json.dumps(refcocog))
    for benchmark, keys in (
        ("lvis", ("semantic_similarity", "semantic_iou")),
        ("refcocog", ("meteor", "cider")),
    ):
        result = run_eval(
            EvalConfig(
                benchmark=benchmark,
                model=model_dir,
                data=BenchmarkData(root=str(tmp_path)),
                out=str(tmp_path / benchmark),
                max_new_tokens=4,
                mlflow=False,
            ),  # fmt: skip
            local=True,
        )
        frame = pd.read_parquet(tmp_path / benchmark / "predictions")
        assert frame["error"].isna().all() and len(frame) == {"lvis": 2, "refcocog": 1}[benchmark]
        expected = {"lvis": category_independently, "refcocog": captions_independently}
        for key, value in expected[benchmark](frame).items():
            assert result.metrics[key] == pytest.approx(value, abs=1e-4), (benchmark, key)
        assert set(keys) <= set(expected[benchmark](frame))
