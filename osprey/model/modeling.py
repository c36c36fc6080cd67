"""The Osprey model: a LLaMA whose input embeddings carry image tokens and region tokens.

Module names follow the released checkpoints (`model.*` is the LLaMA body with the vision tower
and projector attached, `lm_head`, and a top-level `mask_extractor`), so `state_dict()` loads
released weights with strict key matching.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaModel,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from osprey.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from osprey.model.config import OspreyConfig
from osprey.model.mask_extractor import MaskExtractor
from osprey.model.projector import build_projector
from osprey.model.vision import VisionTower

# transformers 5.x renamed LlamaModel.forward's `past_key_values` to `cache` (the old name warns,
# as argument and as output attribute); use whichever name the installed version takes.
_CACHE_ARG = (
    "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else ("past_key_values")
)


class OspreyLlamaModel(LlamaModel):
    """The LLaMA body, carrying the vision tower and projector as the release names them."""

    def __init__(self, config: OspreyConfig) -> None:
        super().__init__(config.llm.to_llama_config())
        self.vision_tower = VisionTower(config.vision)
        self.mm_projector = build_projector(
            config.vision.image_token_channels, config.llm.hidden_size
        )


def kv_cache(output: Any) -> Any:
    """The KV cache of a transformers model output, read without the deprecated name."""
    return getattr(output, _CACHE_ARG)


@dataclass
class MultimodalInputs:
    """Spliced model inputs: what the LLaMA body consumes."""

    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L), 1 = real token
    position_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B, L) or None


@dataclass
class OspreyOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    past_key_values: Any = None


class OspreyForCausalLM(nn.Module):
    def __init__(self, config: OspreyConfig) -> None:
        super().__init__()
        self.config = config
        self.model = OspreyLlamaModel(config)
        self.lm_head = nn.Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False)
        self.mask_extractor = MaskExtractor(
            config.mask_extractor, config.vision.channels, config.llm.hidden_size
        )

    # ---- parts -------------------------------------------------------------------------

    @property
    def vision_tower(self) -> VisionTower:
        return self.model.vision_tower

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def gradient_checkpointing_enable(self) -> None:
        # Non-reentrant so frozen inputs (spliced embeddings) still get gradients through it.
        self.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, 3, S, S) -> projected image tokens (B, N, H) and the four feature levels."""
        features = self.vision_tower(images)
        tokens = VisionTower.image_tokens(features).to(self.mm_projector_dtype)
        return self.model.mm_projector(tokens), features

    @property
    def mm_projector_dtype(self) -> torch.dtype:
        return self.model.mm_projector[0].weight.dtype

    def encode_regions(
        self, features: dict[str, torch.Tensor], masks: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.mask_extractor(features, masks)

    # ---- splicing ----------------------------------------------------------------------

    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        mask_tokens: list[torch.Tensor] | None = None,
        pos_tokens: list[torch.Tensor] | None = None,
        padding_side: str = "right",
    ) -> MultimodalInputs:
        """Replace the image placeholder by the image tokens and each <mask>/<pos> by its region.

        input_ids (B, T) may be padded on either side; `attention_mask` marks the real tokens.
        Image and region positions get IGNORE labels.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embed = self.model.embed_tokens
        cfg = self.config
        seqs: list[torch.Tensor] = []
        seq_labels: list[torch.Tensor] = []
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids = input_ids[b][keep]
            lab = labels[b][keep] if labels is not None else None
            is_mask = ids == cfg.mask_token_id
            is_pos = ids == cfg.pos_token_id
            is_image = ids == IMAGE_TOKEN_INDEX
            n_regions = 0 if mask_tokens is None else mask_tokens[b].shape[0]
            if int(is_mask.sum()) != n_regions or int(is_pos.sum()) != n_regions:
                raise ValueError(
                    f"sample {b}: {int(is_mask.sum())} <mask> and {int(is_pos.sum())} <pos> "
                    f"tokens but {n_regions} masks; each region needs one <mask><pos>"
                )
            special = is_mask | is_pos | is_image
            x = embed(torch.where(special, torch.zeros_like(ids), ids))
            if n_regions:
                x = x.index_put((is_mask.nonzero()[:, 0],), mask_tokens[b].to(x.dtype))
                x = x.index_put((is_pos.nonzero()[:, 0],), pos_tokens[b].to(x.dtype))
            if lab is not None:
                lab = lab.masked_fill(special, IGNORE_INDEX)
            n_images = int(is_image.sum())
            if n_images > 1:
                raise ValueError(f"sample {b}: {n_images} <image> placeholders, at most 1 allowed")
            if n_images == 1:
                if image_embeds is None:
                    raise ValueError(f"sample {b} has an <image> placeholder but no image")
                at = int(is_image.nonzero()[0, 0])
                img = image_embeds[b].to(x.dtype)
                x = torch.cat([x[:at], img, x[at + 1 :]])
                if lab is not None:
                    ignore = lab.new_full((img.shape[0],), IGNORE_INDEX)
                    lab = torch.cat([lab[:at], ignore, lab[at + 1 :]])
            seqs.append(x)
            if lab is not None:
                seq_labels.append(lab)
        return _pad(seqs, seq_labels if labels is not None else None, padding_side)

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        masks: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> MultimodalInputs:
        image_embeds, mask_tokens, pos_tokens = None, None, None
        if images is not None:
            image_embeds, features = self.encode_images(images)
            if masks is not None:
                if len(masks) != images.shape[0]:
                    raise ValueError(f"{len(masks)} mask sets for {images.shape[0]} images")
                mask_tokens, pos_tokens = self.encode_regions(features, masks)
        elif masks is not None and any(m.shape[0] for m in masks):
            raise ValueError("masks were given without images")
        return self.splice(
            input_ids, attention_mask, labels, image_embeds, mask_tokens, pos_tokens, padding_side
        )

    # ---- forward -----------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        masks: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
    ) -> OspreyOutput:
        inputs = self.prepare_inputs(input_ids, attention_mask, images, masks, labels)
        return self.forward_embeds(inputs)

    def forward_embeds(
        self, inputs: MultimodalInputs, past_key_values: Any = None, use_cache: bool = False
    ) -> OspreyOutput:
        out = self.model(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=use_cache,
            **{_CACHE_ARG: past_key_values},
        )
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if inputs.labels is not None:
            loss = causal_lm_loss(logits, inputs.labels)
        return OspreyOutput(
            logits=logits,
            loss=loss,
            labels=inputs.labels,
            past_key_values=kv_cache(out),
        )

    # ---- generation --------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: list[list[int]],
        images: torch.Tensor | None = None,
        masks: list[torch.Tensor] | None = None,
        *,
        max_new_tokens: int = 64,
        eos_token_id: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Decode a batch of prompts (one image and its masks per prompt). Greedy by default.

        Returns the new token ids of each prompt, without the end token.
        """
        eos = self.config.llm.eos_token_id if eos_token_id is None else eos_token_id
        ids, attn = pad_ids(input_ids, self.config.llm.pad_token_id, "left", self.device)
        inputs = self.prepare_inputs(ids, attn, images, masks, padding_side="left")
        return self.decode(inputs, max_new_tokens, eos, temperature, top_p, generator)

    @torch.no_grad()
    def decode(
        self,
        inputs: MultimodalInputs,
        max_new_tokens: int,
        eos_token_id: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        past_key_values: Any = None,
    ) -> list[list[int]]:
        """Autoregressive decoding from spliced inputs (left-padded), optionally after a cache."""
        out = self.forward_embeds(inputs, past_key_values=past_key_values, use_cache=True)
        batch = inputs.inputs_embeds.shape[0]
        attention_mask = inputs.attention_mask
        position = inputs.position_ids[:, -1:]
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        result: list[list[int]] = [[] for _ in range(batch)]
        cache = out.past_key_values
        logits = out.logits[:, -1]
        for _ in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, generator)
            for b in (~done).nonzero()[:, 0].tolist():
                if int(token[b]) == eos_token_id:
                    done[b] = True
                else:
                    result[b].append(int(token[b]))
            if bool(done.all()):
                break
            position = position + 1
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], 1)
            step = MultimodalInputs(
                inputs_embeds=self.model.embed_tokens(token[:, None]),
                attention_mask=attention_mask,
                position_ids=position,
                labels=None,
            )
            out = self.forward_embeds(step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1]
        return result


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the labelled positions."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
    top_k: int = 0,
) -> torch.Tensor:
    """Greedy when temperature is 0; otherwise a draw after transformers' own logits warpers."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(warp_logits(logits, temperature, top_p, top_k), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def warp_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0):
    """(B, V) logits -> scores after temperature, top-k and top-p, in `generate`'s order
    (filtered tokens at -inf)."""
    return logits_warpers(temperature, top_p, top_k)(_NO_IDS, logits.float())


def logits_warpers(temperature: float, top_p: float, top_k: int = 0) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


# The warpers take the ids generated so far; temperature, top-k and top-p never read them.
_NO_IDS = torch.zeros(0, dtype=torch.long)


def pad_ids(
    sequences: list[list[int]], pad_id: int, side: str, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one (B, T) tensor and its attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[b, span] = torch.tensor(seq, dtype=torch.long)
        attn[b, span] = 1
    return ids.to(device), attn.to(device)


def _pad(
    seqs: list[torch.Tensor], labels: list[torch.Tensor] | None, side: str
) -> MultimodalInputs:
    width = max(s.shape[0] for s in seqs)
    batch, hidden = len(seqs), seqs[0].shape[-1]
    embeds = seqs[0].new_zeros(batch, width, hidden)
    attn = torch.zeros(batch, width, dtype=torch.long, device=seqs[0].device)
    padded_labels = None
    if labels is not None:
        padded_labels = torch.full(
            (batch, width), IGNORE_INDEX, dtype=torch.long, device=seqs[0].device
        )
    for b, seq in enumerate(seqs):
        n = seq.shape[0]
        span = slice(width - n, width) if side == "left" else slice(0, n)
        embeds[b, span] = seq
        attn[b, span] = 1
        if padded_labels is not None:
            padded_labels[b, span] = labels[b]
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return MultimodalInputs(embeds, attn, position_ids, padded_labels)
