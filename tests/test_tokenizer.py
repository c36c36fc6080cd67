"""The tiny LLaMA-like tokeniser: layout, round trips, region tokens, save/load."""

from __future__ import annotations

import inspect
import json

import pytest

from osprey.constants import MASK_TOKEN, POS_TOKEN
from osprey.prompts.tokenizer import (
    base_corpus,
    load_tokenizer,
    region_token_ids,
    save_tokenizer,
    train_tokenizer,
)

VOCAB = 700
SHAPES = ["a red circle above a blue square", "a green triangle left of a yellow star"] * 4


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(SHAPES, VOCAB)


def test_layout_is_llama_like(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == tok.unk_token_id
    assert tok.convert_tokens_to_ids("<0x00>") == 3
    assert tok.convert_tokens_to_ids("<0xFF>") == 258
    # <mask>/<pos> right after the base vocabulary, like 32000/32001 in the released tokenizer.
    assert region_token_ids(tok) == (VOCAB, VOCAB + 1)
    assert len(tok) == VOCAB + 2


def test_training_is_deterministic(tok):
    again = train_tokenizer(SHAPES, VOCAB)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


@pytest.mark.parametrize(
    "text",
    [
        "a red circle above a blue square",
        " leading space and  double  spaces ",
        "line one\nline two\ttabbed",
        "unseen words: zygote, quixotic, 42%",
        "unicode: héllo wörld, 日本語, emoji 🙂",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids  # byte fallback covers every character
    assert tok.decode(ids) == text


def test_region_tokens_are_single_ids(tok):
    mask_id, pos_id = region_token_ids(tok)
    ids = tok.encode(f"left of {MASK_TOKEN}{POS_TOKEN} here", add_special_tokens=False)
    assert ids.count(mask_id) == 1 and ids.count(pos_id) == 1
    assert ids.index(pos_id) == ids.index(mask_id) + 1


def test_adds_a_dummy_prefix_like_sentencepiece(tok):
    tokens = tok.convert_ids_to_tokens(tok.encode("circle", add_special_tokens=False))
    assert tokens[0].startswith("\u2581")
    # Plain calls add bos, as LLaMA's tokenizer does.
    assert tok("circle").input_ids[0] == tok.bos_token_id


def test_extra_texts_are_learned():
    word = "dodecahedron"
    plain = train_tokenizer([], 600)
    shaped = train_tokenizer([f"a {word}"] * 20, 600)
    assert len(shaped.encode(word, add_special_tokens=False)) < len(
        plain.encode(word, add_special_tokens=False)
    )


def test_base_corpus_has_prompts_without_placeholders():
    texts = list(base_corpus())
    joined = "\n".join(texts)
    assert "A chat between a curious user" in joined
    assert "ASSISTANT:" in joined
    assert "Using only one word or phrase." in joined
    for placeholder in ("<image>", "<region", "<mask>", "<pos>", "<category>"):
        assert placeholder not in joined


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], 100)


def test_save_load_round_trip(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    text = f"USER: what is {MASK_TOKEN}{POS_TOKEN}? ASSISTANT: a red circle"
    assert loaded.encode(text) == tok.encode(text)
    assert region_token_ids(loaded) == region_token_ids(tok)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert len(loaded) == len(tok)


def test_load_adds_missing_region_tokens(tok, tmp_path):
    """A Vicuna-style directory (LLaMA tokenizer, no <mask>/<pos>) gets them appended."""
    llama = llama_from(tok)
    assert MASK_TOKEN not in llama.get_vocab()
    llama.save_pretrained(str(tmp_path / "vicuna"))
    loaded = load_tokenizer(tmp_path / "vicuna")
    assert region_token_ids(loaded) == (VOCAB, VOCAB + 1)
    assert loaded.pad_token == loaded.unk_token
    text = "a red circle above a blue square"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(
        text, add_special_tokens=False
    )


def llama_from(tok):
    """transformers' own LLaMA tokenizer class over our vocabulary and merges."""
    from transformers import LlamaTokenizer

    if "merges" not in inspect.signature(LlamaTokenizer.__init__).parameters:
        pytest.skip("this transformers' LlamaTokenizer is built from a sentencepiece file only")
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    merges = [tuple(m) for m in model["merges"]]
    return LlamaTokenizer(vocab=dict(model["vocab"]), merges=merges)


def test_load_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
