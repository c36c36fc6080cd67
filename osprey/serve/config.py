"""The Serve application's arguments: what `args:` in serve/config.yaml (or `serve run ...
key=value`) may hold. Validated by pydantic, so a typo or a bad value fails the deploy with the
option's name."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Environment variables read when the arguments leave a value out (the RayService sets them).
MODEL_ENV = ("OSPREY_MODEL", "OSPREY_MODEL_DIR")
TOKEN_ENV = "OSPREY_API_TOKEN"


class Limits(BaseModel):
    """What one request may ask for; beyond it the API answers 4xx naming the field."""

    model_config = ConfigDict(extra="forbid")

    max_image_bytes: int = Field(20 * 2**20, ge=1, description="encoded image size")
    max_image_pixels: int = Field(16_000_000, ge=1, description="width x height")
    max_regions: int = Field(32, ge=1, description="masks, points or boxes per request")
    max_new_tokens: int = Field(512, ge=1, description="tokens generated per answer")
    max_messages: int = Field(16, ge=1, description="chat turns per request")
    max_message_chars: int = Field(2000, ge=1, description="characters per chat turn")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: a base64 image (4/3 of its bytes) plus masks and text."""
        return self.max_image_bytes * 4 // 3 + 8 * 2**20


class ServeArgs(BaseModel):
    """Arguments of the `osprey` Serve application."""

    model_config = ConfigDict(extra="forbid")

    # A model directory (ours or a release's), a Hugging Face id `ORG/NAME[@REV]`, an s3://
    # prefix, an MLflow registered model `models:/name@alias` (or `models:/name/version`), or
    # `tiny` (random weights: smoke tests and demos); docs/models.md.
    model: str = Field(default_factory=lambda: _env(*MODEL_ENV))
    # The model's id in the OpenAI-compatible API (`model` of /v1/chat/completions).
    served_model_name: str = "osprey"
    # A LoRA adapter for `model` (osprey finetune's folder, or `models:/name@alias`), applied
    # unmerged.
    adapter: str | None = None
    # MLflow tracking (and registry) URI for `models:/...`; default MLFLOW_TRACKING_URI.
    tracking_uri: str | None = None
    # Captioner device: auto is cuda when the replica was given a GPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    template: str = "osprey_v1"
    # Decoding of requests that do not name one: greedy, or the released code's sampling
    # (`reference`: temperature 0.2, top-p/top-k from the model's generation_config.json).
    decoding: Literal["greedy", "reference"] = "greedy"
    # A local transformers SamModel directory; without it the classical segmenter.
    sam_weights: str | None = None
    # Dynamic batching of describe requests across clients (@serve.batch).
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    # Rows of one decode batch in the engine.
    max_batch_regions: int = Field(64, ge=1)
    limits: Limits = Field(default_factory=Limits)
    # Bearer-token authentication: the token is read from this environment variable of the
    # ingress replicas; unset or empty turns authentication off. Never put the token here.
    auth_token_env: str = TOKEN_ENV
    # Seconds an ingress waits for a deployment before answering 504.
    request_timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ServeArgs:
        if not self.model:
            raise ValueError(
                "model: give a model directory, models:/name@alias or tiny (in the app's args "
                f"or the {' or '.join(MODEL_ENV)} environment variable)"
            )
        from osprey.prompts.conversation import TEMPLATES

        if self.template not in TEMPLATES:
            raise ValueError(f"template {self.template!r}: choose one of {sorted(TEMPLATES)}")
        return self


def _env(*names: str) -> str:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return ""
