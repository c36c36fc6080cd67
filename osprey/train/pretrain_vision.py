"""Pretraining the tiny open_clip ConvNeXt tower on shapes images: our stand-in for LAION CLIP.

Osprey freezes a pretrained CLIP tower and reads region features by mask pooling its four stage
outputs. A frozen *random* tower keeps colour but loses shape (STACK.md), so the quickstart first
trains the tower with dense supervision: 1x1-conv heads on res2..res5 predict, for every feature
cell, the share of each colour and each shape kind under it, and a linear head on the mask-pooled
features of each region predicts its colour and shape. The heads are thrown away; the saved file
holds only the tower, under open_clip's `visual.*` keys, so `VisionConfig.weights` loads it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from osprey.data.shapes import COLOURS, SHAPES, Scene, ShapesConfig, label_maps, render_sample
from osprey.model.config import LEVELS, VisionConfig, tiny
from osprey.model.image_processing import preprocess_image
from osprey.model.mask_extractor import mask_pool
from osprey.model.vision import ClipImageTower

# Pretraining draws 4-6 shapes per image (the data set: 2-5): ~40% more regions per step,
# which measured faster shape learning per step than the data set's own mix.
PRETRAIN_SHAPES = ShapesConfig(min_shapes=4, max_shapes=6)

# Label-map classes: background plus one per colour / shape kind (osprey.data.shapes.label_maps).
N_COLOUR_CLASSES = 1 + len(COLOURS)
N_SHAPE_CLASSES = 1 + len(SHAPES)


@dataclass(slots=True)
class ShapesBatch:
    """Rendered images as the model sees them, with dense and per-region targets."""

    images: torch.Tensor  # (B, 3, S, S) preprocessed
    colour_maps: torch.Tensor  # (B, H, W) int64 label maps at render size
    shape_maps: torch.Tensor  # (B, H, W)
    masks: list[torch.Tensor]  # B tensors (R_i, H, W) float
    region_colours: torch.Tensor  # (sum R_i,) index into COLOURS
    region_shapes: torch.Tensor  # (sum R_i,) index into SHAPES


def scenes_to_batch(scenes: Sequence[Scene], config: VisionConfig) -> ShapesBatch:
    maps = [label_maps(s) for s in scenes]
    labels = [label for s in scenes for label in s.labels]
    return ShapesBatch(
        images=torch.stack([preprocess_image(s.image, config) for s in scenes]),
        colour_maps=torch.from_numpy(np.stack([c for c, _ in maps])),
        shape_maps=torch.from_numpy(np.stack([k for _, k in maps])),
        masks=[torch.from_numpy(s.masks).float() for s in scenes],
        region_colours=torch.tensor([COLOURS.index(label.colour) for label in labels]),
        region_shapes=torch.tensor([SHAPES.index(label.shape) for label in labels]),
    )


def render_scenes(rng: np.random.Generator, n: int, cfg: ShapesConfig | None) -> list[Scene]:
    return [render_sample(rng, cfg) for _ in range(n)]


def tower_features(tower: ClipImageTower, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """res2..res5 exactly as osprey.model.vision.VisionTower computes them, with gradients."""
    stages = tower.visual.trunk.forward_intermediates(images, intermediates_only=True)
    return dict(zip(LEVELS, stages, strict=True))


def pooled_region_features(
    features: dict[str, torch.Tensor], masks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mask-pooled features of every region at the four levels, concatenated: (sum R_i, sum C).

    The same pooling the mask extractor applies, so a probe on these sees what Osprey sees.
    """
    rows = [
        torch.cat([mask_pool(features[level][b], m) for level in LEVELS], dim=-1)
        for b, m in enumerate(masks)
    ]
    return torch.cat(rows)


class PretrainHeads(nn.Module):
    """Throw-away heads: per-level dense colour/shape logits and a region classifier."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        out = N_COLOUR_CLASSES + N_SHAPE_CLASSES
        levels = zip(LEVELS, channels, strict=True)
        self.dense = nn.ModuleDict({lv: nn.Conv2d(c, out, 1) for lv, c in levels})
        self.region = nn.Linear(sum(channels), len(COLOURS) + len(SHAPES))


def soft_targets(label_map: torch.Tensor, n_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels -> (B, n, h, w) share of each class in every feature cell.

    Area shares rather than a nearest label: a stride-32 cell is mostly mixed, and its share of
    each shape is what mask pooling will average over.
    """
    one_hot = F.one_hot(label_map, n_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, size)


def dense_loss(
    heads: PretrainHeads, features: dict[str, torch.Tensor], batch: ShapesBatch
) -> torch.Tensor:
    total = 0.0
    for level in LEVELS:
        logits = heads.dense[level](features[level])
        size = tuple(logits.shape[-2:])
        colour_logits, shape_logits = logits.split([N_COLOUR_CLASSES, N_SHAPE_CLASSES], dim=1)
        colour = soft_targets(batch.colour_maps, N_COLOUR_CLASSES, size)
        shape = soft_targets(batch.shape_maps, N_SHAPE_CLASSES, size)
        total = (
            total + F.cross_entropy(colour_logits, colour) + F.cross_entropy(shape_logits, shape)
        )
    return total / len(LEVELS)


def region_loss(
    heads: PretrainHeads, features: dict[str, torch.Tensor], batch: ShapesBatch
) -> torch.Tensor:
    logits = heads.region(pooled_region_features(features, batch.masks))
    colour_logits, shape_logits = logits.split([len(COLOURS), len(SHAPES)], dim=1)
    return F.cross_entropy(colour_logits, batch.region_colours) + F.cross_entropy(
        shape_logits, batch.region_shapes
    )


