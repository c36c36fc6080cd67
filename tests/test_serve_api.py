"""The Serve application over HTTP on loopback with the tiny model: every route, every refusal
(status code and the field it names), overload, and bearer-token authentication on and off."""

from __future__ import annotations

import concurrent.futures
import json
import time

import numpy as np
import pytest
import requests
from pycocotools import mask as mask_utils
from serve_support import (
    BATCH,
    LIMITS,
    QUEUED,
    TOKEN,
    app_args,
    app_options,
    auth_header,
    b64,
    bomb_png,
    deploy,
    expected_answer,
    image_b64,
    png_bytes,
    scene,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def app(serve_app):
    return serve_app


@pytest.fixture(scope="module")
def shapes():
    """A rendered scene, its base64 PNG and its masks as RLE."""
    s = scene(seed=3)
    rles = []
    for m in s.masks:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rles.append({"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")})
    return s, b64(png_bytes(s.image)), rles


def error_of(response: requests.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"type", "field", "message"} <= set(body["error"]), body
    return body["error"]


def centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    i = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)  # a pixel of the mask itself
    return float(xs[i]) + 0.5, float(ys[i]) + 0.5


# ---- service routes --------------------------------------------------------------------------


def test_health_readiness_info_and_openapi(app):
    assert app.get("/healthz").json() == {"status": "ok"}
    ready = app.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "deployments": {"MaskGenerator": "ok", "Captioner": "ok"},
    }
    info = app.get("/v1/info").json()
    assert info["auth"] is False and info["segmenter"] == "classical"
    assert info["limits"] == LIMITS and info["max_batch_size"] == BATCH
    schema = app.get("/openapi.json").json()
    for path in ("/v1/segment", "/v1/describe", "/v1/chat", "/v1/segment/upload", "/healthz"):
        assert path in schema["paths"], path
    assert schema["info"]["version"].startswith("1.")
    assert "422" in schema["paths"]["/v1/describe"]["post"]["responses"]
    assert app.get("/docs").status_code == 200


def test_web_page_and_its_assets_are_served(app):
    page = app.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="canvas"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert app.get(asset).status_code == 200, asset


# ---- segment ---------------------------------------------------------------------------------


def test_segment_points_boxes_and_everything(app, shapes):
    s, image, _ = shapes
    h, w = s.image.shape[:2]
    points = [centre(m) for m in s.masks]
    out = app.post("/v1/segment", json={"image": image, "points": points}).json()
    assert (out["width"], out["height"], out["segmenter"]) == (w, h, "classical")
    assert len(out["masks"]) == len(points)
    for (x, y), m in zip(points, out["masks"], strict=True):
        decoded = mask_utils.decode({"size": m["rle"]["size"], "counts": m["rle"]["counts"]})
        assert decoded.shape == (h, w) and decoded[int(y), int(x)] == 1
        assert m["area"] == int(decoded.sum()) and "png" not in m

    ys, xs = np.nonzero(s.masks[0])
    box = [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]
    out = app.post("/v1/segment", json={"image": image, "boxes": [box], "return_png": True}).json()
    [m] = out["masks"]
    assert m["png"] and m["bbox"][0] >= box[0] - 1

    out = app.post("/v1/segment", json={"image": image, "everything": True}).json()
    assert 1 <= len(out["masks"]) <= LIMITS["max_regions"]
    areas = [m["area"] for m in out["masks"]]
    assert areas == sorted(areas, reverse=True), "largest first"

    # The same as a file upload.
    upload = app.post(
        "/v1/segment/upload",
        files={"image": ("scene.png", png_bytes(s.image), "image/png")},
        data={"request": json.dumps({"points": points})},
    )
    assert upload.status_code == 200, upload.text
    assert [m["rle"] for m in upload.json()["masks"]] == [
        m["rle"]
        for m in app.post("/v1/segment", json={"image": image, "points": points}).json()["masks"]
    ]


# ---- describe and chat -----------------------------------------------------------------------


