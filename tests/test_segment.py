"""Segment everything: the classical default finds the shapes; SAM runs end to end offline."""

import numpy as np
import pytest
import torch
from PIL import Image

from osprey.data.shapes import ShapesConfig, render_sample
from osprey.infer.regions import Region, RleMasks
from osprey.infer.segment import (
    ClassicalConfig,
    ClassicalSegmenter,
    SamConfig,
    SamSegmenter,
    SegmenterConfig,
    stability_score,
)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


def best_iou(truth: np.ndarray, regions: list[Region]) -> float:
    return max((iou(truth, r.mask()) for r in regions), default=0.0)


def scenes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [render_sample(rng, ShapesConfig(image_size=128)) for _ in range(n)]


def test_classical_finds_the_shapes():
    segmenter = SegmenterConfig().build()
    assert isinstance(segmenter, ClassicalSegmenter)
    found = total = unique_found = unique_total = 0
    for scene in scenes(30):
        regions = segmenter.segment(scene.image)
        colours = [label.colour for label in scene.labels]
        for truth, label in zip(scene.masks, scene.labels, strict=True):
            score = best_iou(truth, regions)
            total += 1
            found += score >= 0.8
            # A shape alone in its colour has nothing to be confused with.
            if colours.count(label.colour) == 1:
                unique_total += 1
                unique_found += score >= 0.9
    assert found >= 0.88 * total, f"{found}/{total} shapes found"
    assert unique_found >= 0.9 * unique_total, f"{unique_found}/{unique_total}"


def test_classical_regions_are_full_size_sorted_and_drop_specks():
    scene = scenes(1, seed=3)[0]
    big = np.asarray(Image.fromarray(scene.image).resize((512, 384), Image.Resampling.NEAREST))
    regions = ClassicalSegmenter(ClassicalConfig(max_side=128)).segment(big)
    assert regions and all(r.size == (384, 512) for r in regions)
    areas = [r.area for r in regions]
    assert areas == sorted(areas, reverse=True)
    assert min(areas) >= 0.002 * 384 * 512
    for truth in scene.masks:
        resized = np.asarray(Image.fromarray(truth).resize((512, 384), Image.Resampling.NEAREST))
        assert best_iou(resized, regions) >= 0.75


def test_classical_points_and_boxes():
    scene = scenes(1, seed=5)[0]
    segmenter = ClassicalSegmenter()
    truth = scene.masks[-1]  # drawn last: fully visible
    rows, cols = np.nonzero(truth)
    pick = len(rows) // 2
    (region,) = segmenter.from_points(scene.image, [(cols[pick], rows[pick])])
    assert iou(truth, region.mask()) >= 0.9
    box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    (boxed,) = segmenter.from_boxes(scene.image, [box])
    assert iou(truth, boxed.mask()) >= 0.8
    with pytest.raises(ValueError, match="outside"):
        segmenter.from_points(scene.image, [(500, 5)])
    with pytest.raises(ValueError, match="empty"):
        segmenter.from_boxes(scene.image, [(10, 10, 10, 20)])


def test_region_round_trips():
    mask = np.zeros((20, 30), dtype=bool)
    mask[2:7, 4:12] = True
    region = Region.from_mask(mask, 0.9, 0.8)
    assert region.bbox == (4.0, 2.0, 8.0, 5.0) and region.area == 40
    again = Region.from_dict(region.to_dict())
    assert again == region
    assert np.array_equal(RleMasks([again])[0], mask)


def test_stability_score_is_the_iou_of_two_thresholds():
    logits = torch.tensor([[[2.0, 0.5, -0.5, -2.0]]])
    # > +1: one pixel; > -1: three pixels.
    assert stability_score(logits, 0.0, 1.0).tolist() == pytest.approx([1 / 3])


# --------------------------------------------------------------------------------------------
# SAM (transformers' SamModel, tiny random weights from a local directory)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    from transformers import (
        SamConfig as HFSamConfig,
    )
    from transformers import (
        SamMaskDecoderConfig,
        SamModel,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    size = 64
    config = HFSamConfig(
        vision_config=SamVisionConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=128,
            output_channels=32,
            image_size=size,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=16,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=32, image_size=size, mask_input_channels=8
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=64,
            iou_head_hidden_dim=32,
        ),
    )
    torch.manual_seed(0)
    model = SamModel(config)
    # At the default initialisation every point prompt yields nearly the same whole-image mask;
    # wider random weights give masks (and IoU predictions) that differ from point to point.
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim > 1:
                weight.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("sam")
    model.save_pretrained(path)
    return str(path)


