"""Starting the `osprey` Serve application on the loopback test cluster (tests/conftest.py's
`serve_app` fixture), and building requests for it."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass

import numpy as np
import requests
from PIL import Image

from osprey.data.shapes import ShapesConfig, render_sample

# Small limits, so each error case is cheap to provoke.
LIMITS = {
    "max_image_bytes": 200_000,
    "max_image_pixels": 300 * 300,
    "max_regions": 4,
    "max_new_tokens": 64,
    "max_messages": 4,
    "max_message_chars": 300,
}
BATCH = 4  # the captioner's max_batch_size, and its max_ongoing_requests
QUEUED = 2  # the captioner's max_queued_requests: beyond it describe answers 503
TOKEN = "s3cret-test-token"


@dataclass
class ServeApp:
    url: str  # base URL of the application, no trailing slash
    name: str

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=120, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=120, **kwargs)


def app_args(model_dir: str, **extra) -> dict:
    return {
        "model": model_dir,
        "device": "cpu",
        "max_batch_size": BATCH,
        "batch_wait_timeout_s": 0.05,
        "limits": LIMITS,
        **extra,
    }


def app_options(env: dict[str, str] | None = None) -> dict:
    small = {"num_cpus": 0.1}
    ingress = dict(small, runtime_env={"env_vars": env}) if env else small
    return {
        "OspreyIngress": {
            "ray_actor_options": ingress,
            "max_ongoing_requests": 64,
            "max_queued_requests": 64,
        },
        "MaskGenerator": {"ray_actor_options": small, "max_ongoing_requests": 4},
        "Captioner": {
            "ray_actor_options": small,
            "max_ongoing_requests": BATCH,
            "max_queued_requests": QUEUED,
        },
    }


def start_serve(port: int) -> None:
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})


def deploy(name: str, route_prefix: str, port: int, args: dict, options: dict) -> ServeApp:
    from ray import serve

    from osprey.serve.app import build_app

    serve.run(build_app(args, options), name=name, route_prefix=route_prefix, blocking=False)
    app = ServeApp(f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}", name)
    wait_ready(app, headers=auth_header(TOKEN) if "auth_token_env" in args else None)
    return app


def wait_ready(app: ServeApp, timeout: float = 180, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if app.get("/readyz", headers=headers).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{app.url} not ready after {timeout} s")
        time.sleep(0.5)


def auth_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- requests ------------------------------------------------------------------------------


def scene(seed: int = 0, size: int = 96):
    return render_sample(np.random.default_rng(seed), ShapesConfig(image_size=size, max_shapes=3))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_b64(seed: int = 0, size: int = 96) -> str:
    return b64(png_bytes(scene(seed, size).image))


def bomb_png(side: int = 30000) -> bytes:
    """A decompression bomb: a side x side 1-bit PNG of zeros, a few hundred KB, written chunk
    by chunk (PIL would hold side**2 bytes to encode it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row * 1000) for _ in range(side // 1000))
    body += packer.compress(row * (side % 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def expected_answer(
    model_dir: str, image: np.ndarray, masks, text: str, max_new_tokens: int, history=()
):
    """(text, prompt positions, generated ids) from the model's plain `generate`, prompt built
    here: an independent path to the endpoint's batched engine. `history`: earlier
    (question, answer) pairs; the regions' overview opens the first question."""
    import torch

    import osprey
    from osprey.model.image_processing import preprocess_image
    from osprey.prompts import TEMPLATES, build_generation_ids, load_tokenizer, regions_overview

    model, tokenizer = osprey.load_model(model_dir).eval(), load_tokenizer(model_dir)
    turns = []
    for question, answer in history:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    if len(masks) and turns:
        turns[0]["value"] = regions_overview(len(masks)) + turns[0]["value"]
    elif len(masks):
        text = regions_overview(len(masks)) + text
    sample = build_generation_ids(
        tokenizer, text, template=TEMPLATES["osprey_v1"], history=turns, num_regions=len(masks)
    )
    region = None
    if sample.region_indices:
        region = [torch.from_numpy(np.stack([masks[i] for i in sample.region_indices]))]
    pixels = preprocess_image(image, model.config.vision)[None]
    ids = model.generate([sample.input_ids], pixels, region, max_new_tokens=max_new_tokens)[0]
    positions = len(sample.input_ids) - 1 + model.config.vision.num_image_tokens
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), positions, ids
