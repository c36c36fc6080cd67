"""The frozen open_clip ConvNeXt image tower and its multi-level features."""

from __future__ import annotations

import torch
from torch import nn

from osprey.model.config import LEVELS, VisionConfig


class ClipImageTower(nn.Module):
    """Only the image half of an open_clip CLIP model, so weights load under `visual.*`."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        vision_cfg = CLIPVisionCfg(
            timm_model_name=config.timm_model_name,
            timm_model_pretrained=False,
            timm_pool="",
            timm_proj="mlp",
            timm_drop=0.0,
            timm_drop_path=config.drop_path,
            image_size=config.clip_image_size,
        )
        self.visual = _build_vision_tower(config.embed_dim, vision_cfg)


class VisionTower(nn.Module):
    """Frozen ConvNeXt: returns the four stage outputs res2..res5 and the res4 image tokens."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = ClipImageTower(config)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VisionTower:
        # Always eval: the tower is frozen, and drop-path must never fire on its features.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        trunk = self.vision_tower.visual.trunk
        dtype = next(trunk.parameters()).dtype
        stages = trunk.forward_intermediates(images.to(dtype), intermediates_only=True)
        return dict(zip(LEVELS, stages, strict=True))

    @staticmethod
    def image_tokens(features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, C, h, w) res4 map -> (B, h*w, C) tokens, row-major as the release flattens it."""
        return features["res4"].flatten(2).transpose(1, 2)
