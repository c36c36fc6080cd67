"""Captioning through a running Osprey Serve application instead of a model of one's own.

`ServeCaptionStage` is `CaptionStage` with the engine call replaced by requests to the app's
Captioner deployment handle (one per image, all of a batch in flight together so the replicas'
`@serve.batch` groups them), so batch jobs and online traffic share the same replicas.
Overload is not an error of the image: a request the app sheds (BackPressureError, a replica
that went away) is sent again after an exponential backoff, until `retry_timeout_s`; past it
the stage raises, so the job fails without writing a row for the image and a rerun does it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from osprey.data.images import DEFAULT_MAX_PIXELS
from osprey.infer.stages import CaptionStage, Row

if TYPE_CHECKING:
    from osprey.infer.config import Task

log = logging.getLogger(__name__)

CAPTIONER = "Captioner"  # the deployment's name in osprey.serve.app


def transient(exc: BaseException) -> bool:
    """Whether the app shed or lost the request (worth sending again), rather than refused it."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )

    kinds = (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
        ActorDiedError,
        ActorUnavailableError,
        GetTimeoutError,
        TimeoutError,
    )
    return isinstance(exc, kinds)


class ServeCaptionStage(CaptionStage):
    """Regions' answers from the Serve app `app` (see the module)."""

    def __init__(
        self,
        app: str,
        tasks: Sequence[Task],
        deployment: str = CAPTIONER,
        decoding: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        keep_data: bool = False,
        answer_tokens: int | None = None,
        request_timeout_s: float = 600.0,
        retry_timeout_s: float = 3600.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
        handle: Any = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if handle is None:
            from ray import serve

            # Fails here, before any image, when the app or its captioner is not running.
            handle = serve.get_deployment_handle(deployment, app_name=app)
        self.handle = handle
        self.app = app
        self.decoding = decoding  # greedy or reference; None: the app's own mode
        self.request_timeout_s = request_timeout_s
        self.retry_timeout_s = retry_timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self.retries = 0  # requests sent again (tests and logs read it)
        self._setup(tasks, max_pixels, keep_data, answer_tokens)

    def _caption_group(self, rows: list[Row], tasks: list[Task]) -> None:
        spec = [(t.name, t.question, t.max_new_tokens) for t in tasks]
        pending: dict[int, tuple] = {}
        for i, row in enumerate(rows):
            try:
                image, regions = self.inputs(row)
            except Exception as exc:
                row["error"] = f"{row['path']}: captioning failed: {type(exc).__name__}: {exc}"
                continue
            pending[i] = (image, [r.to_dict() for r in regions])
        delay = self.backoff_s
        began = time.monotonic()
        while pending:
            sent = {i: self._send(args, spec) for i, args in pending.items()}
            shed = {}
            for i, response in sent.items():
                row = rows[i]
                try:
                    answers = response.result(timeout_s=self.request_timeout_s)
                except Exception as exc:
                    if transient(exc):
                        shed[i] = pending[i]
                    else:
                        name = type(getattr(exc, "cause", None) or exc).__name__
                        row["error"] = f"{row['path']}: captioning failed: {name}: {_text(exc)}"
                    continue
                row["captions"] = json.dumps(answers)
            if not shed:
                return
            if time.monotonic() - began > self.retry_timeout_s:
                raise RuntimeError(
                    f"the Serve app {self.app!r} shed {len(shed)} requests for "
                    f"{self.retry_timeout_s:.0f} s; their images are left for a rerun"
                )
            self.retries += len(shed)
            log.info("%d requests shed by %r; again in %.2f s", len(shed), self.app, delay)
            # Jitter, so that many actors shed at once do not come back at once.
            self.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, self.max_backoff_s)
            pending = shed

    def _send(self, args: tuple, spec: list[tuple[str, str, int]]):
        try:
            return self.handle.caption.remote(*args, spec, self.decoding)
        except Exception as exc:  # a handle may refuse at once rather than on result()
            return _Refused(exc)


class _Refused:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def result(self, timeout_s: float | None = None):
        raise self.exc


def _text(exc: BaseException) -> str:
    """The replica's own message, not Ray's traceback around it."""
    cause = getattr(exc, "cause", None)
    lines = str(cause if cause is not None else exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__
