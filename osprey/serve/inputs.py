"""Turning a request's image and masks into arrays, within the limits; every refusal is an
APIError naming the field. Nothing here trusts the client: base64, image headers, RLE run
lengths and PNG sizes are all checked before pycocotools or the model sees them."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from osprey.data.images import ImageDecodeError, ImageTooLarge, decode_image, image_size
from osprey.infer.regions import Region
from osprey.serve.config import Limits
from osprey.serve.errors import APIError
from osprey.serve.schemas import RegionIn, Rle


def b64decode(text: str, field: str, max_bytes: int | None = None) -> bytes:
    """Base64 (standard or URL-safe, `data:...;base64,` prefix allowed) -> bytes."""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise APIError(422, field, "a data: URL must be base64-encoded", "bad_base64")
    text = "".join(text.split())
    if max_bytes is not None and len(text) * 3 // 4 > max_bytes + 3:
        raise APIError(
            413, field, f"more than the limit of {max_bytes:,} bytes", "payload_too_large"
        )
    try:
        alt = b"-_" if ("-" in text or "_" in text) else None
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=alt, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(422, field, f"not valid base64 ({exc})", "bad_base64") from exc
    if not data:
        raise APIError(422, field, "empty", "bad_image")
    return data


def load_image(data: bytes, limits: Limits, field: str = "image") -> np.ndarray:
    """Encoded bytes -> upright (H, W, 3) uint8 array, or 413/422 naming `field`."""
    return _decode(data, limits, field, keep_alpha=False)


def load_image_alpha(
    data: bytes, limits: Limits, field: str = "image"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Encoded bytes -> (H, W, 3) colour channels, as stored (not composited), and the (H, W)
    alpha channel when the image has one."""
    array = _decode(data, limits, field, keep_alpha=True)
    if array.shape[-1] == 4:
        return np.ascontiguousarray(array[..., :3]), array[..., 3]
    return array, None


def _decode(data: bytes, limits: Limits, field: str, keep_alpha: bool) -> np.ndarray:
    if len(data) > limits.max_image_bytes:
        raise APIError(
            413,
            field,
            f"{len(data):,} bytes is over the limit of {limits.max_image_bytes:,}",
            "payload_too_large",
        )
    try:
        width, height = image_size(data)
    except ImageTooLarge as exc:
        raise APIError(413, field, str(exc), "payload_too_large") from exc
    except ImageDecodeError as exc:
        raise APIError(422, field, str(exc), "bad_image") from exc
    if width * height > limits.max_image_pixels:
        raise APIError(
            413,
            field,
            f"{width}x{height} = {width * height:,} pixels is over the limit of "
            f"{limits.max_image_pixels:,}",
            "payload_too_large",
        )
    try:
        image = decode_image(data, max_pixels=limits.max_image_pixels, keep_alpha=keep_alpha)
    except ImageTooLarge as exc:
        raise APIError(413, field, str(exc), "payload_too_large") from exc
    except ImageDecodeError as exc:
        raise APIError(422, field, str(exc), "bad_image") from exc
    return np.asarray(image)


def image_from_base64(text: str, limits: Limits, field: str = "image") -> np.ndarray:
    return load_image(b64decode(text, field, limits.max_image_bytes), limits, field)


def check_count(n: int, limits: Limits, field: str, what: str = "regions") -> None:
    if n > limits.max_regions:
        raise APIError(
            422, field, f"{n} {what} is over the limit of {limits.max_regions}", "too_many_regions"
        )


# ---- masks -----------------------------------------------------------------------------------


def rle_counts(counts: str | Sequence[int], field: str) -> list[int]:
    """Run lengths of a COCO RLE, compressed text (pycocotools' format) or a list."""
    if not isinstance(counts, str):
        runs = list(counts)
        if any(r < 0 for r in runs):
            raise APIError(422, field, "run lengths must be >= 0", "bad_mask")
        return runs
    # pycocotools' rleFrString: 5 bits per character (offset 48), continuation bit 0x20, sign
    # bit 0x10 on the last character; from the third run on, a run is a delta to the one two back.
    runs: list[int] = []
    value, shift = 0, 0
    for char in counts:
        c = ord(char) - 48
        if not 0 <= c < 64:
            raise APIError(422, field, f"character {char!r} cannot occur in RLE text", "bad_mask")
        value |= (c & 0x1F) << (5 * shift)
        shift += 1
        if shift > 13:
            raise APIError(422, field, "a run length is too long", "bad_mask")
        if c & 0x20:
            continue
        if c & 0x10:
            value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    if shift:
        raise APIError(422, field, "RLE text ends inside a run length", "bad_mask")
    if any(r < 0 for r in runs):
        raise APIError(422, field, "RLE text decodes to a negative run length", "bad_mask")
    return runs


def region_from_rle(rle: Rle, size: tuple[int, int], field: str) -> Region:
    height, width = size
    if tuple(rle.size) != (height, width):
        raise APIError(
            422,
            f"{field}.size",
            f"mask size {list(rle.size)} is not the image's [height, width] = [{height}, {width}]",
            "mask_size",
        )
    runs = rle_counts(rle.counts, f"{field}.counts")
    if sum(runs) != height * width:
        raise APIError(
            422,
            f"{field}.counts",
            f"run lengths add up to {sum(runs):,}, not height x width = {height * width:,}",
            "bad_mask",
        )
    # Runs alternate 0s and 1s down the columns (Fortran order).
    flat = np.repeat((np.arange(len(runs)) % 2).astype(np.uint8), runs)
    return _region(flat.reshape(width, height).T, field)


def region_from_png(text: str, size: tuple[int, int], limits: Limits, field: str) -> Region:
    data = b64decode(text, field, limits.max_image_bytes)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > limits.max_image_pixels:
                raise APIError(413, field, "mask PNG over the pixel limit", "payload_too_large")
            if img.format != "PNG":
                raise APIError(422, field, f"expected a PNG, got {img.format}", "bad_mask")
            if (img.height, img.width) != size:
                raise APIError(
                    422,
                    field,
                    f"mask of {img.width}x{img.height} for a {size[1]}x{size[0]} image",
                    "mask_size",
                )
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                mask = np.asarray(img.convert("RGBA"))[..., 3] > 0
            else:
                mask = np.asarray(img.convert("L")) > 0
    except APIError:
        raise
    except Image.DecompressionBombError as exc:
        raise APIError(413, field, f"mask PNG too large: {exc}", "payload_too_large") from exc
    except Exception as exc:  # any decoder failure is the client's file
        raise APIError(
            422, field, f"cannot decode the PNG ({type(exc).__name__})", "bad_mask"
        ) from exc
    return _region(mask, field)


def _region(mask: np.ndarray, field: str) -> Region:
    if not mask.any():
        raise APIError(422, field, "the mask is empty", "empty_mask")
    return Region.from_mask(np.ascontiguousarray(mask, dtype=np.uint8))


def regions_from_request(
    regions: Sequence[RegionIn], size: tuple[int, int], limits: Limits, field: str = "regions"
) -> list[Region]:
    check_count(len(regions), limits, field)
    out = []
    for i, region in enumerate(regions):
        where = f"{field}[{i}]"
        if region.rle is not None:
            out.append(region_from_rle(region.rle, size, f"{where}.rle"))
        else:
            out.append(region_from_png(region.png or "", size, limits, f"{where}.png"))
    return out


def mask_png(region: Region) -> str:
    """A region as a base64 1-bit PNG (for the web page's overlay)."""
    buffer = io.BytesIO()
    Image.fromarray(region.mask().astype(bool)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
