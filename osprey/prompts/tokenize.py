"""Conversation -> token ids, labels and the region index of every ``<mask>``.

The rendered prompt is tokenised piece by piece rather than as one string, so that the image
placeholder, ``<mask>``, ``<pos>`` and ``</s>`` become exactly one known id each, the answer tokens
are known without re-tokenising prefixes, and truncation can drop whole exchanges.

SentencePiece tokenisers (LLaMA's, and our tiny one) put a dummy ``▁`` before every separately
encoded text, and the released tokenizer encodes each text between two special tokens separately.
So a text that follows ``<image>``, ``<mask>``, ``<pos>`` or ``</s>`` is encoded as it stands: ``" in"``
after ``<pos>`` is ``▁`` + ``▁in``, ``"?"`` is ``▁?``, ``"\\n"`` after ``<image>`` is ``▁`` + ``<0x0A>``,
as Osprey saw them in training. A text that only continues the previous one (the answer after
``ASSISTANT:``) drops its leading space instead, whose ``▁`` the dummy prefix supplies: ``" cat"``
gives ``▁cat`` as in the whole string. docs/fidelity.md lists the reference behaviours pinned here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from osprey.constants import (
    IGNORE_INDEX,
    IMAGE_PREFIX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    MASK_TOKEN,
    POS_TOKEN,
)
from osprey.prompts.conversation import (
    GPT,
    HUMAN,
    OSPREY_V1,
    VICUNA_V1,
    ConversationTemplate,
    Segment,
    check_turns,
    segments,
)
from osprey.prompts.regions import has_region_marker, rewrite_regions
from osprey.prompts.tokenizer import region_token_ids

_SPECIAL_PIECE = re.compile(
    "(" + "|".join(re.escape(t) for t in (IMAGE_TOKEN, MASK_TOKEN, POS_TOKEN)) + ")"
)


@dataclass(slots=True)
class TokenizedSample:
    """Token ids of one conversation; ``labels`` is IGNORE_INDEX wherever no loss is taken.

    ``input_ids`` holds IMAGE_TOKEN_INDEX once where the image tokens go; ``region_indices[i]`` is
    the 0-based mask index for the i-th ``<mask>`` id.
    """

    input_ids: list[int]
    labels: list[int]
    region_indices: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length"
            )

    def num_positions(self, num_image_tokens: int) -> int:
        """Sequence length the LLM sees once the image placeholder is expanded."""
        images = self.input_ids.count(IMAGE_TOKEN_INDEX)
        return len(self.input_ids) + images * (num_image_tokens - 1)


@dataclass(slots=True)
class _Exchange:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    region_indices: list[int] = field(default_factory=list)
    num_positions: int = 0


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[dict],
    *,
    template: ConversationTemplate = VICUNA_V1,
    max_length: int | None = 2048,
    num_image_tokens: int = 1024,
    image: bool = True,
    bare_index: int | None = None,
    num_regions: int | None = None,
) -> TokenizedSample:
    """Tokenise a training conversation; only assistant answers and their ``</s>`` are labelled.

    ``max_length`` counts the image placeholder as ``num_image_tokens`` positions. Longer samples
    lose whole trailing exchanges; ValueError when not even the first exchange fits. ``bare_index``
    and ``num_regions`` are passed to :func:`rewrite_regions` for every human turn.
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    check_turns(turns, complete=True)
    prepared, per_turn_regions = _prepare(turns, image, bare_index, num_regions)
    exchanges = _encode(
        tokenizer,
        prepared,
        per_turn_regions,
        template=template,
        num_image_tokens=num_image_tokens,
        add_generation_prompt=False,
        train=True,
    )
    kept: list[_Exchange] = []
    total = 0
    for exchange in exchanges:
        if max_length is not None and total + exchange.num_positions > max_length:
            break
        kept.append(exchange)
        total += exchange.num_positions
    if not kept:
        raise ValueError(
            f"the first exchange needs {exchanges[0].num_positions} positions (image counted as "
            f"{num_image_tokens}) but max_length is {max_length}: {turns[0]['value'][:80]!r}"
        )
    return _join(kept)


def build_generation_ids(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    *,
    template: ConversationTemplate = OSPREY_V1,
    history: Sequence[dict] = (),
    image: bool = True,
    bare_index: int | None = None,
    num_regions: int | None = None,
) -> TokenizedSample:
    """Prompt ids for generation, ending right after the assistant role (``"ASSISTANT:"``).

    ``history`` holds earlier complete human/gpt turns. Labels are all IGNORE_INDEX.
    """
    turns = [*history, {"from": HUMAN, "value": question}]
    check_turns(turns, complete=False)
    prepared, per_turn_regions = _prepare(turns, image, bare_index, num_regions)
    exchanges = _encode(
        tokenizer,
        prepared,
        per_turn_regions,
        template=template,
        num_image_tokens=1,  # lengths are not checked for generation
        add_generation_prompt=True,
        train=False,
    )
    return _join(exchanges)


def image_to_front(value: str) -> str:
    """Move ``<image>`` to the front of a turn on a line of its own, as the reference's
    ``preprocess_multimodal`` does: ``"<image>.\\nThis ..."`` becomes ``"<image>\\n.\\nThis ..."``."""
    rest = value.replace(IMAGE_TOKEN, "").strip()
    return (IMAGE_TOKEN + "\n" + rest).strip()


