"""Request fuzzing against the API's own OpenAPI schema (schemathesis, bounded): valid and
invalid bodies for every operation, some with a real image so the fuzzing reaches past image
decoding into masks, points and messages. No request may get a 5xx."""

from __future__ import annotations

import random

import pytest

# Imported at collection, on a shallow stack: pytest rewrites schemathesis' modules (a pytest
# plugin) on first import, and CPython 3.11.7's ast.parse inside a deep test stack once failed
# with "SystemError: AST constructor recursion depth mismatch" (run after the end-to-end module).
import schemathesis
import schemathesis.specs.openapi.schemas  # noqa: F401
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from serve_support import image_b64

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLES = 25  # per operation and generation mode: ~20 operations x 25 = bounded
IMAGE = image_b64(seed=7, size=48)


def with_real_image(case, rng: random.Random) -> None:
    """Half the JSON bodies that carry an image get a real (small) one."""
    body = case.body
    if isinstance(body, dict) and "image" in body and rng.random() < 0.5:
        body["image"] = IMAGE


def test_fuzzing_finds_no_server_error(serve_app):
    schema = schemathesis.openapi.from_url(serve_app.url + "/openapi.json")
    rng = random.Random(0)
    failures: list[str] = []
    calls = unsatisfiable = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:
        for mode in schemathesis.GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case) -> None:
                nonlocal calls
                with_real_image(case, rng)
                response = case.call(base_url=serve_app.url, timeout=60)
                calls += 1
                if response.status_code >= 500:
                    failures.append(
                        f"{response.status_code} {case.method} {case.path}: "
                        f"{response.text[:300]}\n{case.as_curl_command()[:500]}"
                    )

            try:
                run()
            except Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.path
                unsatisfiable += 1  # nothing to make invalid (a GET without parameters)
    print(f"fuzzing: {calls} requests over {len(operations)} operations")
    assert calls >= len(operations) * 2 and unsatisfiable < len(operations)
    assert not failures, "\n\n".join(failures[:5])
