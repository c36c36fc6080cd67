"""Image preprocessing exactly as the released Osprey's: transformers' CLIP image processor with
the settings the reference builds it with (shortest edge to S with PIL bicubic on the uint8 image,
the long edge truncated to an integer, rescale by 1/255, CLIP normalisation, no centre crop), then
a bilinear stretch to S x S (no crop, no pad)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from osprey.model.config import VisionConfig


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    return image


@lru_cache(maxsize=8)
def clip_image_processor(size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """The PIL-backed CLIP processor the reference builds (its `CLIPImageProcessor` of 4.31)."""
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import PILImageResampling

    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


def preprocess_image(image: Image.Image | np.ndarray, config: VisionConfig) -> torch.Tensor:
    """PIL image or uint8 HxWx3 array -> (3, S, S) float32 tensor."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(to_rgb_array(image), dtype=np.uint8))
    size = config.image_size
    processor = clip_image_processor(size, tuple(config.mean), tuple(config.std))
    pixels = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    return F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False)[0]
