"""The region-captioning engine: many regions of an image described in one batched decode.

The reference code captions one region per call, re-running the vision tower and the whole
prompt each time. Every region of an image shares the same prompt up to its `<mask><pos>`
(system line, the image's tokens, the overview line), so here, per group of images:

1. the vision tower runs once per image, and each region's mask and position tokens are pooled
   from those features;
2. the shared prefix (token ids common to every task's prompt, up to the first point where they
   differ or the region appears) goes through the LLM once per image, giving its KV cache;
3. per task, all the group's regions decode as one batch from copies of their image's prefix
   cache: each row adds only its question suffix (with its own `<mask><pos>` embeddings) and its
   answer tokens. Rows leave the batch at their end token; regions of several images share a
   batch, so an image with few regions still fills it.

The prompt ids are exactly those of the one-region path (`build_generation_ids`), so greedy
outputs are the same as captioning each region alone (tests/test_engine.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache, PreTrainedTokenizerBase

from osprey.constants import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from osprey.infer.chat import (
    ChatRequest,
    Completion,
    StreamEvent,
    build_prompt,
    complete_requests,
    image_size,
    prompt_positions,
    stream_requests,
)
from osprey.infer.config import (
    ANSWER_TOKENS,
    CATEGORY_TOKENS,
    DETAILED_TOKENS,
    SHORT_TOKENS,
    EngineConfig,
    SamplingParams,
    Task,
    question_task,
)
from osprey.infer.postprocess import demo_answer
from osprey.model.image_processing import preprocess_image
from osprey.model.modeling import MultimodalInputs, OspreyForCausalLM, kv_cache, sample_next
from osprey.prompts import (
    CATEGORY_PROMPT,
    DETAILED_PROMPT,
    SHORT_CAPTION_PROMPT,
    TEMPLATES,
    build_generation_ids,
)

__all__ = [
    "CATEGORY",
    "ChatRequest",
    "Completion",
    "DETAILED",
    "SHORT",
    "STANDARD_TASKS",
    "EngineConfig",
    "SamplingParams",
    "StreamEvent",
    "EngineStats",
    "RegionCaptioner",
    "Task",
    "question_task",
]

ImageInput = Image.Image | np.ndarray
# Per image: an (N, H, W) array, or a sequence of (H, W) masks (e.g. RleMasks, decoded lazily).
MaskInput = np.ndarray | torch.Tensor | Sequence[np.ndarray]


# The released demo's and evaluation's prompts.
CATEGORY = Task("category", CATEGORY_PROMPT, CATEGORY_TOKENS)
SHORT = Task("short", SHORT_CAPTION_PROMPT, SHORT_TOKENS)
DETAILED = Task("detailed", DETAILED_PROMPT, DETAILED_TOKENS)
STANDARD_TASKS: dict[str, Task] = {t.name: t for t in (CATEGORY, SHORT, DETAILED)}


@dataclass
class EngineStats:
    """Where the engine's time went (seconds), and how much work it did."""

    images: int = 0
    regions: int = 0
    tokens: int = 0
    vision: float = 0.0
    region_tokens: float = 0.0
    prefix: float = 0.0
    decode: float = 0.0
    decode_steps: int = 0

    @property
    def total(self) -> float:
        return self.vision + self.region_tokens + self.prefix + self.decode


@dataclass
class _Prompts:
    """Token ids of a set of tasks split into the shared prefix and one suffix per task."""

    prefix: list[int]
    suffixes: dict[str, list[int]]


@dataclass
class _Group:
    """A few images after the vision tower and the prefix."""

    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, heads, P, d)
    prefix_len: int
    mask_tokens: list[torch.Tensor]  # per image (N_i, H)
    pos_tokens: list[torch.Tensor]
    rows: list[tuple[int, int]] = field(default_factory=list)  # (image in group, region)


