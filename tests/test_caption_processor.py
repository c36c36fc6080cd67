"""The caption processor in a user's own Ray Data pipeline, and captioning through a running
Serve application: the same answers as `osprey caption`, user columns kept, bad inputs as
error rows, shed requests retried until answered."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from ray.serve.exceptions import BackPressureError
from test_caption_job import assert_exact, job, kill_once_written, write_images

from osprey.infer import CaptionProcessorConfig, build_caption_processor
from osprey.infer.job import run_caption_job
from osprey.infer.processor import caption_stage, finish_batch, prepare_batch, segment_args
from osprey.infer.remote import ServeCaptionStage
from osprey.infer.stages import SegmentStage
from osprey.infer.tiny import write_tiny_model

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_model(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 4)


def processor_config(model_dir: str | None, images: Path, **options) -> CaptionProcessorConfig:
    """The processor asking what `job(...)` asks (3-token category and short caption)."""
    return CaptionProcessorConfig(
        model=model_dir, tasks=job(images, "unused", model_dir or "m").tasks(), **options
    )


def run_in_process(config: CaptionProcessorConfig, table: pa.Table) -> pa.Table:
    """The processor's steps chained in this process, as its Ray pools would run them."""
    batch = prepare_batch(table, None, config.max_file_bytes)
    batch = SegmentStage(**segment_args(config))(batch)
    stage, kwargs = caption_stage(config)
    batch = stage(**kwargs)(batch)
    return finish_batch(batch, [t.name for t in config.tasks])


def rle(mask: np.ndarray) -> dict:
    coded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(coded["size"]), "counts": coded["counts"].decode("ascii")}


def job_answers(out: Path) -> dict[tuple[str, int], tuple[str, str]]:
    frame = pd.read_parquet(out)
    frame = frame[frame.mask_index.notna()]
    return {
        (r.image_path, int(r.mask_index)): (r.category, r.short_caption) for r in frame.itertuples()
    }


# ---- in this process -------------------------------------------------------------------------


def test_inputs_given_masks_questions_and_errors(images, model_dir):
    png = (images / "img000.png").read_bytes()
    square = np.zeros((96, 96), np.uint8)
    square[10:40, 20:60] = 1
    table = pa.table(
        {
            "image": [png, png, None, b"not an image", png, png],
            "path": [None, "mine/a.png", str(images / "img001.png"), "mine/bad.jpg", None, None],
            "masks": [
                None,
                json.dumps([rle(square)]),
                None,
                None,
                json.dumps([rle(np.ones((5, 5)))]),
                "[{}]",
            ],
            "question": [None, "What colour is <region>?", None, None, None, None],
            "data": ["mine", "is", "kept", "aside", "and", "back"],  # a stage column's name
            "user_id": pa.array([1, 2, 3, 4, 5, 6], pa.int16()),
        }
    )
    config = processor_config(model_dir, images)
    out = run_in_process(config, table)
    rows = out.to_pylist()

    # The user's columns, their types and their order, then the outputs.
    assert out.column_names[:5] == ["image", "path", "question", "data", "user_id"]
    assert out.schema.field("user_id").type == pa.int16()
    assert [r["data"] for r in rows] == ["mine", "is", "kept", "aside", "and", "back"]
    assert out.column_names[5:] == [
        "masks", "category", "short_caption", "answer", "width", "height", "error",
    ]  # fmt: skip

    found, given, read, bad, wrong_size, not_rle = rows
    assert found["error"] is None and len(found["masks"]) >= 1
    assert len(found["category"]) == len(found["short_caption"]) == len(found["masks"])
    assert all(isinstance(a, str) for a in found["category"])
    assert found["answer"] == [None] * len(found["masks"])  # no question on this row
    assert found["path"] is None  # a user's null path stays null (errors name the bytes)

    assert given["masks"] == [rle(square)]  # given masks are kept, not re-segmented
    assert len(given["answer"]) == 1 and isinstance(given["answer"][0], str)

    assert read["error"] is None and read["masks"] and (read["width"], read["height"]) == (96, 96)

    assert bad["error"].startswith("mine/bad.jpg: cannot decode")
    assert bad["masks"] is None and bad["category"] is None
    assert "mask 0 is 5x5 but the image is 96x96" in wrong_size["error"]
    assert wrong_size["error"].startswith("image sha1:")  # no path: named by its bytes
    assert "masks[0]: not a COCO RLE mask" in not_rle["error"]


def test_without_path_or_question_columns_none_are_added(images, model_dir):
    png = (images / "img002.png").read_bytes()
    config = processor_config(model_dir, images)
    out = run_in_process(config, pa.table({"image": [png], "key": ["k"]}))
    assert out.column_names == [
        "image", "key", "masks", "category", "short_caption", "width", "height", "error",
    ]  # fmt: skip


