"""`osprey export --merge`: a base model plus a LoRA adapter folder -> one merged model
directory in our checkpoint format (what every `--model` reads)."""

from __future__ import annotations

import argparse
import json


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="the base model: a model directory or models:/NAME@ALIAS"
    )
    parser.add_argument(
        "--adapter", required=True, help="an adapter folder or models:/NAME@ALIAS (finetune's)"
    )
    parser.add_argument("--out", required=True, help="folder for the merged model")
    parser.add_argument(
        "--merge", action="store_true", help="fold the adapters into the weights (required)"
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/...")


def run_export(args: argparse.Namespace) -> None:
    from osprey.model import load_model
    from osprey.model.adapter import merge_adapters
    from osprey.model.checkpoint import save_checkpoint
    from osprey.prompts import load_tokenizer
    from osprey.serve.model_source import resolve_adapter, resolve_model

    if not args.merge:
        raise ValueError("--merge: the only export is a merged model; give --merge")
    model_dir = resolve_model(args.model, args.tracking_uri)
    adapter_dir = resolve_adapter(args.adapter, args.tracking_uri)
    model = merge_adapters(load_model(model_dir, adapter=adapter_dir))
    out = save_checkpoint(model, args.out, tokenizer=load_tokenizer(model_dir))
    print(json.dumps({"model": str(out), "base": model_dir, "adapter": adapter_dir}, indent=2))
