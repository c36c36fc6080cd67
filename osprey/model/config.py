"""Typed configuration of the Osprey model, with named presets.

A preset is a function returning a fresh config; presets derive from one another by changing
fields, so `tiny` is `osprey-7b` with smaller sizes and the same architecture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# OpenAI CLIP normalisation, which the LAION ConvNeXt checkpoints were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LEVELS = ("res2", "res3", "res4", "res5")


@dataclass(kw_only=True)
class VisionConfig:
    """The open_clip ConvNeXt image tower (frozen)."""

    timm_model_name: str = "convnext_large"
    # Width of open_clip's projection head: unused by Osprey's forward, but its weights exist.
    embed_dim: int = 768
    # The open_clip model's nominal resolution (convnext_large_d_320); Osprey feeds image_size.
    clip_image_size: int = 320
    image_size: int = 512
    channels: tuple[int, int, int, int] = (192, 384, 768, 1536)
    drop_path: float = 0.1
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # Local `open_clip_pytorch_model.bin` (or .safetensors) to load at build time.
    weights: str | None = None

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if len(self.channels) != 4:
            raise ValueError(f"vision.channels needs 4 stage widths, got {self.channels}")
        if self.image_size % 32:
            raise ValueError(f"vision.image_size must be a multiple of 32, got {self.image_size}")

    @property
    def image_token_channels(self) -> int:
        return self.channels[2]

    @property
    def num_image_tokens(self) -> int:
        # Image tokens come from res4, the stride-16 stage.
        return (self.image_size // 16) ** 2


@dataclass(kw_only=True)
class MaskExtractorConfig:
    """The mask-aware visual extractor: mask pooling at four levels plus a spatial token."""

    embed_dim: int = 1024
    # Side of the raw mask fed to the spatial-token MLP (112 in the release).
    spatial_size: int = 112

    def __post_init__(self) -> None:
        if self.spatial_size <= 0 or self.embed_dim <= 0:
            raise ValueError("mask_extractor.spatial_size and embed_dim must be positive")


@dataclass(kw_only=True)
class LLMConfig:
    """LLaMA hyper-parameters (Vicuna-7B v1.5 by default)."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # A local Vicuna (HF-format) directory to initialise the LLM from.
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"llm.hidden_size {self.hidden_size} is not divisible by "
                f"llm.num_attention_heads {self.num_attention_heads}"
            )

    def to_llama_config(self) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )


@dataclass(kw_only=True)
class OspreyConfig:
    name: str = "osprey-7b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    mask_extractor: MaskExtractorConfig = field(default_factory=MaskExtractorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector_type: str = "mlp2x_gelu"
    # Ids of the added <mask> and <pos> tokens (32000/32001 in the released tokenizer). They may
    # lie outside the embedding matrix: their embeddings are always replaced.
    mask_token_id: int = 32000
    pos_token_id: int = 32001
    max_length: int = 2048
    # A released stage-1 `mm_projector.bin` to initialise the projector from.
    projector_weights: str | None = None

    def __post_init__(self) -> None:
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(f"projector_type {self.projector_type!r}: only 'mlp2x_gelu' exists")
        if self.mask_token_id == self.pos_token_id:
            raise ValueError("mask_token_id and pos_token_id must differ")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OspreyConfig:
        data = dict(data)
        sub = {
            "vision": VisionConfig,
            "mask_extractor": MaskExtractorConfig,
            "llm": LLMConfig,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Osprey config keys: {sorted(unknown)}")
        for key, kind in sub.items():
            if key in data and isinstance(data[key], dict):
                data[key] = kind(**data[key])
        return cls(**data)

    def replace(self, **changes: Any) -> OspreyConfig:
        return dataclasses.replace(self, **changes)


def osprey_7b() -> OspreyConfig:
    """The released Osprey-7B: convnext_large_d_320 at 512x512 and Vicuna-7B v1.5."""
    return OspreyConfig(name="osprey-7b")


def tiny() -> OspreyConfig:
    """Same architecture at toy sizes: builds and runs a forward pass in a second on a CPU."""
    return OspreyConfig(
        name="tiny",
        vision=VisionConfig(
            timm_model_name="convnext_atto",
            embed_dim=64,
            clip_image_size=128,
            image_size=128,
            channels=(40, 80, 160, 320),
            drop_path=0.0,
        ),
        # A 56x56 spatial mask learns faster than 112x112 at this size (measured, STACK.md).
        mask_extractor=MaskExtractorConfig(embed_dim=128, spatial_size=56),
        llm=LLMConfig(
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1024,
            max_position_embeddings=2048,
        ),
        mask_token_id=1024,
        pos_token_id=1025,
    )


PRESETS: dict[str, Callable[[], OspreyConfig]] = {
    "osprey-7b": osprey_7b,
    "tiny": tiny,
}


def get_config(name: str) -> OspreyConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
