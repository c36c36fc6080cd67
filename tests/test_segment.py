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
    path = tmp_path_factory.mktemp("sam")
    SamModel(config).save_pretrained(path)
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


def test_sam_automatic_mask_generation_end_to_end(sam_dir):
    image = scenes(1)[0].image[:100, :120]
    # Random weights predict no confident masks: at SAM's thresholds nothing is kept...
    strict = SegmenterConfig(sam=SamConfig(weights=sam_dir, points_per_side=4)).build()
    assert isinstance(strict, SamSegmenter)
    assert strict.segment(image) == []
    # ... with the filters off the whole path runs: grid, decoder, upscaling, NMS, cleaning.
    relaxed = SamSegmenter(
        SamConfig(
            weights=sam_dir,
            points_per_side=4,
            points_per_batch=5,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            box_nms_thresh=0.5,
            min_mask_region_area=20,
        )
    )
    regions = relaxed.segment(image)
    assert regions
    assert len(regions) <= 4 * 4 * 3
    for region in regions:
        assert region.size == (100, 120)
        assert region.area > 0
        assert isinstance(region.predicted_iou, float)
        assert 0.0 <= region.stability_score <= 1.0
    assert [r.area for r in regions] == sorted((r.area for r in regions), reverse=True)


def test_sam_points_and_boxes(sam_dir):
    image = scenes(1)[0].image
    sam = SamSegmenter(SamConfig(weights=sam_dir))
    from_points = sam.from_points(image, [(10, 10), (100, 60)])
    from_boxes = sam.from_boxes(image, [(0, 0, 64, 64), (30, 40, 120, 127)])
    assert len(from_points) == 2 and len(from_boxes) == 2
    assert all(r.size == (128, 128) for r in from_points + from_boxes)
