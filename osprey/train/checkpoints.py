"""Which of a run's stored checkpoints are complete, and the newest one to resume from.

Ray Train resumes from the newest checkpoint its controller registered. A checkpoint that every
rank had uploaded but the controller had not yet registered when a worker died is not offered
(seen here: both workers reported step 10, a worker was killed 5 s later, and the stage
restarted at step 0; ray-project/ray#41700 is the same class of problem). So rank 0 writes a
completion marker into the stored checkpoint once every rank's upload has returned, listing every
rank's files and sizes, and a restarting stage resumes from the newest checkpoint whose marker and
files are all there. A checkpoint without its marker, or with a listed file missing, is partial:
it is never loaded, and the log names it.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

MARKER = "osprey_complete.json"
STATE_FILE = "train_state.json"  # rank 0's TrainState, in every checkpoint
PREFIX = "checkpoint_"


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint directory in a run's storage (a path on `fs`, as Ray Train keeps it)."""

    name: str
    path: str
    step: int


@dataclass(frozen=True)
class Partial:
    name: str
    reason: str


def checkpoint_dir_name(step: int) -> str:
    """Sorts by step, and is new on every attempt so a retried step never mixes with the files
    of a lost one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return f"{PREFIX}step{step:08d}_{stamp}"


def local_files(directory: str | Path) -> dict[str, int]:
    """Relative path -> size of every file under a local directory."""
    root = Path(directory)
    return {
        p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }


def write_marker(
    fs: pafs.FileSystem, path: str, step: int, world_size: int, files: dict[str, int]
) -> None:
    """Mark a stored checkpoint complete; call only after every rank's upload has returned."""
    marker = {"step": step, "world_size": world_size, "files": files}
    with fs.open_output_stream(posixpath.join(path, MARKER)) as stream:
        stream.write(json.dumps(marker).encode())


def stored_files(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    prefix = path.rstrip("/") + "/"
    return {
        f.path[len(prefix) :]: f.size
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File and f.path.startswith(prefix)
    }


def inspect(fs: pafs.FileSystem, path: str) -> StoredCheckpoint | Partial:
    """The checkpoint at `path` if it is complete, else why it is not."""
    name = posixpath.basename(path.rstrip("/"))
    files = stored_files(fs, path)
    if MARKER not in files:
        return Partial(name, "no completion marker: a rank had not finished uploading")
    try:
        with fs.open_input_stream(posixpath.join(path, MARKER)) as stream:
            marker = json.loads(stream.readall())
        step, expected = int(marker["step"]), dict(marker["files"])
    except (ValueError, KeyError, TypeError) as exc:
        return Partial(name, f"unreadable completion marker ({exc})")
    missing = sorted(f for f, size in expected.items() if files.get(f) != size)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        return Partial(name, f"missing or truncated: {shown}")
    return StoredCheckpoint(name, path, step)


def scan(fs: pafs.FileSystem, run_path: str) -> tuple[list[StoredCheckpoint], list[Partial]]:
    """(complete checkpoints newest first, partial ones) in a run's storage folder."""
    info = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    complete, partial = [], []
    for entry in info:
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith(PREFIX):
            continue
        found = inspect(fs, entry.path)
        (complete if isinstance(found, StoredCheckpoint) else partial).append(found)
    complete.sort(key=lambda c: (c.step, c.name), reverse=True)
    return complete, partial


def resume_point(
    fs: pafs.FileSystem, run_path: str, offered: str | None
) -> tuple[StoredCheckpoint | None, list[str]]:
    """The checkpoint to resume from, and lines for the log about what was passed over.

    `offered` is the path of the checkpoint Ray Train offers (`ray.train.get_checkpoint()`).
    Ray registers a checkpoint only after every rank has reported it, and a rank reports only
    after its upload, so an offered checkpoint without a marker (rank 0 died between the
    reports and the marker) is complete too; one whose marker lists a missing file is not.
    """
    complete, partial = scan(fs, run_path)
    notes = [f"not resuming from partial checkpoint {p.name}: {p.reason}" for p in partial]
    if offered:
        name = posixpath.basename(offered.rstrip("/"))
        reason = next((p.reason for p in partial if p.name == name), None)
        if reason and reason.startswith("no completion marker"):
            step = _state_step(fs, offered)
            if step is not None:
                notes = [n for n in notes if f" {name}:" not in n]
                complete.append(StoredCheckpoint(name, offered, step))
                complete.sort(key=lambda c: (c.step, c.name), reverse=True)
    chosen = complete[0] if complete else None
    if offered and (chosen is None or chosen.path.rstrip("/") != offered.rstrip("/")):
        name = posixpath.basename(offered.rstrip("/"))
        instead = f"{chosen.name} (step {chosen.step})" if chosen else "none"
        notes.append(f"Ray Train offered {name}; the newest complete checkpoint is {instead}")
    return chosen, notes


def _state_step(fs: pafs.FileSystem, path: str) -> int | None:
    try:
        with fs.open_input_stream(posixpath.join(path, STATE_FILE)) as stream:
            return int(json.loads(stream.readall())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
