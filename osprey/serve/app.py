"""The `osprey` Serve application: MaskGenerator and Captioner behind the OspreyIngress."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from osprey.serve.config import ServeArgs
from osprey.serve.deployments import Captioner, MaskGenerator, OspreyIngress

DEPLOYMENTS = ("MaskGenerator", "Captioner", "OspreyIngress")


def build_app(
    args: ServeArgs | dict[str, Any] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> Application:
    """The application for `args`; `options` maps a deployment name to `.options(...)` keywords
    (tests and benchmarks; a config file's `deployments:` section does the same)."""
    config = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    options = options or {}
    unknown = set(options) - set(DEPLOYMENTS)
    if unknown:
        raise ValueError(f"options for unknown deployments {sorted(unknown)}; see {DEPLOYMENTS}")
    plain = config.model_dump()
    masks = MaskGenerator.options(**options.get("MaskGenerator", {})).bind(plain)
    captioner = Captioner.options(**options.get("Captioner", {})).bind(plain)
    return OspreyIngress.options(**options.get("OspreyIngress", {})).bind(masks, captioner, plain)