def test_arrays_as_read_images_gives_them_are_captioned_as_their_files(images, model_dir):
    from PIL import Image
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray

    files = [images / "img000.png", images / "img003.png"]
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    config = processor_config(model_dir, images)
    from_arrays = run_in_process(config, pa.table({"image": ArrowTensorArray.from_numpy(arrays)}))
    from_files = run_in_process(config, pa.table({"image": [p.read_bytes() for p in files]}))
    outputs = ["masks", "category", "short_caption", "width", "height", "error"]
    assert from_arrays.select(outputs).to_pylist() == from_files.select(outputs).to_pylist()
    assert all(r["masks"] for r in from_arrays.to_pylist())


class _Response:
    def __init__(self, outcome):
        self.outcome = outcome

    def result(self, timeout_s=None):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class _Handle:
    """A Captioner deployment handle that sheds the first `shed` requests of each image."""

    def __init__(self, shed: int, refuse: set[int] = frozenset()):
        self.shed, self.refuse, self.calls = shed, refuse, []
        self.caption = self

    def remote(self, image, regions, tasks, decoding=None):
        key = int(image[0, 0, 0])
        self.calls.append(key)
        if self.calls.count(key) <= self.shed:
            return _Response(BackPressureError(num_queued_requests=2, max_queued_requests=2))
        if key in self.refuse:
            return _Response(ValueError("this one is refused"))
        return _Response([{name: f"{name} {key}" for name, _, _ in tasks} for _ in regions])


def serve_rows(n: int) -> list[dict]:
    """Stage rows of n 8x8 images, image k all of value k, each with one whole-image region."""
    from PIL import Image

    from osprey.infer.regions import Region
    from osprey.infer.stages import new_row

    region = json.dumps([Region.from_mask(np.ones((8, 8), np.uint8)).to_dict()])
    rows = []
    for key in range(n):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), key, np.uint8)).save(buffer, format="PNG")
        rows.append(new_row(f"img{key}") | {"data": buffer.getvalue(), "regions": region})
    return rows


def test_shed_requests_are_sent_again_with_growing_backoff(images):
    slept = []
    handle = _Handle(shed=3, refuse={2})
    stage = ServeCaptionStage(
        "app", job(images, "o", "m").tasks(), handle=handle, sleep=slept.append, backoff_s=0.1
    )
    rows = stage.process(serve_rows(4))
    assert [json.loads(r["captions"]) if r["captions"] else None for r in rows] == [
        [{"category": f"category {k}", "short": f"short {k}"}] for k in (0, 1)
    ] + [None, [{"category": "category 3", "short": "short 3"}]]
    # A refusal is the image's error; being shed never is.
    assert rows[2]["error"] == "img2: captioning failed: ValueError: this one is refused"
    assert sum(r["error"] is not None for r in rows) == 1
    assert sorted(handle.calls) == sorted([0, 1, 2, 3] * 4) and stage.retries == 12
    # Exponential (with up to 100 % jitter): each wait is within [d, 2d] of d = 0.1 * 2**k.
    assert len(slept) == 3
    for k, wait in enumerate(slept):
        assert 0.1 * 2**k <= wait <= 0.2 * 2**k


def test_requests_shed_past_the_retry_time_fail_the_stage_not_the_image(images):
    stage = ServeCaptionStage(
        "app", job(images, "o", "m").tasks(), handle=_Handle(shed=10**6),
        sleep=lambda s: None, retry_timeout_s=0,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="shed 2 requests"):
        stage.process(serve_rows(2))


def test_config_is_checked():
    with pytest.raises(ValueError, match="give a model, or serve_app"):
        CaptionProcessorConfig()
    with pytest.raises(ValueError, match="task 'colour'"):
        CaptionProcessorConfig(model="m", tasks=("colour",))
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        CaptionProcessorConfig(model="m", concurrency=0)
    from osprey.infer.config import EngineConfig

    with pytest.raises(ValueError, match="decoding modes only"):
        CaptionProcessorConfig(serve_app="osprey", engine=EngineConfig(temperature=0.7))
    assert [t.name for t in CaptionProcessorConfig(model="m").tasks] == ["category", "short"]


def test_serve_app_on_the_command_line():
    import argparse

    from osprey.infer.job import add_caption_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_caption_arguments(parser)
    config = config_from_args(parser.parse_args(["src", "--out", "dst", "--serve-app", "osprey"]))
    assert config.serve_app == "osprey" and config.model is None
    identity = config.identity()
    assert identity["serve_app"] == "osprey" and "model" not in identity
    with pytest.raises(ValueError, match="give --model, or --serve-app"):
        config_from_args(parser.parse_args(["src", "--out", "dst"]))
    with pytest.raises(ValueError, match="give --model, or --serve-app"):
        config_from_args(
            parser.parse_args(["src", "--out", "dst", "--model", "m", "--serve-app", "osprey"])
        )


