"""`osprey serve`: run the Serve application in the foreground, like `serve run`, from
serve/config.yaml (its args and deployment options) with command-line overrides."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None,
        help="a Serve config file (default serve/config.yaml): its first application's args "
        "and deployment options",
    )
    parser.add_argument("--model", help="model directory, models:/NAME@ALIAS, or tiny")
    parser.add_argument(
        "--adapter", help="LoRA adapter for --model: osprey finetune's folder or models:/NAME@ALIAS"
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/...")
    parser.add_argument("--sam-weights", help="local transformers SamModel directory")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-batch-size", type=int, help="describe requests per batch")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--address", help="a running Ray cluster (default: RAY_ADDRESS, else local)"
    )


def app_from_config(path: str | None, overrides: dict[str, Any]) -> tuple[dict, dict, str]:
    """(args, per-deployment options, route prefix) of the config file's first application."""
    args: dict[str, Any] = {}
    options: dict[str, dict] = {}
    route = "/"
    if path:
        config = yaml.safe_load(Path(path).read_text())
        app = config["applications"][0]
        args = dict(app.get("args") or {})
        route = app.get("route_prefix", "/")
        for deployment in app.get("deployments", []):
            deployment = dict(deployment)
            options[deployment.pop("name")] = deployment
    args.update({k: v for k, v in overrides.items() if v is not None})
    return args, options, route


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from osprey.cluster import init_ray
    from osprey.serve.app import build_app

    overrides = {
        "model": args.model,
        "adapter": args.adapter,
        "tracking_uri": args.tracking_uri,
        "sam_weights": args.sam_weights,
        "device": args.device,
        "max_batch_size": args.max_batch_size,
    }
    app_args, options, route = app_from_config(args.config, overrides)
    application = build_app(app_args, options)  # validates before anything starts
    init_ray(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="osprey", route_prefix=route)
    print(f"osprey serve: http://{args.host}:{args.port}{route} (API docs at /docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
