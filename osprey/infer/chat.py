"""Requests with their own prompt, image, regions and sampling: chat, free questions, streaming.

Each request is a conversation about one image (its human turns refer to regions as
`<region1>`, `<region2>`, ...; an image-level question has no regions) with its own
`SamplingParams`. A batch of requests decodes together: their prompts are left-padded into one
batch, the vision tower runs once for all images, and each row samples its next token with its
own temperature, top-p, top-k and seeded generator. A row leaves the batch at its end token, a
stop string, its token cap, or when its caller cancels it, so finished or abandoned requests no
longer cost decode steps.

`stream_requests` yields, per decode step, one `StreamEvent` per request (None once it is done):
the new text since the last event, and on the last one the whole `Completion`. Concatenated
deltas equal the completion's text exactly (leading and trailing whitespace are held back, as the
final text is stripped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from osprey.infer.config import SamplingParams
from osprey.model.image_processing import preprocess_image
from osprey.model.modeling import pad_ids, sample_next
from osprey.prompts import TEMPLATES, build_generation_ids, regions_overview

if TYPE_CHECKING:
    from osprey.infer.engine import ImageInput, RegionCaptioner

FinishReason = str  # "stop" (end token or stop string), "length" (token cap), "cancelled"


@dataclass
class ChatRequest:
    """One conversation about one image.

    `turns` alternate {"from": "human"|"gpt", "value": text}, ending with the human turn to
    answer; `masks[i]` ((H, W) in the image's pixel grid) is `<region{i+1}>`. With
    `list_regions`, the first turn opens by listing the regions (as Osprey-724K's conversations
    do). The image placeholder and overview line are added unless the first turn already holds
    `<image>` (as the reference's image-level questions write it).
    """

    image: ImageInput
    turns: Sequence[dict]
    masks: Sequence[np.ndarray] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    list_regions: bool = True


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids, without the end token
    prompt_tokens: int  # positions the LLM read: prompt ids with the image as its tokens
    finish_reason: FinishReason

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StreamEvent:
    delta: str  # text new since the request's previous event ("" when none is safe yet)
    completion: Completion | None = None  # set on the request's last event


@dataclass
class _Prompt:
    ids: list[int]
    masks: list[np.ndarray]  # the i-th <mask>'s region


class _Row:
    """One request's decoding state: its ids, sampler, stop strings and streamed text."""

    def __init__(self, engine: RegionCaptioner, params: SamplingParams, prompt_tokens: int):
        self.engine, self.params, self.prompt_tokens = engine, params, prompt_tokens
        self.ids: list[int] = []
        self.sent = ""
        self.generator = None
        if params.seed is not None and not params.greedy:
            device = engine.model.device
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def sample(self, logits: torch.Tensor) -> int:
        p = self.params
        return int(sample_next(logits[None], p.temperature, p.top_p, self.generator, p.top_k)[0])

    def push(self, token: int) -> StreamEvent:
        """Adds a token; the event holds the new safe text, and the completion if done."""
        finish = None
        if token == self.engine.eos:
            finish = "stop"
        else:
            self.ids.append(token)
        text = self.engine.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut = _first_stop(text, self.params.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif finish is None and len(self.ids) >= self.params.max_new_tokens:
            finish = "length"
        if finish is not None:
            return self.finish(text.strip(), finish)
        return StreamEvent(self._advance(_safe(text, self.params.stop)))

    def finish(self, text: str, reason: FinishReason) -> StreamEvent:
        completion = Completion(text, list(self.ids), self.prompt_tokens, reason)
        return StreamEvent(self._advance(text), completion)

    def cancel(self) -> StreamEvent:
        text = self.engine.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        return self.finish(_safe(text, self.params.stop) if self.sent else "", "cancelled")

    def _advance(self, text: str) -> str:
        # Text already sent is never taken back; a decoder that rewrites earlier characters
        # (it should not) only loses the rewrite.
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe(text: str, stops: Sequence[str]) -> str:
    """The part of `text` that later tokens cannot change: without trailing whitespace (the
    final text is stripped), an incomplete character, or the start of a stop string."""
    text = text.rstrip()
    if text.endswith("\ufffd"):
        text = text.rstrip("\ufffd").rstrip()
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                text = text[:-n].rstrip()
                break
    return text


def build_prompt(engine: RegionCaptioner, request: ChatRequest) -> _Prompt:
    """Prompt ids and the mask of each `<mask>` (a region may be mentioned twice); ValueError
    for a conversation the template refuses or one too long for the model."""
    if not request.turns:
        raise ValueError("a chat request needs at least one turn")
    turns = [dict(t) for t in request.turns]
    masks = list(request.masks)
    if masks and request.list_regions:
        turns[0]["value"] = regions_overview(len(masks)) + turns[0]["value"]
    sample = build_generation_ids(
        engine.tokenizer,
        turns[-1]["value"],
        template=TEMPLATES[engine.config.template],
        history=turns[:-1],
        num_regions=len(masks),
    )
    cfg = engine.model.config
    length = prompt_positions(engine, sample.input_ids) + request.params.max_new_tokens
    if length > cfg.llm.max_position_embeddings:
        raise ValueError(
            f"the conversation needs {length} positions with max_new_tokens; the model has "
            f"{cfg.llm.max_position_embeddings}"
        )
    return _Prompt(sample.input_ids, [masks[i] for i in sample.region_indices])


def prompt_positions(engine: RegionCaptioner, ids: Sequence[int]) -> int:
    from osprey.constants import IMAGE_TOKEN_INDEX

    images = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
    return len(ids) + images * (engine.model.config.vision.num_image_tokens - 1)


@torch.no_grad()
def stream_requests(
    engine: RegionCaptioner,
    requests: Sequence[ChatRequest],
    cancelled: Callable[[int], bool] | None = None,
) -> Iterator[list[StreamEvent | None]]:
    """See the module docstring. `cancelled(i)` is asked between steps: True drops request i
    from the batch (its last event has finish_reason "cancelled")."""
    if not requests:
        return
    prompts = [build_prompt(engine, r) for r in requests]
    model, device = engine.model, engine.model.device
    began = time.perf_counter()
    pixels = torch.stack([preprocess_image(r.image, model.config.vision) for r in requests])
    image_embeds, features = model.encode_images(pixels.to(device))
    mask_tokens, pos_tokens = [], []
    for k, (request, prompt) in enumerate(zip(requests, prompts, strict=True)):
        level = {name: f[k : k + 1] for name, f in features.items()}
        size = image_size(request.image)
        m_tok, p_tok = engine._region_tokens(level, prompt.masks, size, k)
        mask_tokens.append(m_tok)
        pos_tokens.append(p_tok)
    del features
    ids, attention = pad_ids(
        [p.ids for p in prompts], model.config.llm.pad_token_id, "left", device
    )
    inputs = model.splice(
        ids, attention, None, image_embeds, mask_tokens, pos_tokens, padding_side="left"
    )
    engine._tick("vision", began)

    rows = [
        _Row(engine, r.params, prompt_positions(engine, p.ids))
        for r, p in zip(requests, prompts, strict=True)
    ]
    began = time.perf_counter()
    out = model.forward_embeds(inputs, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    attention, positions = inputs.attention_mask, inputs.position_ids[:, -1:]
    engine._tick("prefix", began)
    engine.stats.images += len(requests)
    alive = list(range(len(requests)))  # request index of each batch row
    while alive:
        began = time.perf_counter()
        events: list[StreamEvent | None] = [None] * len(requests)
        tokens, keep = [], []
        for row, i in enumerate(alive):
            token = rows[i].sample(logits[row])
            events[i] = rows[i].push(token)
            tokens.append(token)
            if events[i].completion is None:
                keep.append(row)
        engine.stats.decode_steps += 1
        engine._tick("decode", began)
        yield events
        if cancelled is not None:
            dropped = [row for row in keep if cancelled(alive[row])]
            if dropped:
                # The dropped rows' last events; the others get an empty one (None would
                # mean they are done).
                events = [None] * len(requests)
                for row in keep:
                    i = alive[row]
                    events[i] = rows[i].cancel() if row in dropped else StreamEvent("")
                keep = [row for row in keep if row not in dropped]
                yield events
        if not keep:
            break
        began = time.perf_counter()
        index = torch.tensor(keep, device=device)
        token_ids = torch.tensor(tokens, device=device)[index]
        if len(keep) < len(alive):
            # Finished and cancelled rows leave the batch: the rest no longer pay for them.
            cache.batch_select_indices(index)
            attention, positions = attention[index], positions[index]
        alive = [alive[row] for row in keep]
        positions = positions + 1
        attention = torch.cat([attention, attention.new_ones(len(alive), 1)], dim=1)
        logits = engine._forward(
            model.model.embed_tokens(token_ids[:, None]), attention, positions, cache
        )
        engine._tick("decode", began)
    engine.stats.tokens += sum(len(r.ids) for r in rows)


def complete_requests(engine: RegionCaptioner, requests: Sequence[ChatRequest]) -> list[Completion]:
    """Every request's completion, decoding at most `max_batch_images` requests at a time."""
    out: list[Completion] = []
    step = engine.config.max_batch_images
    for start in range(0, len(requests), step):
        chunk = requests[start : start + step]
        done: list[Completion | None] = [None] * len(chunk)
        for events in stream_requests(engine, chunk):
            for i, event in enumerate(events):
                if event is not None and event.completion is not None:
                    done[i] = event.completion
        out += done  # type: ignore[arg-type]
    return out


def image_size(image: ImageInput) -> tuple[int, int]:
    """(height, width) of a PIL image or an (H, W, C) array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])
