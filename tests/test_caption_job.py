"""The captioning job: exact rows, resumption after a crash or a kill, S3, Ray, rendering."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from osprey.data.images import decode_image
from osprey.data.shapes import ShapesConfig, render_sample
from osprey.infer.job import (
    CaptionJobConfig,
    ResourceConfig,
    add_caption_arguments,
    config_from_args,
    run_caption_job,
)
from osprey.infer.segment import ClassicalSegmenter, SamConfig
from osprey.infer.tiny import write_tiny_model
from osprey.io.output import OutputDir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_model(tmp_path_factory.mktemp("model")))


def write_images(folder: Path, n: int, seed: int = 0, bad: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = render_sample(rng, ShapesConfig(image_size=96, max_shapes=3))
        Image.fromarray(scene.image).save(folder / f"img{i:03d}.png")
    if bad:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 6)


def job(source, out, model_dir, **options) -> CaptionJobConfig:
    options = {"category_tokens": 3, "short_tokens": 3, "images_per_file": 2} | options
    return CaptionJobConfig(source=str(source), out=str(out), model=model_dir, **options)


def kill_once_written(command: list[str], out: Path, parts: int, timeout: float, env=None) -> int:
    """Run a caption job and SIGKILL it (its whole process group, its own session, so nothing
    else) once `parts` output files exist; the number of files it left."""
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while len(list(out.glob("part-*.parquet"))) < parts:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, f"no output within {timeout:.0f} s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return len(list(out.glob("part-*.parquet")))


def expected_rows(folder: Path) -> set[tuple]:
    """(image, mask index, RLE) of every region the segmenter finds; the broken file's row."""
    segmenter = ClassicalSegmenter()
    rows = set()
    for path in sorted(folder.iterdir()):
        try:
            image = np.asarray(decode_image(path.read_bytes()))
        except ValueError:
            rows.add((str(path), None, None))
            continue
        for i, region in enumerate(segmenter.segment(image)):
            rows.add((str(path), i, region.counts))
    return rows


def output_rows(out) -> list[tuple]:
    frame = pd.read_parquet(out)
    return [
        (
            r.image_path,
            None if pd.isna(r.mask_index) else int(r.mask_index),
            None if r.mask is None else r.mask["counts"],
        )
        for r in frame.itertuples()
    ]


def assert_exact(out, folder: Path) -> None:
    rows = output_rows(out)
    assert len(rows) == len(set(rows)), "duplicate rows"
    assert set(rows) == expected_rows(folder)


def test_rows_are_exact_and_a_rerun_skips_everything(images, model_dir, tmp_path):
    out = tmp_path / "out"
    summary = run_caption_job(job(images, out, model_dir), local=True)
    assert_exact(out, images)
    frame = pd.read_parquet(out)
    regions = frame[frame.mask_index.notna()]
    assert regions.category.notna().all() and regions.short_caption.notna().all()
    assert regions.detailed_caption.isna().all()
    assert (regions.area > 0).all() and regions.bbox.map(len).eq(4).all()
    assert summary.images == 7 and summary.errors == 1 and summary.masks == len(regions)
    assert summary.regions_per_second > 0 and "regions/s" in str(summary)
    parts = {p: os.path.getmtime(p) for p in OutputDir(_where(out)).parts()}

    again = run_caption_job(job(images, out, model_dir), local=True)
    assert again.images == 0 and again.already_done == 7
    assert {p: os.path.getmtime(p) for p in OutputDir(_where(out)).parts()} == parts


def _where(out):
    from osprey.io.storage import resolve

    return resolve(str(out))


def test_a_rerun_with_other_options_is_refused(images, model_dir, tmp_path):
    out = tmp_path / "out"
    run_caption_job(job(images, out, model_dir, limit=1), local=True)
    with pytest.raises(ValueError, match="other options.*tasks"):
        run_caption_job(job(images, out, model_dir, limit=1, detailed=True), local=True)


