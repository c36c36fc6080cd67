"""Tokenisers: training a tiny LLaMA-like one offline, saving and loading any of them.

The tiny tokeniser mirrors the layout of LLaMA's: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, the 256
byte-fallback tokens ``<0x00>`` ... ``<0xFF>`` next (so any text encodes), then learned BPE pieces
over SentencePiece-style ``▁`` words; pad is ``<unk>``. ``<mask>`` and ``<pos>`` come right after the
base vocabulary, as in the released tokenizer (32000 and 32001 there). Because it adds the same
dummy leading ``▁`` as LLaMA's, the piecewise tokenisation in :mod:`osprey.prompts.tokenize` runs the
same code path on the tiny tokeniser as on the real one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from osprey.constants import IMAGE_PREFIX, MASK_TOKEN, POS_TOKEN
from osprey.prompts import templates
from osprey.prompts.conversation import TEMPLATES
from osprey.prompts.llama_tokenizer import SENTENCEPIECE_FILE, build_release_tokenizer

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
_RESERVED = [UNK, BOS, EOS, *_BYTE_TOKENS]
SPACE = "\u2581"  # SentencePiece's "▁"


def base_corpus() -> Iterator[str]:
    """Texts every tiny tokeniser must encode compactly: system lines, roles, templates, prompts.

    Placeholders (``<image>``, ``<region1>``, ``<category>``, ...) are cut out: they never reach
    the tokeniser as text, so learning pieces for them would waste the vocabulary.
    """
    for text in _base_texts():
        for piece in _PLACEHOLDER.split(text):
            if piece.strip():
                yield piece


_PLACEHOLDER = re.compile(r"<image>|<region\d*>|<mask>|<pos>|<category>")


def _base_texts() -> Iterator[str]:
    for template in TEMPLATES.values():
        yield template.system
        yield " ".join(f"{role}:" for role in template.roles)
    yield IMAGE_PREFIX
    groups = (
        templates.DETAILED_QUESTIONS,
        templates.BRIEF_QUESTIONS,
        templates.POSITIVE_NEGATIVE_QUESTIONS,
    )
    for group in groups:
        yield from group
    yield from (
        templates.SHORT_ANSWER_SUFFIX,
        templates.SHORT_CAPTION_PROMPT,
        templates.DETAILED_PROMPT,
        templates.CATEGORY_PROMPT,
        templates.STAGE2_CATEGORY_INSTRUCTION,
        templates.STAGE2_REFERRING_INSTRUCTION,
        templates.STAGE2_REFERRING_NO_POSITION_INSTRUCTION,
        templates.stage2_part_instruction(["category"], ["part"], ":"),
        templates.regions_overview(1),
        templates.regions_overview(3),
        # Answers of the positive/negative questions.
        "Yes No yes no",
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, include_base_corpus: bool = True
) -> PreTrainedTokenizerFast:
    """Train a LLaMA-like BPE tokeniser on ``texts`` (plus :func:`base_corpus`), fully offline.

    ``vocab_size`` is the base vocabulary, like LLaMA's 32000: when the corpus is too small to learn
    that many pieces the rest is filled with unused ``<unusedN>`` entries, so ``<mask>`` is always
    ``vocab_size`` and ``<pos>`` ``vocab_size + 1``. The same texts give the same tokeniser.
    """
    corpus = list(base_corpus()) if include_base_corpus else []
    corpus.extend(texts)
    if not corpus:
        raise ValueError("train_tokenizer needs at least one text")
    alphabet = {ch for text in corpus for ch in text.replace(" ", SPACE)} | {SPACE}
    minimum = len(_RESERVED) + len(alphabet)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the reserved tokens and the corpus's "
            f"{len(alphabet)} characters need at least {minimum}"
        )

    raw = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    # LLaMA's normaliser: a dummy "▁" before every separately encoded text (and after every added
    # token), spaces as "▁". The pre-tokeniser only splits words so that merges stay inside one.
    raw.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
    )
    raw.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="never", split=True
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_RESERVED, show_progress=False
    )
    raw.train_from_iterator(corpus, trainer, length=len(corpus))
    return _wrap(_finish(raw, vocab_size))


def _finish(trained: Tokenizer, vocab_size: int) -> Tokenizer:
    """Rebuild the trained tokeniser with LLaMA's byte fallback, decoder and bos post-processor."""
    spec = json.loads(trained.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    misplaced = [t for i, t in enumerate(_RESERVED) if vocab.get(t) != i]
    if misplaced:
        raise RuntimeError(f"the tokenizer trainer put reserved tokens out of place: {misplaced}")
    if len(vocab) > vocab_size:
        raise RuntimeError(f"the tokenizer trainer learned {len(vocab)} > {vocab_size} tokens")
    # The trainer registers reserved tokens as added tokens; byte tokens must stay plain vocabulary
    # so that decoding with skip_special_tokens keeps the bytes they stand for.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in (UNK, BOS, EOS)]
    for i in range(vocab_size - len(vocab)):
        vocab[f"<unused{i}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),  # the dummy prefix of the first word
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return tok


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=UNK
    )
    return ensure_region_tokens(wrapped)


def ensure_region_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add ``<mask>`` and ``<pos>`` as special tokens (next free ids) when missing; set pad = unk."""
    missing = [t for t in (MASK_TOKEN, POS_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        # LLaMA has no pad token; Osprey pads with <unk>.
        tokenizer.pad_token = tokenizer.unk_token
    region_token_ids(tokenizer)
    return tokenizer


def region_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The single ids of ``<mask>`` and ``<pos>``; ValueError when the tokeniser lacks them."""
    ids = []
    for token in (MASK_TOKEN, POS_TOKEN):
        # Unknown tokens convert to the unk id (or None), not to an error.
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token; load it with load_tokenizer()")
        ids.append(token_id)
    return ids[0], ids[1]


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Write the tokeniser's HF files into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokeniser from local files (ours, or a Vicuna/Osprey HF directory).

    ``<mask>``/``<pos>`` are added when missing, as the released code does after loading Vicuna.
    A directory holding SentencePiece's ``tokenizer.model`` (Vicuna, a released Osprey checkpoint)
    gets the release's tokenizer (:func:`build_release_tokenizer`), whatever its other files say.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"tokenizer directory {str(directory)!r} does not exist")
    if (directory / SENTENCEPIECE_FILE).is_file():
        return build_release_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {str(directory)!r} lacks a bos or eos token")
    return ensure_region_tokens(tokenizer)