# ---- on Ray ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_user_pipeline_gives_the_answers_of_osprey_caption(local_ray, images, model_dir, tmp_path):
    reference = tmp_path / "caption"
    run_caption_job(job(images, reference, model_dir), local=True)
    expected = job_answers(reference)

    # The user's own table: their ids and tags beside the images; one row by path only.
    files = sorted(images.iterdir())
    table = pa.table(
        {
            "path": [str(p) for p in files],
            "image": [None if i == 1 else p.read_bytes() for i, p in enumerate(files)],
            "user_id": pa.array(range(100, 100 + len(files)), pa.int32()),
            "tags": [[p.stem, "mine"] for p in files],
        }
    )
    pq.write_table(table, tmp_path / "mine.parquet")

    processor = build_caption_processor(
        processor_config(
            model_dir,
            images,
            batch_size=2,
            postprocess=lambda row: {
                **row,
                "regions": 0 if row["masks"] is None else len(row["masks"]),
            },
        )
    )
    ds = processor(local_ray.data.read_parquet(str(tmp_path / "mine.parquet")))
    ds = ds.drop_columns(["image"])
    ds.write_parquet(str(tmp_path / "captions"))

    out = pd.read_parquet(tmp_path / "captions").sort_values("user_id")
    assert list(out.user_id) == list(range(100, 100 + len(files)))
    assert [list(t) for t in out.tags] == [[p.stem, "mine"] for p in files]
    broken = out[out.path.str.endswith("broken.jpg")]
    assert len(broken) == 1 and broken.error.iloc[0].startswith(f"{images}/broken.jpg: cannot")
    good = out[out.error.isna()]
    assert len(good) == len(files) - 1 and (good.regions > 0).all()
    got = {}
    for row in good.itertuples():
        for i, (category, short) in enumerate(zip(row.category, row.short_caption, strict=True)):
            got[(row.path, i)] = (category, short)
    assert got == expected


@pytest.mark.slow
def test_caption_job_through_a_serve_app(serve_app, local_ray, tmp_path):
    """A job through the running app writes the local engine's rows; a job killed midway then
    rerun leaves exactly one row per (image, mask), and the app's replicas did the captioning."""
    import os
    import sys

    from ray import serve

    folder = write_images(tmp_path / "images", 23, seed=5)
    model_dir = serve_app.model_dir
    local = tmp_path / "local"
    run_caption_job(job(folder, local, model_dir), local=True)
    captioner = serve.get_deployment_handle("Captioner", app_name=serve_app.name)

    # `osprey caption --serve-app` as a user runs it against the cluster, killed once an image
    # is written.
    out = tmp_path / "served"
    command = [
        sys.executable, "-m", "jobs.caption", str(folder), "--out", str(out),
        "--serve-app", serve_app.name, "--images-per-file", "1", "--segment-batch", "1",
        "--caption-batch", "1", "--category-tokens", "3", "--short-tokens", "3",
    ]  # fmt: skip
    env = dict(os.environ, RAY_ADDRESS=local_ray.get_runtime_context().gcs_address)
    kill_once_written(command, out, parts=1, timeout=150, env=env)
    done = set(pd.read_parquet(out).image_path)
    assert len(done) < 24, "the kill came after the end"

    images_before = captioner.stats.remote().result()["engine"]["images"]
    # More images in flight than the captioner queues (tests/serve_support.QUEUED): it sheds.
    summary = run_caption_job(job(folder, out, None, images_per_file=4, serve_app=serve_app.name))
    assert summary.already_done == len(done) and summary.images == 24 - len(done)
    assert_exact(out, folder)
    # The rerun's regions went to the app's replicas: one engine image per image it captioned.
    frame = pd.read_parquet(local)
    rerun = set(frame[frame.mask_index.notna()].image_path) - done
    assert captioner.stats.remote().result()["engine"]["images"] - images_before == len(rerun)
    columns = ["image_path", "mask_index", "category", "short_caption", "area", "error"]
    a = pd.read_parquet(local, columns=columns).sort_values(columns[:2]).reset_index(drop=True)
    b = pd.read_parquet(out, columns=columns).sort_values(columns[:2]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_requests_the_app_sheds_are_answered_on_retry(serve_app, images):
    """More requests at once than the captioner takes (max_ongoing_requests + queued, see
    tests/serve_support): the excess is shed with BackPressureError and sent again."""
    from osprey.infer.stages import CaptionStage

    tasks = job(images, "o", "m").tasks()
    stage = ServeCaptionStage(serve_app.name, tasks, backoff_s=0.05)
    rows = stage.process(serve_rows(16))
    assert stage.retries > 0, "nothing was shed: the test no longer overloads the app"
    assert all(r["error"] is None for r in rows)
    local = CaptionStage(serve_app.model_dir, tasks).process(serve_rows(16))
    assert [r["captions"] for r in rows] == [r["captions"] for r in local]


@pytest.mark.slow
def test_a_missing_serve_app_fails_before_any_image(local_ray, images, tmp_path):
    with pytest.raises(ValueError, match="--serve-app nowhere: no running Serve application"):
        run_caption_job(job(images, tmp_path / "out", None, serve_app="nowhere"))
    assert not list((tmp_path / "out").glob("part-*"))