def test_crash_midway_then_rerun_gives_exact_rows(images, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = OutputDir.write_part
    calls = []

    def crash_on_third(self, rows):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected crash")
        return original(self, rows)

    monkeypatch.setattr(OutputDir, "write_part", crash_on_third)
    with pytest.raises(RuntimeError, match="injected"):
        run_caption_job(job(images, out, model_dir), local=True)
    monkeypatch.setattr(OutputDir, "write_part", original)
    assert len(list(out.glob("part-*.parquet"))) == 2
    # A torn write of a killed run: never read, removed on the next run.
    (out / ".tmp-0123-part-deadbeef.parquet").write_bytes(b"PAR1 torn")
    summary = run_caption_job(job(images, out, model_dir), local=True)
    assert summary.already_done == 4 and summary.images == 3
    assert not list(out.glob(".tmp-*"))
    assert_exact(out, images)


def test_sigkill_midway_then_rerun_gives_exact_rows(model_dir, tmp_path):
    folder = write_images(tmp_path / "many", 30, seed=1)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "jobs.caption", str(folder), "--out", str(out), "--model", model_dir,
        "--local", "--images-per-file", "1", "--category-tokens", "3", "--short-tokens", "3",
    ]  # fmt: skip
    written = kill_once_written(command, out, parts=3, timeout=120)
    assert 3 <= written < 31, "the kill came after the end"
    summary = run_caption_job(job(folder, out, model_dir, images_per_file=1), local=True)
    assert summary.already_done == written and summary.images == 31 - written
    assert_exact(out, folder)


def test_copies_from_an_orphaned_writer_are_removed(images, model_dir, tmp_path):
    out = tmp_path / "out"
    run_caption_job(job(images, out, model_dir), local=True)
    first = sorted(out.glob("part-*.parquet"))[0]
    # As if a writer of a killed run committed the same images under another name.
    shutil.copy(first, out / "part-zzzzzzzz.parquet")
    summary = run_caption_job(job(images, out, model_dir), local=True)
    assert summary.duplicates_removed == pq.read_metadata(first).num_rows
    assert not (out / "part-zzzzzzzz.parquet").exists()
    assert_exact(out, images)


def test_s3_source_and_output(moto_s3, model_dir, tmp_path):
    fs, options = moto_s3
    fs.create_dir("caption-test")
    local = write_images(tmp_path / "src", 3, seed=2)
    for path in local.iterdir():
        with fs.open_output_stream(f"caption-test/images/{path.name}") as stream:
            stream.write(path.read_bytes())
    config = job("s3://caption-test/images", "s3://caption-test/out", model_dir, s3=options)
    summary = run_caption_job(config, local=True)
    assert summary.images == 4 and summary.errors == 1
    parts = [f for f in OutputDir(_s3_where(options)).parts()]
    table = pq.ParquetDataset(parts, filesystem=fs).read().to_pandas()
    assert set(table.image_path) == {f"s3://caption-test/images/{p.name}" for p in local.iterdir()}
    expected = {
        (f"s3://caption-test/images/{Path(p).name}", i, c) for p, i, c in expected_rows(local)
    }
    got = [
        (
            r.image_path,
            None if pd.isna(r.mask_index) else int(r.mask_index),
            None if r.mask is None else r.mask["counts"],
        )
        for r in table.itertuples()
    ]
    assert len(got) == len(set(got)) and set(got) == expected
    assert run_caption_job(config, local=True).already_done == 4


def _s3_where(options):
    from osprey.io.storage import resolve

    return resolve("s3://caption-test/out", options)