def cosine_schedule(
    optimizer: torch.optim.Optimizer, steps: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` steps (capped at `steps`), then cosine decay to 0: the
    schedule the Osprey stages train with (transformers')."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, min(warmup, steps), steps)


def set_layer_scale(tower: ClipImageTower, value: float) -> None:
    """Start every ConvNeXt block's LayerScale `gamma` at `value`.

    timm initialises it to 1e-6, which leaves every block the identity until AdamW has grown it;
    from a larger start the blocks' non-linear features (what shape needs) learn sooner.
    """
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if name.endswith(".gamma"):
                param.fill_(value)


def save_tower(tower: ClipImageTower, out_file: str | os.PathLike) -> str:
    """torch.save the `visual.*` state dict, the layout of open_clip_pytorch_model.bin."""
    out_file = os.fspath(out_file)
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    stray = [k for k in state if not k.startswith("visual.")]
    if stray:
        raise RuntimeError(f"the image tower's state has keys outside visual.*: {stray[:5]}")
    torch.save(state, out_file)
    return out_file


def pretrain_vision_tower(
    out_file: str | os.PathLike,
    *,
    config: VisionConfig | None = None,
    steps: int = 600,
    batch_size: int = 16,
    seed: int = 0,
    shapes_config: ShapesConfig | None = None,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup: int = 20,
    region_weight: float = 1.0,
    layer_scale_init: float | None = 1.0,
    log_every: int = 50,
) -> dict[str, float]:
    """Train the image tower on freshly rendered shapes images and save it to `out_file`.

    Returns the final losses, steps, seconds and steps/s.
    """
    config = config or tiny().vision
    shapes_config = shapes_config or PRETRAIN_SHAPES
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    tower = ClipImageTower(config)
    if layer_scale_init is not None:
        set_layer_scale(tower, layer_scale_init)
    heads = PretrainHeads(config.channels)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = cosine_schedule(optimizer, steps, warmup)
    tower.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = scenes_to_batch(render_scenes(rng, batch_size, shapes_config), config)
        features = tower_features(tower, batch.images)
        dense = dense_loss(heads, features, batch)
        region = region_loss(heads, features, batch)
        loss = dense + region_weight * region
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            rate = (step + 1) / (time.perf_counter() - start)
            print(
                f"vision step {step + 1}/{steps} loss {loss.item():.4f} "
                f"(dense {dense.item():.4f} region {region.item():.4f}) {rate:.2f} steps/s",
                flush=True,
            )
    seconds = time.perf_counter() - start
    tower.eval()
    save_tower(tower, out_file)
    return {
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "loss": loss.item(),
        "dense_loss": dense.item(),
        "region_loss": region.item(),
    }


# ---- probing: do mask-pooled features carry colour and shape? ----------------------------


@torch.no_grad()
def region_dataset(
    tower: ClipImageTower,
    config: VisionConfig,
    n_images: int,
    seed: int,
    shapes_config: ShapesConfig | None = None,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask-pooled features, colour and shape index of every region of n rendered images."""
    rng = np.random.default_rng([seed, 2])
    tower.eval()
    xs, colours, shapes = [], [], []
    for start in range(0, n_images, chunk):
        batch = scenes_to_batch(
            render_scenes(rng, min(chunk, n_images - start), shapes_config), config
        )
        xs.append(pooled_region_features(tower_features(tower, batch.images), batch.masks))
        colours.append(batch.region_colours)
        shapes.append(batch.region_shapes)
    return torch.cat(xs), torch.cat(colours), torch.cat(shapes)


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    iterations: int = 300,
    lr: float = 0.05,
) -> float:
    """Held-out accuracy of a multinomial logistic regression on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    generator = torch.Generator().manual_seed(0)
    probe = nn.Linear(train_x.shape[1], n_classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(iterations):
            loss = F.cross_entropy(probe(train_x), train_y) + 1e-4 * probe.weight.square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (probe(test_x).argmax(-1) == test_y).float().mean().item()


def probe_tower(
    tower: ClipImageTower,
    config: VisionConfig,
    *,
    train_images: int = 400,
    test_images: int = 150,
    seed: int = 1234,
    shapes_config: ShapesConfig | None = None,
) -> dict[str, float]:
    """Linear-probe accuracy for colour and shape kind on held-out rendered regions."""
    train = region_dataset(tower, config, train_images, seed, shapes_config)
    test = region_dataset(tower, config, test_images, seed + 1, shapes_config)
    return {
        "colour_accuracy": linear_probe_accuracy(train[0], train[1], test[0], test[1]),
        "shape_accuracy": linear_probe_accuracy(train[0], train[2], test[0], test[2]),
        "train_regions": len(train[0]),
        "test_regions": len(test[0]),
    }


# ---- command line: how osprey.train.bases runs this beside the LLM's pretraining ----------


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    import argparse
    import json

    from osprey.model.config import OspreyConfig

    parser = argparse.ArgumentParser(
        prog="python -m osprey.train.pretrain_vision",
        description="Pretrain the tiny open_clip ConvNeXt tower on rendered shapes images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="the open_clip_pytorch_model.bin to write")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--config", help="an osprey_config.json whose `vision` section to use (default: tiny)"
    )
    parser.add_argument("--metrics", help="write the returned metrics to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = None
    if args.config:
        with open(args.config) as f:
            config = OspreyConfig.from_dict(json.load(f)).vision
    metrics = pretrain_vision_tower(args.out, config=config, steps=args.steps, seed=args.seed)
    if args.metrics:
        with open(args.metrics, "w") as f:
            json.dump(metrics, f)
    return metrics


if __name__ == "__main__":
    main()
