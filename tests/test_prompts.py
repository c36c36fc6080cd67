"""Conversation rendering, region rewriting, question templates and tokenisation with labels."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from osprey.constants import (
    IGNORE_INDEX,
    IMAGE_PREFIX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    REGION_TOKENS,
)
from osprey.prompts import (
    BRIEF_QUESTIONS,
    CATEGORY_PROMPT,
    DETAILED_PROMPT,
    DETAILED_QUESTIONS,
    OSPREY_V1,
    POSITIVE_NEGATIVE_QUESTIONS,
    SHORT_ANSWER_SUFFIX,
    SHORT_CAPTION_PROMPT,
    VICUNA_V1,
    build_generation_ids,
    choose,
    count_masks,
    fill_category,
    region_token_ids,
    regions_overview,
    render,
    rewrite_regions,
    tokenize_conversation,
    train_tokenizer,
)
from osprey.prompts.templates import stage2_part_instruction

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ANSWERS = ["a red circle", "the blue square, left of it"]
TURNS = [
    {"from": "human", "value": "What is <region2> next to <region1>?"},
    {"from": "gpt", "value": ANSWERS[0]},
    {"from": "human", "value": "And <region2>?"},
    {"from": "gpt", "value": ANSWERS[1]},
]
IMAGE_TOKENS = 16


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


# --- conversation -----------------------------------------------------------------------------


def test_render_matches_vicuna_v1_exactly():
    turns = [human("q1"), gpt("a1"), human("q2"), gpt("a2")]
    assert (
        render(turns, VICUNA_V1) == f"{SYSTEM} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
    )


def test_render_generation_prompt_and_osprey_v1():
    text = render([human("q")], OSPREY_V1, add_generation_prompt=True)
    assert text.endswith(" USER: q ASSISTANT:")
    assert text.startswith("A chat between a curious human and an artificial intelligence")
    assert "human's questions." in text
    assert OSPREY_V1.roles == VICUNA_V1.roles == ("USER", "ASSISTANT")


@pytest.mark.parametrize(
    "turns",
    [[], [gpt("a")], [human("q"), human("q")], [human("q")], [human("q"), {"from": "gpt"}]],
)
def test_render_rejects_bad_turns(turns):
    with pytest.raises(ValueError):
        render(turns, VICUNA_V1)


# --- regions ----------------------------------------------------------------------------------


def test_rewrite_numbered_repeated_and_out_of_order():
    text, indices = rewrite_regions("Is <region3> bigger than <region1>? Compare <region3>.")
    assert text == f"Is {REGION_TOKENS} bigger than {REGION_TOKENS}? Compare {REGION_TOKENS}."
    assert indices == [2, 0, 2]
    assert count_masks(text) == 3


def test_rewrite_bare_and_literal_region_tokens():
    assert rewrite_regions("Describe <region>.", bare_index=4) == (
        f"Describe {REGION_TOKENS}.",
        [4],
    )
    assert rewrite_regions(f"What is {REGION_TOKENS}?", bare_index=0) == (
        f"What is {REGION_TOKENS}?",
        [0],
    )
    assert rewrite_regions("no regions here") == ("no regions here", [])


@pytest.mark.parametrize(
    "text, kwargs, match",
    [
        ("Describe <region>.", {}, "bare_index"),
        ("Describe <region0>.", {}, "1-based"),
        ("Describe <region 2>.", {}, "malformed"),
        ("Describe <regions>.", {}, "malformed"),
        ("Describe <region2", {}, "malformed"),
        ("a lone <mask> token", {}, "malformed"),
        ("a lone <pos> token", {}, "malformed"),
        ("Describe <region3>.", {"num_regions": 2}, "2 region"),
    ],
)
def test_rewrite_errors_name_the_text(text, kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        rewrite_regions(text, **kwargs)
    assert repr(text) in str(err.value)


# --- templates --------------------------------------------------------------------------------


def test_template_tables():
    assert len(DETAILED_QUESTIONS) == 30  # the reference's list (Table A13 proof-read)
    assert len(BRIEF_QUESTIONS) == 30  # Table A14
    assert len(POSITIVE_NEGATIVE_QUESTIONS) == 9  # Table A15
    for question in (*DETAILED_QUESTIONS, *BRIEF_QUESTIONS, *POSITIVE_NEGATIVE_QUESTIONS):
        assert rewrite_regions(question, bare_index=0)[1] == [0], question
    for question in POSITIVE_NEGATIVE_QUESTIONS:
        assert "<category>" not in fill_category(question, "dog")
        assert "dog" in fill_category(question, "dog")
    assert DETAILED_QUESTIONS[0] == (
        "Can you provide me with a detailed description of the region in the picture marked by "
        "<region>?"
    )
    assert BRIEF_QUESTIONS[0] == "Please give me a short description of region <region>."
    assert POSITIVE_NEGATIVE_QUESTIONS[1] == "Is the category of <region> <category>?"


def test_inference_prompts_are_the_released_ones():
    def rewritten(prompt):
        return rewrite_regions(prompt, bare_index=0)[0]

    assert rewritten(SHORT_CAPTION_PROMPT) == (
        "Please give me a short description of <mask><pos>. Using a short phrase."
    )
    assert rewritten(DETAILED_PROMPT) == "Can you give me a detailed description of <mask><pos>?"
    assert rewritten(CATEGORY_PROMPT) == (
        "What is the category of <mask><pos>? Using only one word or phrase."
    )
    assert SHORT_ANSWER_SUFFIX == " Answer the question using a single word or phrase."


def test_choose_is_seeded():
    first = [choose(DETAILED_QUESTIONS, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1
    rng = random.Random(0)
    drawn = {choose(BRIEF_QUESTIONS, rng) for _ in range(500)}
    assert drawn == set(BRIEF_QUESTIONS)
    with pytest.raises(ValueError):
        choose([], rng)


def test_regions_overview_and_part_instruction():
    overview = regions_overview(3)
    assert overview.startswith("Ther are 3 part regions in the picture: region1<region1>,")
    assert rewrite_regions(overview)[1] == [0, 1, 2]
    assert "category:subcategory" in stage2_part_instruction(["dog"], ["head"], ":")
    with pytest.raises(ValueError):
        regions_overview(0)


# --- tokenisation -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(ANSWERS * 3, 700)


def labelled_runs(sample):
    """Contiguous spans of labelled ids (each should be one answer and its eos)."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return runs


