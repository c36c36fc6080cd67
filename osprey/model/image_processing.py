"""Image preprocessing exactly as Osprey's: shortest edge to S (bicubic), CLIP normalisation,
then a bilinear stretch to S x S (no crop, no pad)."""

from __future__ import annotations

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


def preprocess_image(image: Image.Image | np.ndarray, config: VisionConfig) -> torch.Tensor:
    """PIL image or uint8 HxWx3 array -> (3, S, S) float tensor."""
    pixels = torch.from_numpy(np.array(to_rgb_array(image), dtype=np.uint8)).permute(2, 0, 1)
    x = pixels.float().div_(255.0)[None]
    size = config.image_size
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    short = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(x, size=short, mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[0]
