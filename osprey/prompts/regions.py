"""Rewriting region placeholders in text to the model's ``<mask><pos>`` token pair.

Data sets write ``<region1>``, ``<region2>``, ... (1-based into the sample's masks) or a bare
``<region>`` whose mask the caller knows. The model instead sees ``<mask><pos>`` per mention and
takes the i-th mask's features for the i-th ``<mask>``, so the rewrite also returns which mask each
``<mask>`` stands for; a region mentioned twice gets two ``<mask><pos>`` pairs.
"""

from __future__ import annotations

import re

from osprey.constants import MASK_TOKEN, POS_TOKEN, REGION_TOKENS

BARE_REGION = "<region>"

# A literal <mask><pos> (as the released demo and evaluation prompts write it) is read like a bare
# <region>: it is one mention of the caller's region.
_PLACEHOLDER = re.compile(r"<region(\d*)>|" + re.escape(REGION_TOKENS))
# Anything region-like left between placeholders is malformed: "<region 2>", "<regions>",
# "<region-1>", a lone "<mask>" or "<pos>".
_STRAY = re.compile(r"<region|" + re.escape(MASK_TOKEN) + "|" + re.escape(POS_TOKEN))


def rewrite_regions(
    text: str,
    bare_index: int | None = None,
    *,
    num_regions: int | None = None,
) -> tuple[str, list[int]]:
    """Replace every region placeholder in ``text`` by ``<mask><pos>``.

    Returns the new text and the 0-based region index of each ``<mask>`` in order of appearance.
    ``<regionN>`` maps to ``N - 1``; a bare ``<region>`` (or a literal ``<mask><pos>``) maps to
    ``bare_index``, which must then be given. With ``num_regions`` every index must be below it.
    Raises ValueError naming the text when a placeholder is malformed or out of range.
    """
    pieces: list[str] = []
    indices: list[int] = []
    end = 0
    for match in _PLACEHOLDER.finditer(text):
        _check_no_stray(text[end : match.start()], text)
        number = match.group(1)
        if number:
            if int(number) < 1:
                raise ValueError(
                    f"region placeholders are 1-based, got <region{number}> in {text!r}"
                )
            index = int(number) - 1
        else:
            if bare_index is None:
                raise ValueError(
                    f"{match.group(0)!r} in {text!r} does not say which region it is; "
                    "pass bare_index or write <region1>, <region2>, ..."
                )
            if bare_index < 0:
                raise ValueError(f"bare_index must be >= 0, got {bare_index}")
            index = bare_index
        if num_regions is not None and index >= num_regions:
            raise ValueError(
                f"{match.group(0)!r} in {text!r} refers to region {index + 1} "
                f"but the sample has {num_regions} region(s)"
            )
        pieces.append(text[end : match.start()])
        pieces.append(REGION_TOKENS)
        indices.append(index)
        end = match.end()
    _check_no_stray(text[end:], text)
    pieces.append(text[end:])
    return "".join(pieces), indices


def _check_no_stray(chunk: str, text: str) -> None:
    stray = _STRAY.search(chunk)
    if stray is not None:
        near = chunk[stray.start() : stray.start() + 16]
        raise ValueError(f"malformed region placeholder near {near!r} in {text!r}")


def count_masks(text: str) -> int:
    """Number of ``<mask>`` tokens in (rewritten) text: it must equal the number of masks fed."""
    return text.count(MASK_TOKEN)


def has_region_marker(text: str) -> bool:
    """Whether ``text`` holds any region placeholder or region token, well-formed or not."""
    return _STRAY.search(text) is not None