def test_describe_rle_png_and_upload_give_the_same_answers(app, shapes):
    s, image, rles = shapes
    tasks = ["category", "short", "detailed"]
    body = {"image": image, "regions": [{"rle": r} for r in rles], "tasks": tasks,
            "question": "What colour is <region>?", "max_new_tokens": 6}  # fmt: skip
    by_rle = app.post("/v1/describe", json=body)
    assert by_rle.status_code == 200, by_rle.text
    answers = by_rle.json()["answers"]
    assert len(answers) == len(rles)
    for a in answers:
        assert set(a) == {"category", "short", "detailed", "answer"}
        assert all(isinstance(v, str) for v in a.values())
    # Uncompressed RLE, PNG masks, and a data: URL image.
    plain = []
    for m in s.masks:
        runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, m.T.ravel(), -1]) != 0)).tolist()
        plain.append({"size": list(m.shape), "counts": ([0] if m.T.ravel()[0] else []) + runs})
    as_png = [{"png": b64(png_bytes((m * 255).astype(np.uint8)))} for m in s.masks]
    for regions, img in ((plain, image), (as_png, "data:image/png;base64," + image)):
        regions = [{"rle": r} for r in regions] if regions is plain else regions
        other = app.post("/v1/describe", json=dict(body, image=img, regions=regions))
        assert other.status_code == 200, other.text
        assert other.json()["answers"] == answers
    upload = app.post(
        "/v1/describe/upload",
        files={"image": ("scene.png", png_bytes(s.image), "image/png")},
        data={"request": json.dumps({k: v for k, v in body.items() if k != "image"})},
    )
    assert upload.status_code == 200, upload.text
    assert upload.json()["answers"] == answers


def test_concurrent_describes_are_batched(app, shapes):
    from ray import serve

    _, image, rles = shapes
    body = {"image": image, "regions": [{"rle": rles[0]}], "tasks": ["short"], "max_new_tokens": 8}
    handle = serve.get_deployment_handle("Captioner", app.name)
    before = len(handle.stats.remote().result()["batches"])
    # Fewer clients than the captioner's slots: none is refused, and their requests meet.
    with concurrent.futures.ThreadPoolExecutor(BATCH - 1) as pool:
        codes = list(
            pool.map(lambda _: app.post("/v1/describe", json=body).status_code, range(3 * BATCH))
        )
    assert codes == [200] * (3 * BATCH)
    after = handle.stats.remote().result()["batches"][before:]
    # This test's own batches: all its requests, some of them together.
    assert sum(after) == 3 * BATCH and max(after) > 1, after


def test_chat_with_regions_and_history(app, shapes):
    _, image, rles = shapes
    regions = [{"rle": r} for r in rles[:2]]
    messages = [{"role": "user", "content": "What is <region1>?"}]
    first = app.post("/v1/chat", json={"image": image, "regions": regions, "messages": messages,
                                       "max_new_tokens": 8})  # fmt: skip
    assert first.status_code == 200, first.text
    answer = first.json()["answer"]
    s = shapes[0]
    expected, _, _ = expected_answer(app.model_dir, s.image, s.masks[:2], "What is <region1>?", 8)
    assert answer == expected
    # The untrained model's answer may hold "<...>" pieces, which an assistant turn may not.
    said = answer.replace("<", "").replace(">", "") or "a shape"
    messages += [{"role": "assistant", "content": said},
                 {"role": "user", "content": "And <region2> next to <region1>?"}]  # fmt: skip
    second = app.post("/v1/chat", json={"image": image, "regions": regions, "messages": messages,
                                        "max_new_tokens": 8})  # fmt: skip
    assert second.status_code == 200, second.text
    expected, _, _ = expected_answer(
        app.model_dir, s.image, s.masks[:2], "And <region2> next to <region1>?", 8,
        history=[("What is <region1>?", said)],
    )  # fmt: skip
    assert second.json()["answer"] == expected
    # No regions at all: a question about the whole image.
    alone = app.post("/v1/chat", json={"image": image, "messages": [{"role": "user", "content": "hi"}],
                                       "max_new_tokens": 4})  # fmt: skip
    assert alone.status_code == 200, alone.text
    assert alone.json()["answer"] == expected_answer(app.model_dir, s.image, [], "hi", 4)[0]
    upload = app.post(
        "/v1/chat/upload",
        files={"image": ("scene.png", png_bytes(scene(seed=3).image), "image/png")},
        data={
            "request": json.dumps(
                {"regions": regions, "messages": messages[:1], "max_new_tokens": 8}
            )
        },
    )
    assert upload.status_code == 200 and upload.json()["answer"] == answer