def check_sample(tok, sample, answers):
    mask_id, pos_id = region_token_ids(tok)
    runs = labelled_runs(sample)
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers, strict=True):
        assert run[-1] == tok.eos_token_id
        assert tok.decode(run[:-1]) == answer
    ids = sample.input_ids
    assert ids[0] == tok.bos_token_id and sample.labels[0] == IGNORE_INDEX
    assert ids.count(mask_id) == ids.count(pos_id) == len(sample.region_indices)
    for i, token in enumerate(ids):
        if token == mask_id:
            assert ids[i + 1] == pos_id
        if token in (mask_id, pos_id, IMAGE_TOKEN_INDEX):
            assert sample.labels[i] == IGNORE_INDEX


def test_labels_cover_exactly_the_answers(tok):
    sample = tokenize_conversation(tok, TURNS, num_image_tokens=IMAGE_TOKENS)
    check_sample(tok, sample, ANSWERS)
    assert sample.region_indices == [1, 0, 1]
    # Answer tokens are those of the answer alone: the dummy "▁" stands for the space after
    # "ASSISTANT:" instead of adding a lone "▁" token.
    first = labelled_runs(sample)[0][:-1]
    assert first == tok.encode(ANSWERS[0], add_special_tokens=False)


def test_decoded_ids_read_as_the_rendered_prompt(tok):
    sample = tokenize_conversation(tok, TURNS, num_image_tokens=IMAGE_TOKENS)
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    decoded = tok.decode([t for t in sample.input_ids if t != IMAGE_TOKEN_INDEX])
    prepared = [dict(t) for t in TURNS]
    prepared[0]["value"] = IMAGE_PREFIX.replace(IMAGE_TOKEN, "") + prepared[0]["value"]
    expected = "<s>" + render(prepared, VICUNA_V1)
    expected = expected.replace("<region1>", REGION_TOKENS).replace("<region2>", REGION_TOKENS)
    # SentencePiece adds a "▁" after special tokens; compare the text, not its spacing.
    assert "".join(decoded.split()) == "".join(expected.split())


def test_image_placeholder(tok):
    sample = tokenize_conversation(tok, TURNS, num_image_tokens=IMAGE_TOKENS)
    position = sample.input_ids.index(IMAGE_TOKEN_INDEX)
    assert tok.decode(sample.input_ids[:position]).endswith(" USER: ")
    assert sample.num_positions(IMAGE_TOKENS) == len(sample.input_ids) + IMAGE_TOKENS - 1

    explicit = [human("<image>\nWhat is <region1>?"), gpt("a red circle")]
    assert tokenize_conversation(tok, explicit).input_ids.count(IMAGE_TOKEN_INDEX) == 1

    no_image = tokenize_conversation(tok, TURNS, image=False)
    assert IMAGE_TOKEN_INDEX not in no_image.input_ids
    check_sample(tok, no_image, ANSWERS)

    with pytest.raises(ValueError, match="image=False"):
        tokenize_conversation(tok, explicit, image=False)
    late = [human("q"), gpt("a"), human("<image> q2"), gpt("b")]
    with pytest.raises(ValueError, match="first human turn"):
        tokenize_conversation(tok, late)


