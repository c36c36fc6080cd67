"""The released Osprey-7B's tokens: our ids and labels against the reference pipeline.

The reference (github CircleRadon/Osprey, transformers 4.31, `use_fast=True`) renders the vicuna
v1 prompt as one string, moves `<image>` to the front of its turn (`preprocess_multimodal`), splits
on `<image>` (`mm_utils.tokenizer_image_token`), lets the fast tokenizer split each chunk on its
special tokens and encode every text in between with SentencePiece's dummy prefix, and masks the
labels by re-tokenising each round (`train.preprocess_v1`). That algorithm is re-implemented here
with `sentencepiece` on the real LLaMA `tokenizer.model` (tests/assets), independently of
osprey.prompts.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from osprey.data.examples import description_turns, stage2_turns
from osprey.eval.benchmarks import CATEGORY_QUESTION, OPENVOCAB_QUESTION, REFCOCOG_QUESTION
from osprey.prompts import (
    BRIEF_QUESTIONS,
    CATEGORY_PROMPT,
    DETAILED_PROMPT,
    DETAILED_QUESTIONS,
    OSPREY_V1,
    POSITIVE_NEGATIVE_QUESTIONS,
    SHORT_ANSWER_SUFFIX,
    SHORT_CAPTION_PROMPT,
    VCR_REFERENCE_WAYS,
    VICUNA_V1,
    build_generation_ids,
    build_release_tokenizer,
    fill_category,
    load_tokenizer,
    regions_overview,
    tokenize_conversation,
    vcr_opening,
)

SP_MODEL = Path(__file__).parent / "assets" / "llama2_tokenizer" / "tokenizer.model"
IGNORE, IMAGE = -100, -200
BOS, EOS, MASK, POS = 1, 2, 32000, 32001
OVERVIEW = "<image>\nThis provides an overview of the picture.\n"
SPECIALS = {"<unk>": 0, "<s>": BOS, "</s>": EOS, "<mask>": MASK, "<pos>": POS}


# ---- the reference pipeline, from its algorithm -------------------------------------------


class Reference:
    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def tokenizer(self, text: str) -> list[int]:
        """transformers 4.31 LlamaTokenizerFast(text).input_ids with <mask>/<pos> added."""
        ids = [BOS]
        for part in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
            if part in SPECIALS:
                ids.append(SPECIALS[part])
            elif part:
                ids.extend(self.sp.encode(part))  # the model's normaliser adds the dummy "▁"
        return ids

    def tokenizer_image_token(self, prompt: str) -> list[int]:
        chunks = [self.tokenizer(chunk) for chunk in prompt.split("<image>")]
        ids = [BOS]
        for k, chunk in enumerate(chunks):
            if k:
                ids.append(IMAGE)
            ids.extend(chunk[1:])
        return ids

    @staticmethod
    def preprocess_multimodal(value: str) -> str:
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        return value

    @staticmethod
    def prompt(turns, system, generation=False) -> str:
        out = system + " "
        for turn in turns:
            if turn["from"] == "human":
                out += "USER: " + turn["value"] + " "
            else:
                out += "ASSISTANT: " + turn["value"] + "</s>"
        return out + ("ASSISTANT:" if generation else "")

    def preprocess_v1(self, turns, system):
        """Ids and labels as train.preprocess_v1 makes them (no truncation: prompts are short)."""
        prompt = self.prompt(turns, system)
        ids = self.tokenizer_image_token(prompt)
        labels = list(ids)
        sep = " ASSISTANT: "
        cur = 1
        labels[:1] = [IGNORE]
        for rou in prompt.split("</s>"):
            if rou == "":
                break
            parts = rou.split(sep)
            assert len(parts) == 2, rou
            round_len = len(self.tokenizer_image_token(rou))
            instruction_len = len(self.tokenizer_image_token(parts[0] + sep)) - 2
            labels[cur : cur + instruction_len] = [IGNORE] * instruction_len
            cur += round_len
        labels[cur:] = [IGNORE] * (len(labels) - cur)
        # The reference drops the whole sample's labels on a length mismatch; none may happen.
        assert cur == sum(1 for i in ids if i != 0), "reference tokenization mismatch"
        return ids, labels


def as_reference_turns(turns, image=True):
    """The turns as the reference's data classes hand them over: regions written as
    <mask><pos>, the overview line in the first turn, <image> moved to its front."""
    out = []
    for k, turn in enumerate(turns):
        value = re.sub(r"<region\d*>", "<mask><pos>", turn["value"])
        if k == 0 and image:
            value = value if "<image>" in value else OVERVIEW + value
            value = Reference.preprocess_multimodal(value)
        out.append({"from": turn["from"], "value": value})
    return out


@pytest.fixture(scope="module")
def ref():
    return Reference(SP_MODEL)


@pytest.fixture(scope="module")
def tok():
    return build_release_tokenizer(SP_MODEL)


# ---- prompt forms the project produces -----------------------------------------------------


def conv(*pairs):
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def _rows():
    cats = [
        {"category": "person"},
        {"category": "dog"},
        {"category": "traffic light"},
        {"category": "cat:head"},
    ]
    for task, source in [
        ("category", "coco"),
        ("refer", "refcoco"),
        ("refer", "refcoco+"),
        ("part", "pascal_part"),
        ("part", "partimagenet"),
        ("detailed", "osprey724k"),
        ("short", "osprey724k"),
        ("short", "vg"),
    ]:
        yield task, source, {"task": task, "source": source, "regions": cats}


def training_samples():
    samples = {}
    # Stage 1: an LLaVA CC3M caption pair, <image> written before or after the request.
    samples["stage1 image first"] = conv(("<image>\nDescribe the image concisely.", "a red car"))
    samples["stage1 image last"] = conv(("Render a clear summary.\n<image>", "two dogs on grass"))
    samples["trailing newline"] = conv(("What is <region1>?\n", "A dog."))
    # Stage 2 and the templated description rows, from the project's own builders.
    for task, source, row in _rows():
        build = description_turns if task in ("detailed", "short") else stage2_turns
        samples[f"{task} {source}"] = build(row, random.Random(0), 3)
    # Every question template, the region in mid-sentence.
    for k, question in enumerate(DETAILED_QUESTIONS + BRIEF_QUESTIONS):
        q = question.replace("<region>", "<region1>")
        samples[f"template {k}"] = conv((q, "A brown dog lying on a couch."))
    for k, question in enumerate(POSITIVE_NEGATIVE_QUESTIONS):
        q = fill_category(question, "zebra").replace("<region>", "<region1>") + SHORT_ANSWER_SUFFIX
        samples[f"positive/negative {k}"] = conv((q, "No"))
    # Osprey-724K conversation and VCR, several regions.
    samples["conversation"] = conv(
        (regions_overview(3) + "What is region1 doing next to <region2>?", "It is sitting."),
        ("And <region3>, is it in the image?", "Yes, on the left."),
    )
    samples["vcr"] = conv(
        (
            vcr_opening(2, VCR_REFERENCE_WAYS[1])
            + "Is person at region1 taller than dog at region2?",
            "Yes, much taller.",
        ),
        ("Why is that?", "Person is standing up."),
    )
    return samples


TRAINING = training_samples()


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_training_ids_and_labels_equal_the_reference(name, tok, ref):
    turns = TRAINING[name]
    ours = tokenize_conversation(tok, turns, template=VICUNA_V1, max_length=None)
    ids, labels = ref.preprocess_v1(as_reference_turns(turns), VICUNA_V1.system)
    assert ours.input_ids == ids, name
    assert ours.labels == labels, name
    assert ids.count(MASK) == len(ours.region_indices)


INFERENCE = {
    "short caption": SHORT_CAPTION_PROMPT,
    "detailed": DETAILED_PROMPT,
    "category": CATEGORY_PROMPT,
    "lvis/paco": CATEGORY_QUESTION,
    "refcocog": REFCOCOG_QUESTION,
    "open vocabulary": OPENVOCAB_QUESTION,
    "pope": "<image>\nIs there a dog in the image?",
}


@pytest.mark.parametrize("name", sorted(INFERENCE))
def test_generation_ids_equal_the_reference(name, tok, ref):
    question = INFERENCE[name]
    ours = build_generation_ids(tok, question, template=OSPREY_V1, bare_index=0, num_regions=1)
    turns = as_reference_turns([{"from": "human", "value": question}])
    assert ours.input_ids == ref.tokenizer_image_token(ref.prompt(turns, OSPREY_V1.system, True))


def test_chat_with_history_equals_the_reference(tok, ref):
    history = conv((regions_overview(2) + "What is <region1>?", "A cat."))
    question = "Is <region2> bigger than it?"
    ours = build_generation_ids(tok, question, template=OSPREY_V1, history=history)
    turns = as_reference_turns([*history, {"from": "human", "value": question}])
    assert ours.input_ids == ref.tokenizer_image_token(ref.prompt(turns, OSPREY_V1.system, True))


def test_image_moves_to_the_front_of_the_first_turn(tok):
    ours = build_generation_ids(tok, REFCOCOG_QUESTION, bare_index=0, num_regions=1)
    start = ours.input_ids.index(IMAGE)
    # "<image>.\n" reaches the model as "<image>\n.\n": ▁ <0x0A> . <0x0A> after the image.
    after = tok.convert_ids_to_tokens(ours.input_ids[start + 1 : start + 5])
    assert after == ["\u2581", "<0x0A>", ".", "<0x0A>"]


def test_text_after_a_region_keeps_its_space(tok):
    # The difference newer transformers' LlamaTokenizer makes ("▁▁" "in"): pinned here.
    ours = build_generation_ids(tok, "What is <region> in the image?", bare_index=0, num_regions=1)
    after = ours.input_ids[ours.input_ids.index(POS) + 1 :][:3]
    assert tok.convert_ids_to_tokens(after) == ["\u2581", "\u2581in", "\u2581the"]


def test_release_tokenizer_layout(tok):
    assert len(tok) == 32002
    assert tok.convert_tokens_to_ids(["<mask>", "<pos>"]) == [MASK, POS]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 0)
    assert tok("hi").input_ids[0] == BOS and tok("hi").input_ids[-1] != EOS


def test_checkpoint_files_load_as_the_release(tmp_path, tok, ref):
    """A released checkpoint's tokenizer files (Vicuna's config says legacy=false) give the same
    tokens; our own saved copy reloads to the same tokens."""
    release = tmp_path / "osprey-7b"
    release.mkdir()
    shutil.copy(SP_MODEL, release / "tokenizer.model")
    (release / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True})
    )
    (release / "added_tokens.json").write_text(json.dumps({"<mask>": 32000, "<pos>": 32001}))
    loaded = load_tokenizer(release)
    text = "USER: <mask><pos> in it</s>USER:  two  spaces\n?"
    expected = ref.tokenizer(text)
    assert loaded(text).input_ids == expected
    loaded.save_pretrained(tmp_path / "ours")
    assert load_tokenizer(tmp_path / "ours")(text).input_ids == expected

    (release / "added_tokens.json").write_text(json.dumps({"<mask>": 32001, "<pos>": 32000}))
    with pytest.raises(ValueError, match="<mask>"):
        load_tokenizer(release)
