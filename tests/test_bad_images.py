"""Every odd input file gets a correct result or an error row naming it; the job carries on."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from osprey.data.masks import decode_region
from osprey.data.shapes import ShapesConfig, render_sample
from osprey.infer.job import CaptionJobConfig, run_caption_job
from osprey.infer.segment import ClassicalSegmenter
from osprey.infer.tiny import write_tiny_model

ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_model(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def scene():
    # Cropped to 128x96 so that a rotation shows in the image's size.
    s = render_sample(np.random.default_rng(4), ShapesConfig(image_size=128))
    return s.image[:96], s.masks[:, :96]


def with_exif_orientation(upright: Image.Image, fmt: str) -> bytes:
    """Pixels stored rotated, with EXIF orientation 6 ("rotate 90 clockwise to view")."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, format=fmt, exif=exif, quality=95)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, scene):
    image, masks = scene
    rgb = Image.fromarray(image)
    root = tmp_path_factory.mktemp("odd")
    jpeg = encode(rgb, "JPEG", quality=95)
    rgba = rgb.convert("RGBA")
    # Transparent background, opaque shapes: a viewer shows the shapes on white.
    rgba.putalpha(Image.fromarray(np.where(masks.any(0), 255, 0).astype(np.uint8)))
    grey16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    files = {
        "undecodable.png": np.random.default_rng(0).bytes(5000),
        "notes.jpg": b"these are not pixels\n" * 20,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        # 72 megapixels of 1-bit zeros: a few kilobytes on disk.
        "bomb.png": encode(Image.new("1", (9000, 8000)), "PNG"),
        "empty.png": b"",
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "grey16.png": encode(Image.fromarray(grey16), "PNG"),  # mode I;16
        "rgba.png": encode(rgba, "PNG"),
        "grey.png": encode(rgb.convert("L"), "PNG"),
        "palette.gif": encode(rgb.quantize(16), "GIF"),
        "exif.jpg": with_exif_orientation(rgb, "JPEG"),
        "exif.png": with_exif_orientation(rgb, "PNG"),
        "fine.png": encode(rgb, "PNG"),
        "readme.txt": b"not an image by name",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def run(folder, out, model_dir, **options) -> pd.DataFrame:
    config = CaptionJobConfig(
        source=str(folder),
        out=str(out),
        model=model_dir,
        category_tokens=3,
        short_tokens=3,
        images_per_file=3,
        **options,
    )
    summary = run_caption_job(config, local=True)
    frame = pd.read_parquet(out)
    assert summary.images == frame.image_path.nunique()
    return frame


@pytest.fixture(scope="module")
def rows(folder, model_dir, tmp_path_factory):
    return run(folder, tmp_path_factory.mktemp("out"), model_dir)


def by_name(rows: pd.DataFrame, name: str) -> pd.DataFrame:
    return rows[rows.image_path.str.endswith("/" + name)]


@pytest.mark.parametrize(
    "name, reason",
    [
        ("undecodable.png", "cannot decode"),
        ("notes.jpg", "cannot decode"),
        ("truncated.jpg", "truncated"),
        ("bomb.png", "decompression bomb"),
        ("empty.png", "cannot decode"),
    ],
)
def test_bad_files_get_one_error_row_naming_them(rows, folder, name, reason):
    got = by_name(rows, name)
    assert len(got) == 1
    row = got.iloc[0]
    assert str(folder / name) in row.error and reason in row.error
    assert pd.isna(row.mask_index) and row["mask"] is None


@pytest.mark.parametrize(
    "name", ["cmyk.jpg", "grey16.png", "rgba.png", "grey.png", "palette.gif", "fine.png"]
)
def test_odd_but_valid_images_are_captioned(rows, name):
    got = by_name(rows, name)
    assert len(got) >= 2, got
    assert got.error.isna().all()
    assert (got.width == 128).all() and (got.height == 96).all()
    assert sorted(got.mask_index) == list(range(len(got)))
    assert got.category.notna().all() and got.short_caption.notna().all()


def test_lossless_odd_formats_give_the_plain_images_masks(rows, scene):
    _, truths = scene
    for name in ("rgba.png", "palette.gif", "exif.png"):
        masks = [decode_region(m).astype(bool) for m in by_name(rows, name)["mask"]]
        for truth in truths:
            if truth.sum() == 0:
                continue
            best = max(
                (truth & m.astype(bool)).sum() / (truth | m.astype(bool)).sum() for m in masks
            )
            assert best >= 0.8, (name, best)


def test_exif_rotation_is_applied(rows, scene):
    image, _ = scene
    for name in ("exif.jpg", "exif.png"):
        got = by_name(rows, name)
        assert got.error.isna().all()
        # Stored 96 wide and 128 high; upright it is 128 wide and 96 high again.
        assert (got.width == 128).all() and (got.height == 96).all()
        assert all(tuple(m["size"]) == (96, 128) for m in got["mask"])
    upright = ClassicalSegmenter().segment(image)
    assert [r.area for r in upright] == list(by_name(rows, "exif.png").area)


def test_files_not_named_as_images_are_skipped_or_taken(folder, model_dir, tmp_path):
    rows = run(folder, tmp_path / "all", model_dir, extensions=None)
    readme = by_name(rows, "readme.txt")
    assert len(readme) == 1 and "readme.txt" in readme.iloc[0].error
    assert by_name(rows, "fine.png").error.isna().all()


def test_counts_in_the_summary(folder, model_dir, tmp_path):
    config = CaptionJobConfig(
        source=str(folder),
        out=str(tmp_path / "out"),
        model=model_dir,
        category_tokens=2,
        short_tokens=2,
    )
    summary = run_caption_job(config, local=True)
    assert summary.not_images == 1  # readme.txt
    assert summary.images == 13 and summary.errors == 5
    frame = pd.read_parquet(tmp_path / "out")
    assert summary.masks == frame.mask_index.notna().sum()
