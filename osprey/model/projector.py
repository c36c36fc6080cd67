"""The image-token projector (`mm_projector`)."""

from torch import nn


def build_projector(in_dim: int, hidden_size: int) -> nn.Sequential:
    # mlp2x_gelu; a Sequential so keys are `0.*` and `2.*` as in the release.
    return nn.Sequential(
        nn.Linear(in_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
    )