def _prepare(
    turns: Sequence[dict], image: bool, bare_index: int | None, num_regions: int | None
) -> tuple[list[dict], list[list[int]]]:
    """Add the image prefix, check placeholders and rewrite regions in human turns."""
    values = [turn["value"] for turn in turns]
    images = sum(value.count(IMAGE_TOKEN) for value in values)
    if image:
        if images > 1 or (images and IMAGE_TOKEN not in values[0]):
            raise ValueError(
                f"{IMAGE_TOKEN} must appear once, in the first human turn; found {images} "
                f"in {values!r}"
            )
        values[0] = image_to_front(values[0] if images else IMAGE_PREFIX + values[0])
    elif images:
        raise ValueError(f"image=False but the conversation holds {IMAGE_TOKEN}: {values!r}")

    prepared, per_turn_regions = [], []
    for turn, value in zip(turns, values, strict=True):
        if turn["from"] == GPT:
            if has_region_marker(value):
                raise ValueError(
                    "assistant answers cannot hold region placeholders or tokens (write "
                    f"'region2' as plain text): {value!r}"
                )
            regions: list[int] = []
        else:
            value, regions = rewrite_regions(value, bare_index, num_regions=num_regions)
        prepared.append({"from": turn["from"], "value": value})
        per_turn_regions.append(regions)
    return prepared, per_turn_regions


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[dict],
    per_turn_regions: list[list[int]],
    *,
    template: ConversationTemplate,
    num_image_tokens: int,
    add_generation_prompt: bool,
    train: bool,
) -> list[_Exchange]:
    """Token ids per exchange; labels copy the ids of answer pieces when ``train``."""
    _check_no_special_text(tokenizer, turns)
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} lacks a bos or eos token")
    mask_id, pos_id = region_token_ids(tokenizer)
    special_ids = {IMAGE_TOKEN: IMAGE_TOKEN_INDEX, MASK_TOKEN: mask_id, POS_TOKEN: pos_id}
    dummy_prefix = _adds_dummy_prefix(tokenizer)

    num_exchanges = (len(turns) + 1) // 2
    exchanges = [_Exchange() for _ in range(num_exchanges)]
    for i in range(num_exchanges):
        exchanges[i].region_indices = [r for t in per_turn_regions[2 * i : 2 * i + 2] for r in t]

    def emit(exchange: _Exchange, ids: list[int], learn: bool) -> None:
        exchange.input_ids.extend(ids)
        exchange.labels.extend(ids if learn else [IGNORE_INDEX] * len(ids))
        exchange.num_positions += sum(
            num_image_tokens if t == IMAGE_TOKEN_INDEX else 1 for t in ids
        )

    emit(exchanges[0], [bos], False)
    # Whether the next text starts a separately encoded text (after bos or a special token).
    fresh = True
    for piece_text, answer, index in _merged(segments(turns, template, add_generation_prompt)):
        exchange = exchanges[index]
        learn = train and answer
        if answer and piece_text == template.sep2 and piece_text == tokenizer.eos_token:
            emit(exchange, [tokenizer.eos_token_id], learn)
            fresh = True
            continue
        for part in _SPECIAL_PIECE.split(piece_text):
            if part in special_ids:
                emit(exchange, [special_ids[part]], False)
                fresh = True
            elif part:
                continues = dummy_prefix and not fresh
                emit(exchange, _encode_text(tokenizer, part, continues), learn)
                fresh = False

    for exchange in exchanges:
        masks = exchange.input_ids.count(mask_id)
        if masks != len(exchange.region_indices):
            raise ValueError(
                f"an exchange has {masks} <mask> tokens but regions {exchange.region_indices}"
            )
    return exchanges


def _merged(segs: Sequence[Segment]) -> list[tuple[str, bool, int]]:
    """Join neighbouring segments of the same kind so each text is encoded in one call."""
    out: list[tuple[str, bool, int]] = []
    for seg in segs:
        if out and out[-1][1] == seg.answer and out[-1][2] == seg.exchange and not seg.answer:
            out[-1] = (out[-1][0] + seg.text, seg.answer, seg.exchange)
        else:
            out.append((seg.text, seg.answer, seg.exchange))
    return out


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str, continues: bool) -> list[int]:
    # The dummy prefix stands for the space that joins a continuing text to the previous one.
    if continues and text.startswith(" "):
        text = text[1:]
    if not text:
        return []
    return tokenizer.encode(text, add_special_tokens=False)


def _adds_dummy_prefix(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding "a" yields a word-start marker, i.e. the tokeniser prepends a space."""
    ids = tokenizer.encode("a", add_special_tokens=False)
    first = tokenizer.convert_ids_to_tokens(ids[:1])
    return bool(first) and first[0].startswith(("\u2581", "\u0120"))


def _check_no_special_text(tokenizer: PreTrainedTokenizerBase, turns: list[dict]) -> None:
    # A literal "</s>" in a turn would be read as the end of an answer and shift the labels.
    specials = [t for t in tokenizer.all_special_tokens if t not in (MASK_TOKEN, POS_TOKEN)]
    for turn in turns:
        for token in specials:
            if token in turn["value"]:
                raise ValueError(f"turn text holds the special token {token!r}: {turn['value']!r}")


def _join(exchanges: list[_Exchange]) -> TokenizedSample:
    sample = TokenizedSample(input_ids=[], labels=[], region_indices=[])
    for exchange in exchanges:
        sample.input_ids.extend(exchange.input_ids)
        sample.labels.extend(exchange.labels)
        sample.region_indices.extend(exchange.region_indices)
    return sample
