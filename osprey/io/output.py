"""The captioning job's output folder: parquet parts committed atomically, read back to resume.

Layout of DST (local folder or s3:// prefix):

    _job.json                  the options that decide the rows (checked on every rerun)
    part-<hash>.parquet        rows of a group of images, all rows of an image in one part
    _render/<hash>.png         overlays (--render); _gallery/index.html, _gallery/page-N.html

A part appears whole or not at all: locally it is written under a temporary name and renamed,
on S3 an object is visible only once its upload completes. Its name is a hash of the images it
holds, so a retried write replaces the same file. An image is done when a part holds it; a rerun
skips done images, so a killed job resumed over the same DST ends with exactly one row per
(image, mask), and `repair_duplicates` removes the copies left by concurrent or orphaned writers.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from osprey.io.storage import Location

JOB_FILE = "_job.json"
PART_PREFIX = "part-"
TMP_PREFIX = ".tmp-"
# Leading "_": parquet readers (pyarrow, pandas, Ray) skip such folders when reading DST.
RENDER_DIR = "_render"
GALLERY_DIR = "_gallery"

MASK_TYPE = pa.struct(
    [
        # COCO compressed RLE (pycocotools' bytes) and [height, width], as the shards store it.
        pa.field("counts", pa.binary(), nullable=False),
        # Variable-size lists: pandas cannot convert null rows of fixed-size ones.
        pa.field("size", pa.list_(pa.int32()), nullable=False),
    ]
)

# Task name (osprey.infer.engine) -> output column.
TASK_COLUMNS: dict[str, str] = {
    "category": "category",
    "short": "short_caption",
    "detailed": "detailed_caption",
    "answer": "answer",
}

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("image_path", pa.string(), nullable=False),
        # Of the upright image (EXIF rotation applied), the grid the masks are in.
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        # 0-based index of the region in its image (largest first); null on a row that stands for
        # an image without regions or with an error.
        pa.field("mask_index", pa.int32()),
        pa.field("mask", MASK_TYPE),
        pa.field("bbox", pa.list_(pa.float32())),  # COCO [x, y, w, h]
        pa.field("area", pa.int64()),
        # SAM's scores; null for the classical segmenter.
        pa.field("predicted_iou", pa.float32()),
        pa.field("stability_score", pa.float32()),
        *(pa.field(column, pa.string()) for column in TASK_COLUMNS.values()),
        # Overlay PNG relative to DST (--render).
        pa.field("render", pa.string()),
        # Why the image has no result; it names the file.
        pa.field("error", pa.string()),
    ]
)


def part_name(image_paths: Iterable[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(image_paths)).encode()).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}.parquet"


def render_name(image_path: str) -> str:
    return f"{RENDER_DIR}/{hashlib.sha1(image_path.encode()).hexdigest()[:24]}.png"


@dataclass(frozen=True)
class OutputDir:
    """DST; pickles, so Ray tasks can write into it."""

    where: Location

    # ---- files ----------------------------------------------------------------------------

    def ensure(self) -> None:
        if self.where.scheme:
            return  # S3 has no folders to create
        self.where.fs.create_dir(self.where.path, recursive=True)

    def _names(self, prefix: str) -> list[str]:
        fs, path = self.where.fs, self.where.path
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return sorted(
            posixpath.basename(f.path)
            for f in fs.get_file_info(pafs.FileSelector(path, recursive=False))
            if f.type == pafs.FileType.File and posixpath.basename(f.path).startswith(prefix)
        )

    def parts(self) -> list[str]:
        """Committed part files (full paths for the filesystem)."""
        return [
            self.where.child(n).path for n in self._names(PART_PREFIX) if n.endswith(".parquet")
        ]

    def clean_temporary(self) -> int:
        """Remove half-written files a killed run left behind; returns how many."""
        names = self._names(TMP_PREFIX)
        for name in names:
            self.where.fs.delete_file(self.where.child(name).path)
        return len(names)

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write DST/name atomically; returns its URI."""
        target = self.where.child(name)
        fs = self.where.fs
        if self.where.scheme:
            # An S3 object becomes visible only when its upload completes: already atomic.
            with fs.open_output_stream(target.path) as stream:
                stream.write(data)
            return target.uri
        fs.create_dir(posixpath.dirname(target.path), recursive=True)
        tmp = self.where.child(f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(name)}")
        with fs.open_output_stream(tmp.path) as stream:
            stream.write(data)
        fs.move(tmp.path, target.path)  # rename: atomic on one filesystem
        return target.uri

    def write_part(self, rows: list[dict[str, Any]]) -> str:
        """Commit the rows of some images as one part; returns its name."""
        table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        name = part_name({r["image_path"] for r in rows})
        self.write_bytes(name, sink.getvalue().to_pybytes())
        return name

    # ---- reading back ---------------------------------------------------------------------

    def read_column(self, path: str, columns: list[str]) -> pa.Table:
        return pq.read_table(path, columns=columns, filesystem=self.where.fs)

    def done_images(self) -> set[str]:
        """Images some committed part holds."""
        done: set[str] = set()
        for path in self.parts():
            done.update(self.read_column(path, ["image_path"]).column(0).to_pylist())
        return done

    def repair_duplicates(self) -> int:
        """Keep each image in one part only (the first by name); returns the rows removed.

        A run never writes an image twice itself; copies come only from a writer of an earlier,
        killed run that outlived it, or from two runs over one DST at the same time.
        """
        owner: dict[str, str] = {}
        removed = 0
        for path in self.parts():
            images = self.read_column(path, ["image_path"]).column(0).to_pylist()
            taken = {i for i in set(images) if owner.get(i, path) != path}
            for image in set(images) - taken:
                owner[image] = path
            if not taken:
                continue
            table = pq.read_table(path, filesystem=self.where.fs)
            keep = [i not in taken for i in images]
            kept = table.filter(pa.array(keep))
            removed += table.num_rows - kept.num_rows
            if kept.num_rows:
                sink = pa.BufferOutputStream()
                pq.write_table(kept, sink, compression="zstd")
                # Same name: the rewrite replaces the part atomically.
                self.write_bytes(posixpath.basename(path), sink.getvalue().to_pybytes())
            else:
                self.where.fs.delete_file(path)
        return removed

    # ---- the job's identity ---------------------------------------------------------------

    def check_job(self, identity: dict[str, Any]) -> None:
        """Record what decides the rows, or check a rerun asks for the same rows."""
        target = self.where.child(JOB_FILE)
        if target.exists():
            previous = target.read_json()
            changed = sorted(
                k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k)
            )
            if changed:
                details = "; ".join(
                    f"{k}: {previous.get(k)!r} then, {identity.get(k)!r} now" for k in changed
                )
                raise ValueError(
                    f"{self.where.uri} holds the output of a job with other options ({details}); "
                    "rerun with the same options to resume, or choose another --out"
                )
            return
        self.write_bytes(JOB_FILE, json.dumps(identity, indent=2, sort_keys=True).encode())
