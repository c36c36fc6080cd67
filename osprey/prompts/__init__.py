"""Prompts: conversation templates, region placeholders, question templates and tokenisation."""

from osprey.prompts.conversation import (
    OSPREY_V1,
    TEMPLATES,
    VICUNA_V1,
    ConversationTemplate,
    render,
)
from osprey.prompts.llama_tokenizer import build_release_tokenizer
from osprey.prompts.regions import count_masks, rewrite_regions
from osprey.prompts.templates import (
    BRIEF_QUESTIONS,
    CATEGORY_PROMPT,
    DETAILED_PROMPT,
    DETAILED_QUESTIONS,
    PART_IMAGENET_INSTRUCTION,
    PASCAL_PART_INSTRUCTION,
    POSITIVE_NEGATIVE_QUESTIONS,
    SHORT_ANSWER_SUFFIX,
    SHORT_CAPTION_PROMPT,
    STAGE2_CATEGORY_INSTRUCTION,
    STAGE2_QUESTION,
    STAGE2_REFERRING_INSTRUCTION,
    STAGE2_REFERRING_NO_POSITION_INSTRUCTION,
    VCR_REFERENCE_WAYS,
    VCR_WHY_QUESTIONS,
    VG_QUESTIONS,
    VG_SHORT_PHRASE_SUFFIX,
    choose,
    fill_category,
    regions_overview,
    stage2_part_instruction,
    vcr_opening,
)

# Tokenisation needs transformers; it loads on first use, so that texts (templates, which the data
# converters import) come without it.
_LAZY = {
    "TokenizedSample": "osprey.prompts.tokenize",
    "build_generation_ids": "osprey.prompts.tokenize",
    "tokenize_conversation": "osprey.prompts.tokenize",
    "base_corpus": "osprey.prompts.tokenizer",
    "ensure_region_tokens": "osprey.prompts.tokenizer",
    "load_tokenizer": "osprey.prompts.tokenizer",
    "region_token_ids": "osprey.prompts.tokenizer",
    "save_tokenizer": "osprey.prompts.tokenizer",
    "train_tokenizer": "osprey.prompts.tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BRIEF_QUESTIONS",
    "CATEGORY_PROMPT",
    "DETAILED_PROMPT",
    "DETAILED_QUESTIONS",
    "OSPREY_V1",
    "PART_IMAGENET_INSTRUCTION",
    "PASCAL_PART_INSTRUCTION",
    "POSITIVE_NEGATIVE_QUESTIONS",
    "SHORT_ANSWER_SUFFIX",
    "SHORT_CAPTION_PROMPT",
    "STAGE2_CATEGORY_INSTRUCTION",
    "STAGE2_QUESTION",
    "STAGE2_REFERRING_INSTRUCTION",
    "STAGE2_REFERRING_NO_POSITION_INSTRUCTION",
    "TEMPLATES",
    "VCR_REFERENCE_WAYS",
    "VCR_WHY_QUESTIONS",
    "VG_QUESTIONS",
    "VG_SHORT_PHRASE_SUFFIX",
    "VICUNA_V1",
    "ConversationTemplate",
    "TokenizedSample",
    "base_corpus",
    "build_release_tokenizer",
    "build_generation_ids",
    "choose",
    "count_masks",
    "ensure_region_tokens",
    "fill_category",
    "load_tokenizer",
    "region_token_ids",
    "regions_overview",
    "render",
    "rewrite_regions",
    "save_tokenizer",
    "stage2_part_instruction",
    "tokenize_conversation",
    "train_tokenizer",
    "vcr_opening",
]
