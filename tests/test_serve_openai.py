"""The OpenAI-compatible endpoint, driven by the official `openai` client against the running
Serve app on loopback: plain and streamed answers, concurrency and batching, usage counts,
regions by `extra_body` and by alpha channel, disconnects, and OpenAI error bodies."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import openai
import pytest
from pycocotools import mask as mask_utils
from serve_support import LIMITS, b64, bomb_png, expected_answer, png_bytes, scene

pytestmark = pytest.mark.timeout(900)
MODEL = "osprey"


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=serve_app.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def shapes():
    s = scene(seed=3)
    rles = []
    for m in s.masks:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rles.append({"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")})
    return s, rles


def data_url(array: np.ndarray) -> str:
    return "data:image/png;base64," + b64(png_bytes(array))


def user(text: str, url: str | None = None) -> dict:
    parts = [{"type": "text", "text": text}]
    if url is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": parts}


def captioner_stats(app) -> dict:
    from ray import serve

    return serve.get_deployment_handle("Captioner", app.name).stats.remote().result()


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_plain_and_streamed_answers_are_the_same_and_usage_is_counted(serve_app, client, shapes):
    s, rles = shapes
    kwargs = dict(
        model=MODEL, max_tokens=12, temperature=0,
        messages=[user("What is <region2> beside <region1>?", data_url(s.image))],
        extra_body={"regions": [{"rle": rles[0]}, {"rle": rles[1]}]},
    )  # fmt: skip
    plain = client.chat.completions.create(**kwargs)
    [choice] = plain.choices
    text, positions, ids = expected_answer(
        serve_app.model_dir, s.image, s.masks[:2], "What is <region2> beside <region1>?", 12
    )
    assert choice.message.content == text and choice.message.role == "assistant"
    assert choice.finish_reason == ("length" if len(ids) == 12 else "stop")
    assert plain.usage.prompt_tokens == positions
    assert plain.usage.completion_tokens == len(ids)
    assert plain.usage.total_tokens == positions + len(ids)

    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(deltas) == text
    assert len(deltas) > 2, "tokens arrive as they decode, not as one finished answer"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_region_as_alpha_channel_equals_the_same_region_as_rle(client, shapes):
    s, rles = shapes
    rgba = np.dstack([s.image, (s.masks[0] * 255).astype(np.uint8)])
    question = "What is <region1>?"
    by_alpha = client.chat.completions.create(
        model=MODEL, max_tokens=10, messages=[user(question, data_url(rgba))]
    )
    by_rle = client.chat.completions.create(
        model=MODEL, max_tokens=10, messages=[user(question, data_url(s.image))],
        extra_body={"regions": [{"rle": rles[0]}]},
    )  # fmt: skip
    assert by_alpha.choices[0].message.content == by_rle.choices[0].message.content
    assert by_alpha.usage == by_rle.usage
    other = client.chat.completions.create(
        model=MODEL, max_tokens=10, messages=[user(question, data_url(s.image))],
        extra_body={"regions": [{"rle": rles[1]}]},
    )  # fmt: skip
    assert other.usage.prompt_tokens == by_rle.usage.prompt_tokens  # same prompt, other mask


def test_concurrent_streams_complete_interleaved_in_shared_batches(serve_app, shapes):
    s, rles = shapes
    before = len(captioner_stats(serve_app)["chat_batches"])
    # 8 clients are more than the test app's captioner admits at once (4 running + 2 queued):
    # the refused ones are told 503 with Retry-After, and the client retries them, as real
    # clients do.
    client = openai.OpenAI(base_url=serve_app.url + "/v1", api_key="unused", max_retries=10)

    def stream(k: int):
        arrivals, text = [], ""
        for chunk in client.chat.completions.create(
            model=MODEL, max_tokens=16, stream=True,
            messages=[user("What is <region1>?", data_url(s.image))],
            extra_body={"regions": [{"rle": rles[k % len(rles)]}]},
        ):  # fmt: skip
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
                text += chunk.choices[0].delta.content
            if chunk.choices and chunk.choices[0].finish_reason:
                return arrivals, text, chunk.choices[0].finish_reason
        raise AssertionError("the stream ended without a finish_reason")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(stream, range(8)))
    assert all(reason in ("stop", "length") and text for _, text, reason in results)
    # Interleaved: some two streams each receive text before the other has finished.
    spans = [(a[0], a[-1]) for a, _, _ in results]
    assert any(
        a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for (b0, b1) in spans[i + 1 :]
    ), spans
    batches = captioner_stats(serve_app)["chat_batches"][before:]
    assert sum(batches) == 8 and max(batches) > 1, batches


def test_disconnect_frees_the_decode_slot(serve_app, client, shapes):
    """A client that closes its stream after the first token: the captioner drops the request
    from its decode batch before the answer's last token."""
    s, rles = shapes
    before = len(captioner_stats(serve_app)["cancelled_rows"])
    cap = LIMITS["max_new_tokens"]
    stream = client.chat.completions.create(
        model=MODEL, max_tokens=cap, stream=True,
        messages=[user("describe it", data_url(s.image))],
    )  # fmt: skip
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()  # closes the HTTP connection, as a user's client going away does
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cancelled = captioner_stats(serve_app)["cancelled_rows"][before:]
        if cancelled:
            break
        time.sleep(0.2)
    assert cancelled and cancelled[0] < cap, cancelled


