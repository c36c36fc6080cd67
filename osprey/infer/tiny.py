"""A tiny Osprey model directory (random weights, the shapes tokenizer) for smoke runs, tests
and benchmarks of the captioning job, which needs no trained model to exercise its machinery."""

from __future__ import annotations

import os
from pathlib import Path

from osprey.model import build_model, get_config
from osprey.model.checkpoint import save_checkpoint


def write_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a `tiny`-preset model with random weights and a tokenizer trained on the shapes
    corpus into out_dir (what `load_model` and `load_tokenizer` read); returns the folder."""
    from osprey.data.shapes import shapes_corpus
    from osprey.prompts import train_tokenizer

    config = get_config("tiny")
    tokenizer = train_tokenizer(shapes_corpus(), vocab_size=config.llm.vocab_size)
    model = build_model(config, seed=seed)
    return save_checkpoint(model, out_dir, tokenizer)