def test_sam_defaults_are_sams():
    config = SamConfig(weights="x")
    assert (config.points_per_side, config.pred_iou_thresh, config.stability_score_thresh) == (
        32,
        0.88,
        0.95,
    )
    assert config.box_nms_thresh == 0.7 and config.min_mask_region_area == 0
    with pytest.raises(ValueError, match="weights"):
        SamConfig(weights="")
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        SamConfig(weights="x", pred_iou_thresh=2.0)


def _pipeline_masks(sam_dir, image, **kwargs) -> list[tuple[bytes, float]]:
    """transformers' own mask-generation pipeline on the same weights: (mask bytes, score)."""
    from transformers import pipeline

    segmenter = SamSegmenter(SamConfig(weights=sam_dir))
    generate = pipeline(
        "mask-generation", model=segmenter.model, image_processor=segmenter.processor, device="cpu"
    )
    out = generate(Image.fromarray(image), **kwargs)
    return [
        (np.asarray(mask, dtype=np.uint8).tobytes(), float(score))
        for mask, score in zip(out["masks"], out["scores"], strict=True)
    ]


@pytest.mark.parametrize(
    "ours, theirs",
    [
        # Both filters on (thresholds lowered for random weights), NMS off: 48 candidates -> 5.
        (
            dict(pred_iou_thresh=0.1, stability_score_thresh=0.5, stability_score_offset=0.05),
            dict(pred_iou_thresh=0.1, stability_score_thresh=0.5, stability_score_offset=0.05),
        ),
        # Filters off, NMS on: 48 -> 4.
        (
            dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.9),
            dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, crops_nms_thresh=0.9),
        ),
        # One layer of crops (masks at a crop's inner edge dropped), small upscale chunks.
        (
            dict(
                pred_iou_thresh=0.0,
                stability_score_thresh=0.0,
                crop_n_layers=1,
                points_per_side=2,
                upscale_budget_bytes=3 * 4 * 100 * 120,
            ),
            dict(
                pred_iou_thresh=0.0,
                stability_score_thresh=0.0,
                crops_n_layers=1,
                points_per_crop=2,
            ),
        ),
    ],
)
def test_sam_segment_everything_is_transformers_pipeline(sam_dir, ours, theirs):
    image = scenes(1)[0].image[:100, :120]
    theirs = {"points_per_crop": 4, "points_per_batch": 10, "crops_nms_thresh": 1.0, **theirs}
    expected = _pipeline_masks(sam_dir, image, **theirs)
    ours = {"points_per_side": 4, "points_per_batch": 10, "box_nms_thresh": 1.0, **ours}
    regions = SamSegmenter(SamConfig(weights=sam_dir, **ours)).segment(image)
    got = [(r.mask().tobytes(), r.predicted_iou) for r in regions]
    assert len(expected) >= 2
    # Same masks, each with its own predicted IoU (ours come largest first, theirs by score).
    got, expected = sorted(got), sorted(expected)
    assert [mask for mask, _ in got] == [mask for mask, _ in expected]
    assert [score for _, score in got] == pytest.approx([s for _, s in expected], abs=1e-6)
    for region in regions:
        assert region.size == (100, 120)
        assert 0.0 <= region.stability_score <= 1.0
    assert [r.area for r in regions] == sorted((r.area for r in regions), reverse=True)


def test_sam_thresholds_and_small_region_cleaning(sam_dir):
    image = scenes(1)[0].image[:100, :120]
    # Random weights predict no confident masks: at SAM's thresholds nothing is kept.
    strict = SegmenterConfig(sam=SamConfig(weights=sam_dir, points_per_side=4)).build()
    assert isinstance(strict, SamSegmenter)
    assert strict.segment(image) == []
    # Cleaning leaves no hole or island under the area in any mask (there are some without it).
    area = 40
    config = dict(
        weights=sam_dir,
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=0.9,
    )
    raw = SamSegmenter(SamConfig(**config)).segment(image)
    cleaned = SamSegmenter(SamConfig(**config, min_mask_region_area=area)).segment(image)
    assert raw and cleaned

    def smallest_component(region: Region) -> int:
        from scipy import ndimage as ndi

        mask = region.mask().astype(bool)
        sizes = []
        for part in (mask, ~mask):
            labels, n = ndi.label(part)
            sizes += np.bincount(labels.ravel())[1:].tolist() if n > 1 else []
        return min(sizes, default=area)

    assert min(smallest_component(r) for r in raw) < area
    assert min(smallest_component(r) for r in cleaned) >= area


def test_sam_points_and_boxes(sam_dir):
    image = scenes(1)[0].image
    sam = SamSegmenter(SamConfig(weights=sam_dir))
    from_points = sam.from_points(image, [(10, 10), (100, 60)])
    from_boxes = sam.from_boxes(image, [(0, 0, 64, 64), (30, 40, 120, 127)])
    assert len(from_points) == 2 and len(from_boxes) == 2
    assert all(r.size == (128, 128) for r in from_points + from_boxes)
