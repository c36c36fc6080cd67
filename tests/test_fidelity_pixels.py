"""The released Osprey-7B's pixels and precision, against the reference's algorithms.

Pixels: the reference (datasets/*.py, demo/osprey_inference.py) runs transformers 4.31's
CLIPImageProcessor (shortest edge 512, resample=3, rescale 1/255, CLIP mean/std) with
do_center_crop=False, then F.interpolate to 512x512 (bilinear, align_corners=False). Re-implemented
here with PIL and numpy. Precision: model/layer.py's MaskExtractor computes in float32 whatever the
model's dtype; re-implemented here from its algorithm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import osprey
from osprey.model.config import VisionConfig
from osprey.model.image_processing import preprocess_image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def reference_pixels(image: Image.Image, size: int = 512) -> torch.Tensor:
    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # truncated, as get_resize_output_image_size does
    target = (new_long, size) if w >= h else (size, new_long)
    resized = np.asarray(image.resize(target, resample=Image.BICUBIC))  # uint8
    x = (resized * (1 / 255)).astype(np.float32)
    x = (x - MEAN) / STD
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]


def noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize(
    "w,h,mode", [(640, 480, "RGB"), (333, 517, "RGB"), (1001, 499, "L"), (512, 512, "RGBA")]
)
def test_pixels_equal_the_reference(w, h, mode):
    image = noise(w, h, seed=w, mode=mode)
    ours = preprocess_image(image, VisionConfig())
    assert ours.shape == (3, 512, 512) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference_pixels(image), rtol=0, atol=1e-6)
    # A uint8 array of the same pixels is the same image.
    rgb = np.asarray(image.convert("RGB"))
    torch.testing.assert_close(preprocess_image(rgb, VisionConfig()), ours, rtol=0, atol=0)


def test_short_edge_size_is_truncated():
    from osprey.model.image_processing import clip_image_processor

    cfg = VisionConfig()
    processor = clip_image_processor(512, tuple(cfg.mean), tuple(cfg.std))
    pixels = processor(noise(640, 480), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape[-2:]) == (512, 682)  # 512 * 640 / 480 = 682.67


# ---- mask extractor precision ------------------------------------------------------------


def reference_mask_tokens(extractor, features, masks):
    """model/layer.py MaskExtractor.forward: masks and features to float32, each level's Linear
    in float32 with its output back in the features' dtype, the sum and feat_linear in float32;
    the spatial MLP on the float32 mask."""
    f32 = {name: p.detach().float() for name, p in extractor.named_parameters()}
    mask_tokens, pos_tokens = [], []
    for b, mask in enumerate(masks):
        mask = mask[None].float()
        levels = []
        for level in ("res2", "res3", "res4", "res5"):
            feat = features[level][b][None]
            raw_dtype = feat.dtype
            feat = feat.float()
            m = F.interpolate(mask, size=feat.shape[-2:], mode="bilinear", align_corners=False)
            m = (m > 0).float()
            m = m / (m.sum(dim=(-1, -2), keepdim=True) + 1e-8)
            pooled = torch.einsum("bchw,bqhw->bqc", feat, m)[0]
            out = pooled @ f32[f"{level}.weight"].T + f32[f"{level}.bias"]
            levels.append(out.to(raw_dtype).float())
        summed = torch.stack(levels).sum(0)
        mask_tokens.append(summed @ f32["feat_linear.weight"].T + f32["feat_linear.bias"])
        side = extractor.spatial_size
        x = F.interpolate(mask, size=side, mode="bilinear", align_corners=False)
        x = x.reshape(mask.shape[1], -1)
        for i in range(3):
            x = x @ f32[f"mask_linear.layers.{i}.weight"].T + f32[f"mask_linear.layers.{i}.bias"]
            x = F.relu(x) if i < 2 else x
        pos_tokens.append(x)
    return mask_tokens, pos_tokens


def test_bf16_mask_tokens_equal_the_float32_computation():
    torch.manual_seed(0)
    model = osprey.build_model("tiny").to(torch.bfloat16)
    extractor = model.mask_extractor
    assert extractor.feat_linear.weight.dtype == torch.bfloat16
    size = model.config.vision.image_size
    with torch.no_grad():
        features = model.vision_tower(torch.randn(2, 3, size, size, dtype=torch.bfloat16))
        masks = [torch.rand(3, 96, 80) > 0.6, torch.rand(1, 64, 64) > 0.3]
        ours_mask, ours_pos = model.encode_regions(features, masks)
        ref_mask, ref_pos = reference_mask_tokens(extractor, features, masks)
    for ours, ref in zip(ours_mask + ours_pos, ref_mask + ref_pos, strict=True):
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours, ref.to(torch.bfloat16), rtol=0, atol=0)
    # The parameters stay in the model's dtype (the reference converts its modules in place).
    assert extractor.feat_linear.weight.dtype == torch.bfloat16