class RegionCaptioner:
    """Captions every region of a batch of images; see the module docstring."""

    def __init__(
        self,
        model: OspreyForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig | None = None,
        model_dir: str | os.PathLike | None = None,
    ) -> None:
        """`model_dir`: where the `reference` mode reads generation_config.json (None:
        transformers' defaults)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = (config or EngineConfig()).for_model(model_dir)
        self.stats = EngineStats()
        self._ids: dict[str, list[int]] = {}
        mask_id = tokenizer.convert_tokens_to_ids("<mask>")
        if mask_id != model.config.mask_token_id:
            raise ValueError(
                f"the tokenizer's <mask> id {mask_id} is not the model's "
                f"mask_token_id {model.config.mask_token_id}; they come from different checkpoints"
            )
        self.eos = (
            self.config.eos_token_id
            if self.config.eos_token_id is not None
            else tokenizer.eos_token_id
        )
        self.generator = None
        if self.config.seed is not None:
            self.generator = torch.Generator(device=model.device).manual_seed(self.config.seed)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: EngineConfig | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        tracking_uri: str | None = None,
        s3=None,
        adapter: str | os.PathLike | None = None,
    ) -> RegionCaptioner:
        """A model holding the weights and the tokenizer (`save_checkpoint`'s or a release's):
        a directory or any name osprey.io.models resolves, fetched once per node; with
        `adapter` (a LoRA adapter folder or name), its adapters applied unmerged."""
        from osprey.io.models import resolve_adapter_dir, resolve_model_dir
        from osprey.model import load_model
        from osprey.prompts import load_tokenizer

        if isinstance(dtype, str):  # a job's config names it: "bfloat16"
            dtype = getattr(torch, dtype)
        path = resolve_model_dir(str(path), tracking_uri=tracking_uri, s3=s3)
        if adapter is not None:
            adapter = resolve_adapter_dir(str(adapter), tracking_uri=tracking_uri, s3=s3)
        model = load_model(path, device=device, dtype=dtype, adapter=adapter)
        return cls(model, load_tokenizer(path), config, model_dir=path)

    # ---- public ---------------------------------------------------------------------------

    def caption(
        self,
        images: Sequence[ImageInput],
        masks: Sequence[MaskInput],
        tasks: Sequence[Task] = (CATEGORY, SHORT),
    ) -> list[list[dict[str, str]]]:
        """Per image, per region: {task name: answer text}."""
        ids = self.generate_ids(images, masks, tasks)
        # The released demo cleans its sampled descriptions (osprey.infer.postprocess); in the
        # reference mode, so do we.
        clean = {t.name for t in tasks if t.name in (SHORT.name, DETAILED.name)}
        if self.config.decoding != "reference":
            clean = set()
        return [
            [
                {
                    name: demo_answer(text) if name in clean else text
                    for name, text in ((n, self.decode_text(t)) for n, t in region.items())
                }
                for region in image
            ]
            for image in ids
        ]

    @contextmanager
    def decoding(self, config: EngineConfig) -> Iterator[None]:
        """Decode with `config`'s sampling within the block (a Serve replica's batch of
        requests that asked for another mode); the engine's own config after."""
        saved, saved_generator = self.config, self.generator
        self.config = config
        if config.seed is not None:
            self.generator = torch.Generator(device=self.model.device).manual_seed(config.seed)
        try:
            yield
        finally:
            self.config, self.generator = saved, saved_generator

    def answer(
        self,
        images: Sequence[ImageInput],
        masks: Sequence[MaskInput],
        question: str,
        max_new_tokens: int = ANSWER_TOKENS,
    ) -> list[list[str]]:
        """Per image, per region: the answer to a free question naming the region once as
        `<region>` (e.g. "What colour is <region>?"), asked of each region alone."""
        task = question_task(question, max_new_tokens)
        answers = self.caption(images, masks, [task])
        return [[region[task.name] for region in image] for image in answers]

    def ask(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        params: SamplingParams | None = None,
    ) -> list[str]:
        """Image-level questions (no regions), prompted as the reference's POPE evaluation
        does: "<image>\\n" + question. Sampling follows the engine's config unless `params`."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        params = params or self.config.sampling(ANSWER_TOKENS)
        requests = [
            ChatRequest(image, [{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"}], params=params)
            for image, q in zip(images, questions, strict=True)
        ]
        return [c.text for c in self.chat(requests)]

    def check(self, request: ChatRequest) -> int:
        """ValueError when the request's conversation cannot be prompted (placeholders, region
        count, length); else the number of prompt positions it takes."""
        return prompt_positions(self, build_prompt(self, request).ids)

    def chat(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        """The next assistant turn of each conversation, decoded as one batch with each
        request's own sampling (osprey.infer.chat)."""
        return complete_requests(self, requests)

    def stream(
        self,
        requests: Sequence[ChatRequest],
        cancelled: Callable[[int], bool] | None = None,
    ) -> Iterator[list[StreamEvent | None]]:
        """`chat` as it decodes: per step, one event per request (None once it is done) with
        the new text; the last holds the Completion. `cancelled(i)` drops request i."""
        return stream_requests(self, requests, cancelled)

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate_ids(
        self,
        images: Sequence[ImageInput],
        masks: Sequence[MaskInput],
        tasks: Sequence[Task] = (CATEGORY, SHORT),
    ) -> list[list[dict[str, list[int]]]]:
        """Per image, per region: {task name: generated token ids, without the end token}."""
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} mask sets")
        if not tasks:
            raise ValueError("give at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must differ, got {names}")
        prompts = self._prompts(tasks)
        out: list[list[dict[str, list[int]]]] = [[{} for _ in range(len(m))] for m in masks]
        step = self.config.max_batch_images
        for start in range(0, len(images), step):
            group = self._encode_group(
                images[start : start + step], masks[start : start + step], prompts.prefix, start
            )
            for task in tasks:
                suffix = prompts.suffixes[task.name]
                for chunk in _chunks(group.rows, self.config.max_batch_regions):
                    results = self._decode_rows(group, chunk, suffix, task.max_new_tokens)
                    for (k, r), ids in zip(chunk, results, strict=True):
                        out[start + k][r][task.name] = ids
        return out

    # ---- prompts --------------------------------------------------------------------------

    def prompt_ids(self, question: str) -> list[int]:
        """The whole one-region prompt of a question (what the reference path feeds)."""
        if question not in self._ids:
            sample = build_generation_ids(
                self.tokenizer,
                question,
                template=TEMPLATES[self.config.template],
                bare_index=0,
                num_regions=1,
            )
            ids = sample.input_ids
            cfg = self.model.config
            if ids.count(cfg.mask_token_id) != 1 or ids.count(IMAGE_TOKEN_INDEX) != 1:
                raise ValueError(f"question {question!r} must name one region once")
            self._ids[question] = ids
        return self._ids[question]

    def _prompts(self, tasks: Sequence[Task]) -> _Prompts:
        all_ids = [self.prompt_ids(t.question) for t in tasks]
        mask_id = self.model.config.mask_token_id
        # The prefix stops where any two prompts differ, and before any region token.
        length = min(ids.index(mask_id) for ids in all_ids)
        for ids in all_ids[1:]:
            same = 0
            while same < length and ids[same] == all_ids[0][same]:
                same += 1
            length = same
        prefix = all_ids[0][:length]
        if IMAGE_TOKEN_INDEX not in prefix:
            raise ValueError("the prompts differ before the image: nothing to share")
        return _Prompts(
            prefix, {t.name: ids[length:] for t, ids in zip(tasks, all_ids, strict=True)}
        )

    # ---- the shared part ------------------------------------------------------------------

    def _encode_group(
        self,
        images: Sequence[ImageInput],
        masks: Sequence[MaskInput],
        prefix: list[int],
        offset: int,
    ) -> _Group:
        model, device = self.model, self.model.device
        began = time.perf_counter()
        pixels = torch.stack([preprocess_image(img, model.config.vision) for img in images])
        image_embeds, features = model.encode_images(pixels.to(device))
        self._tick("vision", began)

        began = time.perf_counter()
        mask_tokens, pos_tokens, rows = [], [], []
        for k, (image, image_masks) in enumerate(zip(images, masks, strict=True)):
            size = image_size(image)
            level = {name: f[k : k + 1] for name, f in features.items()}
            m_tok, p_tok = self._region_tokens(level, image_masks, size, offset + k)
            mask_tokens.append(m_tok)
            pos_tokens.append(p_tok)
            rows += [(k, r) for r in range(m_tok.shape[0])]
        del features
        self._tick("region_tokens", began)

        began = time.perf_counter()
        ids = torch.tensor([prefix] * len(images), device=device)
        spliced = model.splice(ids, image_embeds=image_embeds)
        body = model.model(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids,
            use_cache=True,
        )
        cache = kv_cache(body)
        prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._tick("prefix", began)
        self.stats.images += len(images)
        self.stats.regions += len(rows)
        return _Group(prefix_kv, spliced.inputs_embeds.shape[1], mask_tokens, pos_tokens, rows)

    def _region_tokens(
        self,
        features: dict[str, torch.Tensor],
        masks: MaskInput,
        size: tuple[int, int],
        index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and position tokens of one image's regions, a memory-bounded chunk at a time."""
        height, width = size
        hidden = self.model.config.llm.hidden_size
        chunk = max(1, self.config.mask_budget_bytes // (4 * height * width))
        mask_parts, pos_parts = [], []
        for start in range(0, len(masks), chunk):
            part = [_as_mask(m) for m in masks[start : start + chunk]]
            for m in part:
                if tuple(m.shape) != (height, width):
                    raise ValueError(
                        f"image {index}: a mask of shape {tuple(m.shape)} for a "
                        f"{height}x{width} image; masks must be in the image's pixel grid"
                    )
            stacked = torch.stack(part).to(self.model.device)
            m_tok, p_tok = self.model.encode_regions(features, [stacked])
            mask_parts.append(m_tok[0])
            pos_parts.append(p_tok[0])
        if not mask_parts:
            empty = torch.zeros(0, hidden, device=self.model.device)
            return empty, empty
        return torch.cat(mask_parts), torch.cat(pos_parts)

    # ---- decoding -------------------------------------------------------------------------

    def _decode_rows(
        self,
        group: _Group,
        rows: list[tuple[int, int]],
        suffix: list[int],
        max_new_tokens: int,
    ) -> list[list[int]]:
        model, device = self.model, self.model.device
        cfg = model.config
        began = time.perf_counter()
        image_index = torch.tensor([k for k, _ in rows], device=device)
        cache = DynamicCache(
            ddp_cache_data=[(k[image_index], v[image_index]) for k, v in group.prefix_kv]
        )
        ids = torch.tensor(suffix, device=device)
        is_mask, is_pos = ids == cfg.mask_token_id, ids == cfg.pos_token_id
        plain = torch.where(is_mask | is_pos, torch.zeros_like(ids), ids)
        embeds = model.model.embed_tokens(plain)[None].repeat(len(rows), 1, 1)
        embeds[:, is_mask] = torch.stack([group.mask_tokens[k][r] for k, r in rows])[:, None].to(
            embeds.dtype
        )
        embeds[:, is_pos] = torch.stack([group.pos_tokens[k][r] for k, r in rows])[:, None].to(
            embeds.dtype
        )
        start = group.prefix_len
        positions = torch.arange(start, start + len(suffix), device=device)[None].repeat(
            len(rows), 1
        )
        attention = torch.ones(len(rows), start + len(suffix), dtype=torch.long, device=device)
        logits = self._forward(embeds, attention, positions, cache)

        results: list[list[int]] = [[] for _ in rows]
        alive = list(range(len(rows)))  # result index of each batch row
        for step in range(max_new_tokens):
            token = sample_next(
                logits, self.config.temperature, self.config.top_p, self.generator,
                top_k=self.config.top_k,
            )  # fmt: skip
            finished = token == self.eos
            for row, tok, done in zip(alive, token.tolist(), finished.tolist(), strict=True):
                if not done:
                    results[row].append(tok)
            if step == max_new_tokens - 1:
                break
            keep = torch.nonzero(~finished)[:, 0]
            if keep.numel() == 0:
                break
            if keep.numel() < len(alive):
                # Finished rows leave the batch: the rest no longer pay for them.
                cache.batch_select_indices(keep)
                token, attention, positions = token[keep], attention[keep], positions[keep]
                alive = [alive[i] for i in keep.tolist()]
            positions = positions[:, -1:] + 1
            attention = torch.cat([attention, attention.new_ones(len(alive), 1)], dim=1)
            logits = self._forward(
                model.model.embed_tokens(token[:, None]), attention, positions, cache
            )
            self.stats.decode_steps += 1
        self.stats.tokens += sum(len(r) for r in results)
        self._tick("decode", began)
        return results

    def _forward(
        self,
        embeds: torch.Tensor,
        attention: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """Logits of the last position, extending `cache` in place."""
        out = self.model.forward_embeds(
            MultimodalInputs(embeds, attention, positions, None),
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _tick(self, phase: str, began: float) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        setattr(self.stats, phase, getattr(self.stats, phase) + time.perf_counter() - began)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _as_mask(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
    if tensor.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {tuple(tensor.shape)}")
    return tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