# ---- refusals --------------------------------------------------------------------------------


def big_noise(side: int) -> str:
    rng = np.random.default_rng(0)
    return b64(png_bytes(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))


def error_cases():
    """(name, route, body or callable(shapes) -> body, status, field)."""
    img = image_b64(seed=3)
    r = lambda s: {"rle": s[2][0]}  # noqa: E731
    return [
        ("bad-base64", "/v1/segment", {"image": "not base64!!", "everything": True}, 422, "image"),
        ("not-an-image", "/v1/segment", {"image": b64(b"hello world"), "everything": True}, 422, "image"),
        ("too-many-bytes", "/v1/segment", {"image": big_noise(260), "everything": True}, 413, "image"),
        ("too-many-pixels", "/v1/segment",
         {"image": b64(png_bytes(np.zeros((400, 400, 3), np.uint8))), "everything": True}, 413, "image"),
        ("missing-image", "/v1/segment", {"everything": True}, 422, "image"),
        ("no-prompt", "/v1/segment", {"image": img}, 422, "body"),
        ("point-outside", "/v1/segment", {"image": img, "points": [[5, 5], [500, 5]]}, 422, "points[1]"),
        ("too-many-points", "/v1/segment", {"image": img, "points": [[1, 1]] * 5}, 422, "points"),
        ("empty-box", "/v1/segment", {"image": img, "boxes": [[10, 10, 10, 20]]}, 422, "boxes[0]"),
        ("mask-wrong-size", "/v1/describe",
         lambda s: {"image": img, "regions": [r(s), {"rle": {"size": [50, 96], "counts": "PX4"}}]},
         422, "regions[1].rle.size"),
        ("png-mask-wrong-size", "/v1/describe",
         lambda s: {"image": img, "regions": [{"png": b64(png_bytes(np.ones((10, 10), np.uint8)))}]},
         422, "regions[0].png"),
        ("rle-bad-counts", "/v1/describe",
         {"image": img, "regions": [{"rle": {"size": [96, 96], "counts": "abc"}}]}, 422, "regions[0].rle.counts"),
        ("rle-and-png", "/v1/describe",
         lambda s: {"image": img, "regions": [dict(r(s), png="AAAA")]}, 422, "regions[0]"),
        ("empty-mask", "/v1/describe",
         {"image": img, "regions": [{"rle": {"size": [96, 96], "counts": [96 * 96]}}]}, 422, "regions[0].rle"),
        ("too-many-regions", "/v1/describe", lambda s: {"image": img, "regions": [r(s)] * 5}, 422, "regions"),
        ("no-regions", "/v1/describe", {"image": img, "regions": []}, 422, "regions"),
        ("too-many-tokens", "/v1/describe",
         lambda s: {"image": img, "regions": [r(s)], "max_new_tokens": LIMITS["max_new_tokens"] + 1},
         422, "max_new_tokens"),
        ("unknown-task", "/v1/describe", lambda s: {"image": img, "regions": [r(s)], "tasks": ["poem"]},
         422, "tasks[0]"),
        ("question-without-region", "/v1/describe",
         lambda s: {"image": img, "regions": [r(s)], "question": "what is it?"}, 422, "question"),
        # Refused by the captioner (its tokenizer's placeholder rules), reported by the ingress.
        ("question-names-another-region", "/v1/describe",
         lambda s: {"image": img, "regions": [r(s)], "question": "Is <region> left of <region2>?"},
         422, "question"),
        ("chat-starts-with-assistant", "/v1/chat",
         {"image": img, "messages": [{"role": "assistant", "content": "hi"}]}, 422, "messages[0].role"),
        ("chat-region-out-of-range", "/v1/chat",
         lambda s: {"image": img, "regions": [r(s)], "messages": [{"role": "user", "content": "<region2>?"}]},
         422, "messages[0].content"),
        ("chat-too-many-messages", "/v1/chat",
         {"image": img, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
          + [{"role": "user", "content": "c"}]}, 422, "messages"),
        ("chat-message-too-long", "/v1/chat",
         {"image": img, "messages": [{"role": "user", "content": "x" * 301}]}, 422, "messages[0].content"),
        ("unknown-field", "/v1/chat", {"image": img, "messages": [], "temperature": 2}, 422, "messages"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name,route,body,status,field", error_cases(), ids=[c[0] for c in error_cases()]
)
def test_refusals_name_the_field(app, shapes, name, route, body, status, field):
    response = app.post(route, json=body(shapes) if callable(body) else body)
    assert response.status_code == status, response.text
    assert error_of(response)["field"] == field, response.text


def broken_images() -> dict[str, tuple[bytes, int]]:
    """Bytes the decoder refuses, and the status each gets."""
    whole = png_bytes(scene(seed=3).image)
    return {
        "bomb": (bomb_png(), 413),  # 30000 x 30000 1-bit, ~110 KB
        "truncated": (whole[: len(whole) // 2], 422),
        "not-an-image": (b"GIF89a but not really" * 4, 422),
        "header-only": (whole[:60], 422),
    }


@pytest.mark.parametrize("kind", list(broken_images()))
def test_every_image_route_refuses_broken_images_naming_the_field(app, shapes, kind):
    data, status = broken_images()[kind]
    _, image, rles = shapes
    region = {"rle": rles[0]}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2}
    describe = {"regions": [region], "max_new_tokens": 2}
    for route, params in (("/v1/segment", {"everything": True}), ("/v1/describe", describe),
                          ("/v1/chat", chat)):  # fmt: skip
        sent = app.post(route, json={"image": b64(data), **params})
        assert sent.status_code == status and error_of(sent)["field"] == "image", (route, sent.text)
        upload = app.post(route + "/upload", files={"image": ("x.png", data, "image/png")},
                          data={"request": json.dumps(params)})  # fmt: skip
        assert upload.status_code == status, (route, upload.text)
        assert error_of(upload)["field"] == "image", (route, upload.text)
    # PNG masks of describe and chat.
    for route, params in (("/v1/describe", describe), ("/v1/chat", chat)):
        body = {**params, "image": image, "regions": [region, {"png": b64(data)}]}
        if route == "/v1/chat":
            body["messages"] = [{"role": "user", "content": "<region2>?"}]
        sent = app.post(route, json=body)
        assert sent.status_code == status, (route, sent.text)
        assert error_of(sent)["field"] == "regions[1].png", (route, sent.text)


def test_malformed_bodies_unknown_routes_and_oversized_requests(app):
    bad = app.post("/v1/describe", data=b'{"image": ', headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and error_of(bad) | {"message": ""} == {
        "type": "malformed_json", "field": "body", "message": ""}  # fmt: skip
    form = app.post("/v1/describe/upload", files={"image": ("a.png", b"x", "image/png")},
                    data={"request": "{not json"})  # fmt: skip
    assert form.status_code == 400 and error_of(form)["field"] == "request"
    form = app.post("/v1/describe/upload", files={"image": ("a.png", b"x", "image/png")},
                    data={"request": json.dumps({"regions": [{"rle": {"size": [1, 1]}}]})})  # fmt: skip
    assert form.status_code == 422 and error_of(form)["field"] == "request.regions[0].rle.counts"
    missing = app.post("/v1/nothing", json={})
    assert missing.status_code == 404 and error_of(missing)["type"] == "not_found"
    # A body over the limit is refused from its Content-Length, before it is read.
    huge = app.post("/v1/segment", data=b"x" * (LIMITS["max_image_bytes"] * 4 // 3 + 8 * 2**20 + 1),
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert huge.status_code == 413 and error_of(huge)["field"] == "body"


def test_overload_answers_503_quickly(app, shapes):
    """Beyond the captioner's max_ongoing_requests + max_queued_requests, describe answers 503
    at once instead of queueing."""
    _, image, rles = shapes
    body = {"image": image, "regions": [{"rle": r} for r in rles[:2]], "tasks": ["short", "detailed"],
            "max_new_tokens": 16}  # fmt: skip
    n = 4 * (BATCH + QUEUED)

    def call(_):
        began = time.monotonic()
        response = app.post("/v1/describe", json=body)
        return response, time.monotonic() - began

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(call, range(n)))
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= BATCH, codes
    refused = [(r, t) for r, t in results if r.status_code == 503]
    assert refused, f"no request was refused: {codes}"
    fastest_ok = min(t for r, t in results if r.status_code == 200)
    for response, seconds in refused:
        assert error_of(response)["type"] == "overloaded"
        assert response.headers.get("retry-after") == "1"
        # Refused at once: sooner than even the first answered request took.
        assert seconds < fastest_ok, (seconds, fastest_ok)
    assert app.get("/readyz").status_code == 200, "and the service recovers"


# ---- authentication --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(serve_app):
    """A second application whose ingress has a token (from its environment)."""
    from ray import serve

    args = app_args(serve_app.model_dir, auth_token_env="OSPREY_TEST_TOKEN")
    app = deploy("osprey-secured", "/secured", serve_app.port, args,
                 app_options(env={"OSPREY_TEST_TOKEN": TOKEN}))  # fmt: skip
    yield app
    serve.delete("osprey-secured")


def test_bearer_token_guards_every_route_but_health(secured, shapes):
    _, image, rles = shapes
    assert secured.get("/healthz").status_code == 200
    calls = [
        ("get", "/v1/info", None),
        ("get", "/readyz", None),
        ("post", "/v1/segment", {"image": image, "everything": True}),
        ("post", "/v1/describe", {"image": image, "regions": [{"rle": rles[0]}], "max_new_tokens": 2}),
        ("post", "/v1/chat", {"image": image, "messages": [{"role": "user", "content": "hi"}],
                              "max_new_tokens": 2}),
    ]  # fmt: skip
    for method, path, body in calls:
        kwargs = {"json": body} if body is not None else {}
        for headers in ({}, auth_header("wrong"), {"Authorization": f"Basic {TOKEN}"}):
            refused = getattr(secured, method)(path, headers=headers, **kwargs)
            assert refused.status_code == 401, (path, headers, refused.text)
            assert error_of(refused)["field"] == "authorization"
            assert refused.headers["www-authenticate"].startswith("Bearer")
        allowed = getattr(secured, method)(path, headers=auth_header(TOKEN), **kwargs)
        assert allowed.status_code == 200, (path, allowed.text)
    assert secured.get("/v1/info", headers=auth_header(TOKEN)).json()["auth"] is True
    # The OpenAI-compatible routes: the same token, OpenAI's error body.
    import openai

    client = openai.OpenAI(base_url=secured.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    for refused in (caught.value.response, secured.post("/v1/chat/completions", json={})):
        assert refused.status_code == 401
        assert refused.json()["error"]["param"] == "authorization"
        assert refused.json()["error"]["type"] == "authentication_error"
    client = openai.OpenAI(base_url=secured.url + "/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["osprey"]
    answer = client.chat.completions.create(
        model="osprey", max_tokens=2,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
            {"type": "text", "text": "hi"}]}],
    )  # fmt: skip
    assert answer.choices[0].finish_reason in ("stop", "length")


# ---- where the model comes from --------------------------------------------------------------


def test_model_from_an_mlflow_registered_alias(serve_app, tmp_path):
    from osprey.serve.model_source import resolve_model
    from osprey.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, artifact_location=str(tmp_path / "artifacts"))
    run = tracker.client.create_run(tracker.experiment_id).info.run_id
    tracker.register_model(run, serve_app.model_dir, "osprey-tiny", "production")
    local = resolve_model("models:/osprey-tiny@production", uri, cache_dir=str(tmp_path / "dl"))
    files = {p.name for p in __import__("pathlib").Path(local).iterdir()}
    assert "config.json" in files
    with pytest.raises(ValueError, match="tracking_uri"):
        resolve_model("models:/osprey-tiny@production", None)
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "nowhere"))


def test_osprey_serve_command_reads_the_config_file():
    from osprey.cli import build_parser
    from osprey.serve.app import DEPLOYMENTS
    from osprey.serve.run import app_from_config

    parsed = build_parser().parse_args(["serve", "--model", "tiny", "--port", "8123"])
    args, options, route = app_from_config(parsed.config, {"model": parsed.model})
    assert args["model"] == "tiny" and route == "/" and set(options) == set(DEPLOYMENTS)
    assert options["Captioner"]["autoscaling_config"]["min_replicas"] == 1