def test_render_writes_overlays_and_a_paged_gallery(images, model_dir, tmp_path):
    out = tmp_path / "out"
    summary = run_caption_job(
        job(images, out, model_dir, render=True, gallery_page_size=3), local=True
    )
    frame = pd.read_parquet(out)
    good = frame[frame.error.isna()]
    assert good.render.notna().all()
    for name in good.render.unique():
        with Image.open(out / name) as overlay:
            assert overlay.size == (512, 512)  # small images are enlarged for their labels
    gallery = out / "_gallery"
    assert summary.gallery == str(gallery / "index.html")
    pages = sorted(p.name for p in gallery.iterdir())
    assert pages == ["index.html", "page-0002.html", "page-0003.html"]
    text = "".join((gallery / p).read_text() for p in pages)
    for path in frame.image_path.unique():
        assert path in text
    assert "broken.jpg" in text and "cannot decode" in text
    assert 'href="page-0002.html">next' in (gallery / "index.html").read_text()
    # Overlays and the gallery sit in folders parquet readers skip: DST still reads as a table.
    assert len(pd.read_parquet(out)) == len(frame)


def test_output_inside_the_source_is_not_read_as_input(model_dir, tmp_path):
    folder = write_images(tmp_path / "src", 2, bad=False)
    out = folder / "captions"
    first = run_caption_job(job(folder, out, model_dir, render=True), local=True)
    again = run_caption_job(job(folder, out, model_dir, render=True), local=True)
    assert first.listed == again.listed == 2 and again.images == 0


def test_command_line_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    add_caption_arguments(parser)
    args = parser.parse_args(["src", "--out", "dst", "--model", "m"])
    config = config_from_args(args)
    assert config.segmenter.backend == "classical" and not config.detailed and not args.local
    assert [t.name for t in config.tasks()] == ["category", "short"]
    args = parser.parse_args(
        ["src", "--out", "dst", "--model", "m", "--sam-weights", "sam", "--points-per-side", "16",
         "--detailed", "--question", "What colour is <region>?", "--captioner-gpus", "0.5",
         "--segmenters", "3", "--s3-endpoint", "127.0.0.1:9000", "--s3-scheme", "http"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.segmenter.sam == SamConfig(weights="sam", points_per_side=16)
    assert [t.name for t in config.tasks()] == ["category", "short", "detailed", "answer"]
    assert config.resources == ResourceConfig(segmenters=3, captioner_gpus=0.5)
    assert config.captioner_device == "cuda" and config.s3.endpoint == "127.0.0.1:9000"
    with pytest.raises(ValueError, match="region"):
        config_from_args(
            parser.parse_args(["s", "--out", "d", "--model", "m", "--question", "Why?"])
        )
    with pytest.raises(ValueError, match="images-per-file"):
        config_from_args(
            parser.parse_args(["s", "--out", "d", "--model", "m", "--images-per-file", "0"])
        )


def test_a_missing_model_fails_before_any_work(images, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory"):
        run_caption_job(job(images, tmp_path / "out", str(tmp_path / "nothing")), local=True)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# On Ray
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_job_gives_the_rows_of_the_local_run(local_ray, images, model_dir, tmp_path):
    local = tmp_path / "local"
    run_caption_job(job(images, local, model_dir), local=True)
    on_ray = tmp_path / "ray"
    summary = run_caption_job(job(images, on_ray, model_dir), local=False)
    assert summary.images == 7 and summary.errors == 1
    assert_exact(on_ray, images)
    columns = ["image_path", "mask_index", "category", "short_caption", "area", "error"]
    a = pd.read_parquet(local, columns=columns).sort_values(columns[:2]).reset_index(drop=True)
    b = pd.read_parquet(on_ray, columns=columns).sort_values(columns[:2]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_ray_job_killed_midway_resumes_exactly(local_ray, model_dir, tmp_path):
    folder = write_images(tmp_path / "many", 12, seed=3)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "jobs.caption", str(folder), "--out", str(out), "--model", model_dir,
        "--images-per-file", "1", "--segment-batch", "1", "--caption-batch", "1",
        "--category-tokens", "3", "--short-tokens", "3",
    ]  # fmt: skip
    env = dict(os.environ, RAY_ADDRESS=local_ray.get_runtime_context().gcs_address)
    written = kill_once_written(command, out, parts=1, timeout=150, env=env)
    assert written < 13, "the kill came after the end"
    summary = run_caption_job(job(folder, out, model_dir, images_per_file=1), local=False)
    assert summary.images + summary.already_done == 13
    assert_exact(out, folder)
