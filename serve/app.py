"""Entry of the Serve application: `serve run serve/config.yaml`, `serve deploy
serve/config.yaml`, or `serve run serve.app:app model=DIR` (import path `serve.app:app`).

`app` is an application builder: Serve calls it with the config's `args` (see
osprey.serve.config.ServeArgs); what they leave out comes from the environment (OSPREY_MODEL or
OSPREY_MODEL_DIR, the token from OSPREY_API_TOKEN).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from osprey.serve.app import build_app


def app(args: dict[str, Any]) -> Application:
    return build_app(args)