def openai_error_cases(s, rles):
    image = data_url(s.image)
    truncated = png_bytes(s.image)
    truncated = "data:image/png;base64," + b64(truncated[: len(truncated) // 2])
    rgba = data_url(np.dstack([s.image, (s.masks[0] * 255).astype(np.uint8)]))
    big = data_url(np.zeros((400, 400, 3), np.uint8))
    q = "What is <region1>?"
    return [
        ("missing-image", dict(messages=[user(q)]), 400, "messages[0].content"),
        ("region-out-of-range", dict(messages=[user("<region2>?", image)],
                                     extra_body={"regions": [{"rle": rles[0]}]}), 400, "messages[0].content"),
        ("n-2", dict(messages=[user(q, image)], n=2), 400, "n"),
        ("oversize-image", dict(messages=[user(q, big)]), 413, "messages[0].content[0].image_url.url"),
        ("bomb", dict(messages=[user(q, "data:image/png;base64," + b64(bomb_png()))]), 413,
         "messages[0].content[0].image_url.url"),
        ("truncated", dict(messages=[user(q, truncated)]), 400, "messages[0].content[0].image_url.url"),
        ("not-an-image", dict(messages=[user(q, "data:image/png;base64," + b64(b"hello"))]), 400,
         "messages[0].content[0].image_url.url"),
        ("http-url", dict(messages=[user(q, "http://127.0.0.1:1/a.png")]), 400,
         "messages[0].content[0].image_url.url"),
        ("ambiguous-regions", dict(messages=[user(q, rgba)], extra_body={"regions": [{"rle": rles[0]}]}),
         400, "regions"),
        ("bomb-mask", dict(messages=[user(q, image)],
                           extra_body={"regions": [{"png": b64(bomb_png())}]}), 413, "regions[0].png"),
        ("too-many-tokens", dict(messages=[user("hi", image)], max_tokens=LIMITS["max_new_tokens"] + 1),
         400, "max_tokens"),
        ("system-message", dict(messages=[{"role": "system", "content": "be brief"}, user(q, image)]),
         400, "messages[0].role"),
        ("unknown-model", dict(messages=[user(q, image)], model="gpt-4o"), 404, "model"),
    ]  # fmt: skip


def test_bad_requests_get_openai_error_bodies(client, shapes):
    s, rles = shapes
    for name, kwargs, status, param in openai_error_cases(s, rles):
        kwargs = {"model": MODEL, "max_tokens": 4, **kwargs}
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**kwargs)
        error = caught.value
        assert error.status_code == status, (name, error.body)
        body = error.response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["param"] == param, (name, body)
        assert body["error"]["message"], name
    # A streamed request is refused the same way, before any event.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, stream=True, n=3,
                                       messages=[user("hi", data_url(s.image))])  # fmt: skip
    # And the service is still up.
    ok = client.chat.completions.create(
        model=MODEL, max_tokens=2, messages=[user("hi", data_url(s.image))]
    )
    assert ok.choices[0].finish_reason in ("stop", "length")
