"""Pretraining a tiny LLaMA on the shapes set's text: our stand-in for Vicuna.

Osprey starts from a chat-tuned LLM and, in stages 1-2, trains only the projector and the mask
extractor to write into its input embeddings: a 7B LLM reads such soft inputs out of the box.
A tiny LLM pretrained on text alone does not (measured: stage 2 against it stays at chance), so
the stand-in learns the chat text *and* to read the slots where Osprey splices features:

- conversations are tokenised exactly as the Osprey stages tokenise them (vicuna-v1 template,
  image prefix, piecewise encoding), so every text token is the one the stages will see;
- each region's `<mask>` slot holds the mean input embedding of the region's category words
  ("red circle"): the stand-in for a region feature, in the LLM's own embedding space, so the
  mask extractor later has a target it can reach with a linear map;
- the `<pos>` slot and the image slots hold noise, so the LLM learns to ignore what it cannot
  read yet instead of being thrown by it;
- training starts with a *reading* phase on category questions alone, until the answers are
  read off the slots. Reading is learned suddenly: measured on category rows only, the answer
  tokens stayed near chance for ~250 steps and then jumped to 100% within 50; in the full mix
  (1 row in 6 a category question) it had not happened after 400 steps, and without it stage 2
  has nothing to write into.

Labels cover the text tokens only (slots are IGNORE, as in Osprey). The result is an HF
LlamaForCausalLM directory (safetensors + tokenizer) that `LLMConfig.weights` loads.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from osprey.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from osprey.model.config import LLMConfig, tiny
from osprey.prompts import VICUNA_V1, ConversationTemplate, tokenize_conversation
from osprey.prompts.tokenizer import region_token_ids
from osprey.train.pretrain_vision import cosine_schedule

# Marker ids in Document.ids (never embedded): where a region's content or noise is spliced.
REGION_SLOT = -1
NOISE_SLOT = -2

# "region2<region2>" (a name followed by its own placeholder, as conversation openings write it)
# or a lone "<region2>" / "<region>": both become the plain name in free text.
_REGION = re.compile(r"(?:region(\d+))?<region(\d*)>")


def name_regions(text: str) -> str:
    """Write every region placeholder as its plain name: "<region2>" -> "region2"."""

    def name(match: re.Match) -> str:
        before, number = match.group(1), match.group(2)
        if before is not None and before != number:
            return f"region{before}region{number}"
        return f"region{number}"

    return _REGION.sub(name, text)


@dataclass(slots=True)
class Document:
    """Token ids with slot markers, the token ids of each REGION_SLOT's content, and which
    positions are assistant answers (what Osprey's stages train on; tracked, not weighted)."""

    ids: list[int]
    contents: list[list[int]] = field(default_factory=list)
    answer: list[bool] | None = None

    def __post_init__(self) -> None:
        slots = self.ids.count(REGION_SLOT)
        if slots != len(self.contents):
            raise ValueError(
                f"a document has {slots} region slots but {len(self.contents)} contents"
            )
        if self.answer is None:
            self.answer = [False] * len(self.ids)
        if len(self.answer) != len(self.ids):
            raise ValueError(
                f"a document's answer flags ({len(self.answer)}) and ids ({len(self.ids)}) differ"
            )


def conversation_document(
    tokenizer: PreTrainedTokenizerBase,
    row: Mapping[str, Any],
    num_image_tokens: int,
    template: ConversationTemplate = VICUNA_V1,
) -> Document:
    """A shard row as the Osprey stages tokenise it, with image and region ids made slots."""
    sample = tokenize_conversation(
        tokenizer, row["conversations"], template=template, max_length=None, num_image_tokens=1
    )
    regions = row.get("regions") or []
    contents = []
    for index in sample.region_indices:
        category = regions[index].get("category") if index < len(regions) else None
        if not category:
            raise ValueError(
                f"row {row.get('sample_id')!r}: region {index + 1} has no category; the LLM "
                "pretraining writes a region as its category words"
            )
        contents.append(tokenizer.encode(category, add_special_tokens=False))
    mask_id, pos_id = region_token_ids(tokenizer)
    ids: list[int] = []
    answer: list[bool] = []
    for i, label in zip(sample.input_ids, sample.labels, strict=True):
        if i == IMAGE_TOKEN_INDEX:
            ids.extend([NOISE_SLOT] * num_image_tokens)
            answer.extend([False] * num_image_tokens)
            continue
        ids.append({mask_id: REGION_SLOT, pos_id: NOISE_SLOT}.get(i, i))
        answer.append(label != IGNORE_INDEX)
    return Document(ids, contents, answer)


def text_document(tokenizer: PreTrainedTokenizerBase, text: str) -> Document:
    """A free text as one document: <s> text </s>, regions named."""
    ids = tokenizer.encode(name_regions(text), add_special_tokens=False)
    return Document([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])


def documents(
    tokenizer: PreTrainedTokenizerBase,
    texts_or_rows: Iterable[str | Mapping[str, Any]],
    num_image_tokens: int,
    template: ConversationTemplate = VICUNA_V1,
) -> list[Document]:
    """A string is free text; a shard row contributes its conversation with slots."""
    docs = []
    for item in texts_or_rows:
        if isinstance(item, str):
            docs.append(text_document(tokenizer, item))
        elif isinstance(item, Mapping) and "conversations" in item:
            docs.append(conversation_document(tokenizer, item, num_image_tokens, template))
        else:
            raise ValueError(
                f"texts_or_rows items must be str or rows with 'conversations', got {item!r:.80}"
            )
    if not docs:
        raise ValueError("texts_or_rows is empty: nothing to pretrain on")
    return docs


def check_ids_in_vocab(docs: Sequence[Document], vocab_size: int) -> None:
    # <mask>/<pos> (and other added tokens) lie past the embedding matrix: an index error later.
    for doc in docs:
        bad = {i for i in doc.ids + [c for cs in doc.contents for c in cs] if i >= vocab_size}
        bad |= {i for i in doc.ids if i < 0 and i not in (REGION_SLOT, NOISE_SLOT)}
        if bad:
            raise ValueError(f"token ids {sorted(bad)} fall outside llm.vocab_size {vocab_size}")


def unigram_entropy(docs: Sequence[Document]) -> float:
    """Entropy (nats) of the text-token frequencies: the loss of a model blind to context."""
    counts = Counter(i for doc in docs for i in doc.ids[1:] if i >= 0)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


@dataclass(slots=True)
class Batch:
    ids: torch.Tensor  # (B, T) token ids, 0 at slots and padding
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) IGNORE at slots and padding
    region_slots: torch.Tensor  # (N, 2) (row, position) of each region slot
    region_contents: list[list[int]]  # token ids of each region slot's content
    noise_slots: torch.Tensor  # (B, T) bool
    answer: torch.Tensor  # (B, T) bool: assistant answer tokens


