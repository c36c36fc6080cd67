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
    POSITIVE_NEGATIVE_QUESTIONS,
    SHORT_ANSWER_SUFFIX,
    SHORT_CAPTION_PROMPT,
    STAGE2_CATEGORY_INSTRUCTION,
    STAGE2_QUESTION,
    STAGE2_REFERRING_INSTRUCTION,
    STAGE2_REFERRING_NO_POSITION_INSTRUCTION,
    choose,
    fill_category,
    regions_overview,
    stage2_part_instruction,
)
from osprey.prompts.tokenize import TokenizedSample, build_generation_ids, tokenize_conversation
from osprey.prompts.tokenizer import (
    base_corpus,
    ensure_region_tokens,
    load_tokenizer,
    region_token_ids,
    save_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BRIEF_QUESTIONS",
    "CATEGORY_PROMPT",
    "DETAILED_PROMPT",
    "DETAILED_QUESTIONS",
    "OSPREY_V1",
    "POSITIVE_NEGATIVE_QUESTIONS",
    "SHORT_ANSWER_SUFFIX",
    "SHORT_CAPTION_PROMPT",
    "STAGE2_CATEGORY_INSTRUCTION",
    "STAGE2_QUESTION",
    "STAGE2_REFERRING_INSTRUCTION",
    "STAGE2_REFERRING_NO_POSITION_INSTRUCTION",
    "TEMPLATES",
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
]
