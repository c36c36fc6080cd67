"""What the HTTP routes (osprey.serve.api, osprey.serve.chat_completions) need from the
deployments: the ingress's handles in Serve, plain objects in tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    """What the routes need from the deployments."""

    segmenter_name: str
    model_name: str

    async def segment(
        self, image: np.ndarray, mode: str, prompts: list[tuple[float, ...]], limit: int
    ) -> list[dict]: ...

    async def describe(
        self, image: np.ndarray, regions: list[dict], tasks: list[str], question: str | None,
        max_new_tokens: int, decoding: str | None = None,
    ) -> list[dict[str, str]]: ...  # fmt: skip

    async def chat(
        self, image: np.ndarray, regions: list[dict], turns: list[dict], params: dict[str, Any]
    ) -> dict[str, Any]: ...

    def chat_stream(
        self, image: np.ndarray, regions: list[dict], turns: list[dict], params: dict[str, Any]
    ) -> Awaitable[AsyncIterator[dict[str, Any]]]: ...

    async def ready(self) -> dict[str, str]: ...