def make_batch(docs: Sequence[Document], seq_len: int, pad_id: int) -> Batch:
    """Right-padded, truncated to seq_len; one document per row from position 0, as Osprey's."""
    width = min(seq_len, max(len(d.ids) for d in docs))
    raw = torch.full((len(docs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(docs), width), dtype=torch.long)
    answer = torch.zeros((len(docs), width), dtype=torch.bool)
    contents: list[list[int]] = []
    for b, doc in enumerate(docs):
        ids = doc.ids[:width]
        raw[b, : len(ids)] = torch.tensor(ids)
        attn[b, : len(ids)] = 1
        answer[b, : len(ids)] = torch.tensor(doc.answer[:width])
        contents.extend(doc.contents[: ids.count(REGION_SLOT)])
    is_region = raw == REGION_SLOT
    is_noise = raw == NOISE_SLOT
    labels = raw.masked_fill((attn == 0) | is_region | is_noise, IGNORE_INDEX)
    ids = raw.masked_fill(is_region | is_noise, pad_id)
    return Batch(ids, attn, labels, is_region.nonzero(), contents, is_noise, answer)


def input_embeddings(
    embed: torch.nn.Embedding, batch: Batch, generator: torch.Generator
) -> torch.Tensor:
    """Token embeddings with region slots set to their content's mean embedding and noise
    slots to Gaussian noise at the embedding matrix's scale."""
    x = embed(batch.ids)
    noise = torch.randn(x.shape, generator=generator) * embed.weight.detach().std()
    x = torch.where(batch.noise_slots[..., None], noise.to(x.dtype), x)
    if batch.region_contents:
        means = torch.stack([embed(torch.tensor(c)).mean(0) for c in batch.region_contents])
        rows, cols = batch.region_slots[:, 0], batch.region_slots[:, 1]
        x = x.index_put((rows, cols), means)
    return x


def lm_losses(
    model: torch.nn.Module, batch: Batch, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over all text tokens, and (detached) over answer tokens only."""
    embeds = input_embeddings(model.get_input_embeddings(), batch, generator)
    logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
    per_token = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(),
        batch.labels[:, 1:],
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    counted = batch.labels[:, 1:] != IGNORE_INDEX
    answers = batch.answer[:, 1:] & counted
    loss = per_token.sum() / counted.sum().clamp(min=1)
    answer_loss = per_token.detach()[answers].mean() if answers.any() else loss.detach()
    return loss, answer_loss


# Row tasks whose answers can only be read off the region slots (the reading phase's data).
READING_TASKS = ("category",)


def pretrain_llm(
    out_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    texts_or_rows: Iterable[str | Mapping[str, Any]],
    *,
    config: LLMConfig | None = None,
    num_image_tokens: int | None = None,
    steps: int = 400,
    batch_size: int = 16,
    seq_len: int = 384,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    warmup: int = 20,
    seed: int = 0,
    log_every: int = 50,
    reading_steps: int = 800,
    reading_target: float = 0.05,
) -> dict[str, float]:
    """Train a LlamaForCausalLM from `config` on the documents; save it and the tokenizer.

    First up to `reading_steps` steps on the READING_TASKS rows only, ending early once the
    running mean of their answer loss is under `reading_target`; then `steps` on everything.

    `num_image_tokens` (default: the tiny tower's) is how many image slots a row's `<image>`
    becomes. Returns the final loss, the unigram entropy it should fall well below, steps and
    seconds.
    """
    from transformers import LlamaForCausalLM

    config = config or tiny().llm
    if num_image_tokens is None:
        num_image_tokens = tiny().vision.num_image_tokens
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise ValueError(
            f"steps and batch_size must be positive and seq_len >= 2, got {steps}, "
            f"{batch_size}, {seq_len}"
        )
    items = list(texts_or_rows)
    docs = documents(tokenizer, items, num_image_tokens)
    check_ids_in_vocab(docs, config.vocab_size)
    reading = [
        i
        for i, item in enumerate(items)
        if isinstance(item, Mapping) and item.get("task") in READING_TASKS
    ]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config.to_llama_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    start = time.perf_counter()

    def step(pool: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(len(pool), (batch_size,), generator=generator).tolist()
        batch = make_batch([docs[pool[i]] for i in pick], seq_len, config.pad_token_id)
        loss, answer_loss = lm_losses(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss, answer_loss

    # The reading phase runs at the constant peak rate (as measured); the warmup-cosine
    # schedule covers the mixed phase.
    read, running = 0, float("inf")
    while reading and read < reading_steps and running > reading_target:
        _, answer_loss = step(reading)
        read += 1
        running = answer_loss.item() if read == 1 else 0.9 * running + 0.1 * answer_loss.item()
        if log_every and read % log_every == 0:
            print(f"llm reading step {read} answer loss {running:.4f}", flush=True)
    if read:
        print(f"llm reading phase: {read} steps, answer loss {running:.4f}", flush=True)
    everything = range(len(docs))
    schedule = cosine_schedule(optimizer, steps, warmup)
    mixed_start = time.perf_counter()
    for index in range(steps):
        loss, answer_loss = step(everything)
        schedule.step()
        if log_every and ((index + 1) % log_every == 0 or index + 1 == steps):
            rate = (index + 1) / (time.perf_counter() - mixed_start)
            print(
                f"llm step {index + 1}/{steps} loss {loss.item():.4f} "
                f"answer {answer_loss.item():.4f} {rate:.2f} steps/s",
                flush=True,
            )
    seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(os.fspath(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(os.fspath(out_dir))
    return {
        "steps": steps,
        "reading_steps": read,
        "reading_answer_loss": running,
        "seconds": seconds,
        "steps_per_s": (steps + read) / seconds,
        "loss": loss.item(),
        "answer_loss": answer_loss.item(),
        "unigram_entropy": unigram_entropy(docs),
        "documents": len(docs),
    }
