"""A tiny checkpoint in the released Osprey-7B's layout (sunshine-lwt/Osprey-7b), and a Hugging
Face cache folder laid out as huggingface_hub lays it out, for offline tests of model sources.

The release's layout: LLaMA-style `pytorch_model-0000K-of-0000N.bin` shards with
`pytorch_model.bin.index.json`, the legacy `rotary_emb.inv_freq` buffers, a config.json that is a
LLaMA config with `model_type: osprey` and LLaVA's `mm_*` fields, and a SentencePiece tokenizer
(`tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json` with
`<mask>`/`<pos>` right after the base vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

import osprey


def write_released_checkpoint(out: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """(the directory, the in-memory model whose weights it holds)."""
    model = osprey.build_model("tiny", seed=seed).eval()
    cfg = model.config
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    head_dim = cfg.llm.hidden_size // cfg.llm.num_attention_heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(cfg.llm.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for n, names in enumerate(shards, start=1):
        file = f"pytorch_model-{n:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in names}, out / file)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    llm = cfg.llm
    (out / "config.json").write_text(json.dumps({
        "_name_or_path": "osprey-tiny-released",
        "architectures": ["OspreyLlamaForCausalLM"],
        "model_type": "osprey",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "silu", "hidden_size": llm.hidden_size,
        "initializer_range": 0.02, "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "rms_norm_eps": llm.rms_norm_eps, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.28.0.dev0",
        "use_cache": True, "vocab_size": llm.vocab_size,
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "mm_hidden_size": cfg.vision.channels[2], "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "./open_clip_pytorch_model.bin",
        "tune_mm_mlp_adapter": False, "use_mm_proj": True,
    }, indent=2))  # fmt: skip
    write_sentencepiece_tokenizer(out, llm.vocab_size)
    return out, model


def write_sentencepiece_tokenizer(out: Path, vocab_size: int) -> None:
    """A LLaMA-style SentencePiece tokenizer trained offline on the prompts and shapes text."""
    import sentencepiece as spm

    from osprey.data.shapes import shapes_corpus
    from osprey.prompts.tokenizer import base_corpus

    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in [*base_corpus(), *shapes_corpus()]))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "add_bos_token": True,
        "add_eos_token": False, "legacy": False, "model_max_length": 2048,
    }))  # fmt: skip
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    ))  # fmt: skip
    (out / "added_tokens.json").write_text(
        json.dumps({"<mask>": vocab_size, "<pos>": vocab_size + 1})
    )


def place_in_hub_cache(src: Path, hub_cache: Path, repo_id: str, commit: str) -> Path:
    """Lay `src`'s files out as huggingface_hub caches a snapshot: content-addressed blobs,
    `snapshots/<commit>/<file>` symlinks to them, and `refs/main` naming the commit."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
