"""LLaVA-1.5's `plain` pretraining format: the image, then the caption, then a newline.

Stage 1 of the released model (its projector) was trained this way: no system line, no roles, no
question (the human turn is replaced by the image alone), and no ``</s>``; the loss covers the
caption and its newline. Both pieces are encoded as the reference's `tokenizer_image_token` does:
``<s>``, the image placeholder, then the caption encoded on its own (with SentencePiece's word-start
marker), so a caption's ids do not depend on the text before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from osprey.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from osprey.prompts.conversation import GPT, HUMAN
from osprey.prompts.tokenize import TokenizedSample

PLAIN = "plain"
PLAIN_SEPARATOR = "\n"


def tokenize_plain(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[dict],
    *,
    max_length: int | None = 2048,
    num_image_tokens: int = 1024,
) -> TokenizedSample:
    """One (request, caption) pair -> ``<s> <image> caption\\n`` with the caption labelled.

    ValueError unless the turns are exactly one human turn and one answer (as the reference
    asserts), or when the sample is longer than ``max_length`` (the image counted as
    ``num_image_tokens`` positions): a caption is never cut.
    """
    if len(turns) != 2 or turns[0].get("from") != HUMAN or turns[1].get("from") != GPT:
        raise ValueError(
            f"the plain template takes one human turn and one answer, got "
            f"{[t.get('from') for t in turns]}"
        )
    if IMAGE_TOKEN in turns[1]["value"]:
        raise ValueError(f"the caption holds {IMAGE_TOKEN}: {turns[1]['value']!r}")
    if tokenizer.bos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} lacks a bos token")
    caption = tokenizer.encode(turns[1]["value"] + PLAIN_SEPARATOR, add_special_tokens=False)
    input_ids = [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX, *caption]
    labels = [IGNORE_INDEX, IGNORE_INDEX, *caption]
    positions = len(input_ids) - 1 + num_image_tokens
    if max_length is not None and positions > max_length:
        raise ValueError(
            f"the caption needs {positions} positions (image counted as {num_image_tokens}) but "
            f"max_length is {max_length}"
        )
    return TokenizedSample(input_ids=input_ids, labels=labels, region_indices=[])
