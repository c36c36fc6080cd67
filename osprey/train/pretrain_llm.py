"""Pretraining a tiny LLaMA on the shapes set's text: our stand-in for Vicuna.

Osprey starts from a chat-tuned LLM; with a random one its stages 1-2 learn nothing (STACK.md).
The stand-in is a plain causal LM on the shapes conversations and captions, tokenised exactly as
the Osprey stages will tokenise them (vicuna-v1 template, image prefix, piecewise encoding), so
it knows the chat format and the words. What it cannot see as text is left out: the image
placeholder is dropped and each region placeholder is written as its name ("region1"), since
`<mask>`/`<pos>` lie outside the embedding matrix. The result is an HF LlamaForCausalLM
directory (safetensors + tokenizer) that `LLMConfig.weights` loads.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from osprey.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from osprey.model.config import LLMConfig, tiny
from osprey.prompts import VICUNA_V1, ConversationTemplate, tokenize_conversation
from osprey.train.pretrain_vision import cosine_lr

# "region2<region2>" (a name followed by its own placeholder, as conversation openings write it)
# or a lone "<region2>" / "<region>": both become the plain name.
_REGION = re.compile(r"(?:region(\d+))?<region(\d*)>")


def name_regions(text: str) -> str:
    """Write every region placeholder as its plain name: "<region2>" -> "region2"."""

    def name(match: re.Match) -> str:
        before, number = match.group(1), match.group(2)
        if before is not None and before != number:
            return f"region{before}region{number}"
        return f"region{number}"

    return _REGION.sub(name, text)


def conversation_ids(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[Mapping[str, str]],
    template: ConversationTemplate = VICUNA_V1,
) -> list[int]:
    """The token ids an Osprey stage sees for `turns`, minus the image and region positions.

    Tokenised by the same piecewise code as training (so every text token is identical), with
    the image placeholder removed afterwards; regions are named in the text beforehand.
    """
    named = [{"from": t["from"], "value": name_regions(t["value"])} for t in turns]
    sample = tokenize_conversation(
        tokenizer, named, template=template, max_length=None, num_image_tokens=1
    )
    return [i for i in sample.input_ids if i != IMAGE_TOKEN_INDEX]


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A free text as one document: <s> text </s>."""
    ids = tokenizer.encode(name_regions(text), add_special_tokens=False)
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


def documents(
    tokenizer: PreTrainedTokenizerBase,
    texts_or_rows: Iterable[str | Mapping[str, Any]],
    template: ConversationTemplate = VICUNA_V1,
) -> list[list[int]]:
    """Token ids per document: a string is free text; a shard row contributes its conversation."""
    docs = []
    for item in texts_or_rows:
        if isinstance(item, str):
            docs.append(text_ids(tokenizer, item))
        elif isinstance(item, Mapping) and "conversations" in item:
            docs.append(conversation_ids(tokenizer, item["conversations"], template))
        else:
            raise ValueError(
                f"texts_or_rows items must be str or rows with 'conversations', got {item!r:.80}"
            )
    if not docs:
        raise ValueError("texts_or_rows is empty: nothing to pretrain on")
    return docs


def check_ids_in_vocab(docs: Sequence[Sequence[int]], vocab_size: int) -> None:
    # <mask>/<pos> (and unused added tokens) lie past the embedding matrix: an index error later.
    for doc in docs:
        bad = [i for i in doc if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"token ids {sorted(set(bad))} fall outside llm.vocab_size {vocab_size}")


def unigram_entropy(docs: Sequence[Sequence[int]]) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores context."""
    counts = Counter(i for doc in docs for i in doc[1:])
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def make_batch(
    docs: Sequence[Sequence[int]], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (IGNORE on padding); truncated to seq_len.

    One document per row, starting at position 0 with <s>, as Osprey's samples do.
    """
    width = min(seq_len, max(len(d) for d in docs))
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(docs), width), dtype=torch.long)
    for b, doc in enumerate(docs):
        doc = doc[:width]
        ids[b, : len(doc)] = torch.tensor(doc)
        attn[b, : len(doc)] = 1
    labels = ids.masked_fill(attn == 0, IGNORE_INDEX)
    return ids, attn, labels


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor):
    logits = model(input_ids=ids, attention_mask=attn).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def pretrain_llm(
    out_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    texts_or_rows: Iterable[str | Mapping[str, Any]],
    *,
    config: LLMConfig | None = None,
    steps: int = 300,
    batch_size: int = 16,
    seq_len: int = 256,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    warmup: int = 20,
    seed: int = 0,
    log_every: int = 50,
) -> dict[str, float]:
    """Train a LlamaForCausalLM from `config` on the documents; save it and the tokenizer.

    Returns the final loss, the unigram entropy it should fall well below, steps and seconds.
    """
    from transformers import LlamaForCausalLM

    config = config or tiny().llm
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise ValueError(
            f"steps, batch_size must be positive and seq_len >= 2, got {steps}, {batch_size}, "
            f"{seq_len}"
        )
    docs = documents(tokenizer, texts_or_rows)
    check_ids_in_vocab(docs, config.vocab_size)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config.to_llama_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step, steps, min(warmup, steps))
    )
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        pick = torch.randint(len(docs), (batch_size,), generator=generator).tolist()
        ids, attn, labels = make_batch([docs[i] for i in pick], seq_len, config.pad_token_id)
        loss = lm_loss(model, ids, attn, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"llm step {step + 1}/{steps} loss {loss.item():.4f} {rate:.2f} steps/s", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(os.fspath(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(os.fspath(out_dir))
    return {
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "loss": loss.item(),
        "unigram_entropy": unigram_entropy(docs),
        "documents": len(docs),
    }