def test_truncation_drops_whole_exchanges(tok):
    exchanges = [
        (human("Describe <region1> and <region2>."), gpt("a red circle")),
        (human("Now <region3>?"), gpt("the blue square, left of it")),
        (human("And <region2> again, then <region1>?"), gpt("a red circle")),
        (human("Last: <region3>."), gpt("the blue square")),
    ]
    turns = [t for pair in exchanges for t in pair]
    answers = [pair[1]["value"] for pair in exchanges]
    full = tokenize_conversation(tok, turns, num_image_tokens=IMAGE_TOKENS, max_length=None)
    check_sample(tok, full, answers)
    full_length = full.num_positions(IMAGE_TOKENS)

    seen_lengths = set()
    first_fit = None
    for max_length in range(full_length, 0, -1):
        try:
            cut = tokenize_conversation(
                tok, turns, num_image_tokens=IMAGE_TOKENS, max_length=max_length
            )
        except ValueError as err:
            assert "first exchange" in str(err)
            first_fit = max_length + 1
            break
        assert cut.num_positions(IMAGE_TOKENS) <= max_length
        assert cut.input_ids == full.input_ids[: len(cut.input_ids)]
        assert cut.region_indices == full.region_indices[: len(cut.region_indices)]
        kept = len(labelled_runs(cut))
        check_sample(tok, cut, answers[:kept])
        seen_lengths.add(kept)
    assert seen_lengths == {1, 2, 3, 4}
    assert first_fit is not None and first_fit > IMAGE_TOKENS


def test_answers_must_not_hold_regions_or_special_tokens(tok):
    with pytest.raises(ValueError, match="assistant answers"):
        tokenize_conversation(tok, [human("q <region1>"), gpt("it is <region1>")])
    with pytest.raises(ValueError, match="special token"):
        tokenize_conversation(tok, [human("q </s> USER: hi"), gpt("a")])
    with pytest.raises(ValueError, match="bare_index"):
        tokenize_conversation(tok, [human("q <region>"), gpt("a")])
    bare = tokenize_conversation(tok, [human("q <region>"), gpt("a")], bare_index=3)
    assert bare.region_indices == [3]


def test_generation_ids(tok):
    sample = build_generation_ids(tok, CATEGORY_PROMPT, bare_index=0)
    assert set(sample.labels) == {IGNORE_INDEX}
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert sample.region_indices == [0]
    text = tok.decode([t for t in sample.input_ids if t != IMAGE_TOKEN_INDEX])
    assert text.startswith("<s> A chat between a curious human")
    assert text.endswith("Using only one word or phrase. ASSISTANT:")

    history = [human("What is <region2>?"), gpt("a red circle")]
    follow = build_generation_ids(tok, "And <region1>?", history=history)
    assert follow.region_indices == [1, 0]
    assert follow.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert follow.input_ids.count(tok.eos_token_id) == 1
    # The history's image prefix sits in its first turn, before the first region.
    image_at = follow.input_ids.index(IMAGE_TOKEN_INDEX)
    assert image_at < follow.input_ids.index(region_token_ids(tok)[0])
    assert tok.decode(follow.input_ids[image_at + 1 :]).endswith("? ASSISTANT:")


# --- other tokenisers -------------------------------------------------------------------------


def byte_level_tokenizer():
    """A GPT-2-style tokeniser: no dummy prefix, spaces are part of the next token."""
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator([SYSTEM, *ANSWERS, IMAGE_PREFIX], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_tokens(["<mask>", "<pos>"], special_tokens=True)
    return tok


def test_byte_level_tokenizer_keeps_the_exact_text():
    tok = byte_level_tokenizer()
    sample = tokenize_conversation(tok, TURNS, num_image_tokens=IMAGE_TOKENS)
    runs = labelled_runs(sample)
    # Without a dummy prefix the space after "ASSISTANT:" is part of the answer's first token.
    assert [tok.decode(run[:-1]) for run in runs] == [" " + a for a in ANSWERS]
    assert all(run[-1] == tok.eos_token_id for run in runs)
    position = sample.input_ids.index(IMAGE_TOKEN_INDEX)
    before = tok.decode(sample.input_ids[:position])
    after = tok.decode(sample.input_ids[position + 1 :])
    rendered = render(
        [{**TURNS[0], "value": IMAGE_PREFIX + TURNS[0]["value"]}, *TURNS[1:]], VICUNA_V1
    )
    rendered = rendered.replace("<region1>", REGION_TOKENS).replace("<region2>", REGION_TOKENS)
    assert before + IMAGE_TOKEN + after == "<s>" + rendered
