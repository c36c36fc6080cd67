"""Decoding stored image bytes safely: every odd file either decodes to RGB or raises
ImageDecodeError with a reason, never anything else."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 MP: a 8000x8000 photo passes; a decompression bomb (e.g. 40000x40000 PNG) does not.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why."""


class ImageTooLarge(ImageDecodeError):
    """The image's header declares more pixels than allowed (e.g. a decompression bomb)."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone, without decoding pixels."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"not a readable image ({_reason(exc)})") from exc


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    apply_exif: bool = True,
    keep_alpha: bool = False,
) -> Image.Image:
    """Encoded bytes -> upright RGB PIL image.

    EXIF orientation is applied unless `apply_exif` is False (annotations of COCO-style data
    sets are made on the stored pixel grid, so training reads them unrotated); greyscale, palette, CMYK and 16-bit images are converted;
    transparency is composited on white (what a viewer shows). Truncated files, non-images and
    images over `max_pixels` raise ImageDecodeError (ImageTooLarge). With `keep_alpha`, an
    image with transparency comes back as RGBA, its colour channels not composited.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"{width}x{height} = {width * height:,} pixels exceeds the limit of "
                    f"{max_pixels:,} (possible decompression bomb)"
                )
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode image ({_reason(exc)})") from exc
    if apply_exif:
        img = ImageOps.exif_transpose(img)
    if keep_alpha and has_alpha(img):
        return img.convert("RGBA")
    return to_rgb(img)


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the used range down to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size and arr.max() > 0 else 1.0
        img = Image.fromarray((arr * (255.0 / top)).round().astype(np.uint8), mode="L")
    if has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _reason(exc: Exception) -> str:
    # PIL names the in-memory stream ("<_io.BytesIO object at 0x...>"): drop it so the same bad
    # file always gives the same message.
    return (
        re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(exc)) or type(exc).__name__
    )
