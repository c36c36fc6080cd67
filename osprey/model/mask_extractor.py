"""Osprey's mask-aware visual extractor: one mask token and one spatial token per region."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from osprey.model.config import LEVELS, MaskExtractorConfig

# Added to the mask area so an empty mask pools to zeros instead of NaN.
POOL_EPS = 1e-8


def mask_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Average (C, h, w) features over each of (R, H, W) masks -> (R, C).

    The masks are bilinearly resized to the feature map and binarised (>0) first.
    """
    if masks.shape[-2:] != features.shape[-2:]:
        masks = F.interpolate(
            masks[None].to(features.dtype),
            size=features.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )[0]
    binary = (masks > 0).to(features.dtype)
    area = binary.sum(dim=(-1, -2)) + POOL_EPS
    return torch.einsum("chw,rhw->rc", features, binary) / area[:, None]


class SpatialMLP(nn.Module):
    """Three linear layers with ReLU between them; named `layers.{0,1,2}` as in the release."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(in_dim, hidden_dim), nn.Linear(hidden_dim, hidden_dim)]
            + [nn.Linear(hidden_dim, out_dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x

    def forward32(self, x: torch.Tensor) -> torch.Tensor:
        """The same in float32 whatever the parameters' dtype."""
        for i, layer in enumerate(self.layers):
            x = _linear32(layer, x.float())
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskExtractor(nn.Module):
    """Per-level pooled features -> summed mask token; the raw mask -> spatial (pos) token."""

    def __init__(
        self, config: MaskExtractorConfig, channels: tuple[int, ...], hidden_size: int
    ) -> None:
        super().__init__()
        self.spatial_size = config.spatial_size
        for level, width in zip(LEVELS, channels, strict=True):
            self.add_module(level, nn.Linear(width, config.embed_dim))
        self.feat_linear = nn.Linear(config.embed_dim, hidden_size)
        self.mask_linear = SpatialMLP(config.spatial_size**2, config.embed_dim, hidden_size)

    def forward(
        self, features: dict[str, torch.Tensor], masks: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """features: level -> (B, C, h, w); masks: B tensors (R_i, H_i, W_i).

        Returns per-sample mask tokens and spatial tokens, each (R_i, hidden), in the module's
        dtype. The arithmetic is float32 whatever that dtype, as in the release (its layer.py):
        pooled averages over small masks and the 12544-wide spatial MLP lose too much in bf16.
        Each level's output is rounded to the features' dtype before the sum, as there.
        """
        dtype = self.feat_linear.weight.dtype
        device = self.feat_linear.weight.device
        mask_tokens, pos_tokens = [], []
        hidden = self.feat_linear.out_features
        for b, sample_masks in enumerate(masks):
            sample_masks = sample_masks.to(device=device, dtype=torch.float32)
            if sample_masks.shape[0] == 0:
                empty = sample_masks.new_zeros(0, hidden, dtype=dtype)
                mask_tokens.append(empty)
                pos_tokens.append(empty)
                continue
            summed = 0
            for level in LEVELS:
                feature = features[level][b]
                pooled = mask_pool(feature.float(), sample_masks)
                summed = summed + _linear32(getattr(self, level), pooled).to(feature.dtype).float()
            mask_tokens.append(_linear32(self.feat_linear, summed).to(dtype))
            spatial = F.interpolate(
                sample_masks[None],
                size=(self.spatial_size, self.spatial_size),
                mode="bilinear",
                align_corners=False,
            )[0]
            pos_tokens.append(self.mask_linear.forward32(spatial.flatten(1)).to(dtype))
        return mask_tokens, pos_tokens


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Upcast copies: the parameters keep the model's dtype (and their optimizer state).
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x, layer.weight.float(), bias)
