"""Where converters read from: local paths or s3:// URIs, both through pyarrow filesystems."""

from __future__ import annotations

import argparse
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs


@dataclass(frozen=True)
class S3Options:
    """How to reach S3 (or an S3-compatible store); credentials come from the AWS environment."""

    endpoint: str | None = None  # "host:port" of an S3-compatible server, e.g. MinIO or moto
    scheme: str = "https"
    region: str | None = None

    def filesystem(self) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {"scheme": self.scheme}
        if self.endpoint:
            kwargs["endpoint_override"] = self.endpoint
        if self.region:
            kwargs["region"] = self.region
        return pafs.S3FileSystem(**kwargs)


def add_s3_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--s3-endpoint/--s3-scheme/--s3-region, as every job's command line spells them."""
    parser.add_argument("--s3-endpoint", help="host:port of an S3-compatible server")
    parser.add_argument("--s3-scheme", choices=("https", "http"), default="https")
    parser.add_argument("--s3-region")


def s3_options_from_args(args: argparse.Namespace) -> S3Options | None:
    """The S3Options add_s3_arguments' flags ask for; None when they are all left at default."""
    endpoint = getattr(args, "s3_endpoint", None)
    scheme = getattr(args, "s3_scheme", None) or "https"
    region = getattr(args, "s3_region", None)
    if endpoint is None and region is None and scheme == "https":
        return None
    return S3Options(endpoint=endpoint, scheme=scheme, region=region)


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem; pickles, so Ray tasks can carry it."""

    fs: pafs.FileSystem
    path: str  # as the filesystem wants it: absolute for local, "bucket/key" for S3
    scheme: str = ""  # "" for local, "s3" for S3

    def child(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, name), self.scheme)

    @property
    def uri(self) -> str:
        """The path as a user would write it (recorded in the shards' image_path column)."""
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.readall()

    def read_json(self) -> Any:
        try:
            return json.loads(self.read_bytes())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.uri}: not valid JSON ({exc})") from exc

    def read_jsonl(self) -> list[Any]:
        records = []
        for lineno, line in enumerate(self.read_bytes().decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.uri}:{lineno}: not valid JSON ({exc})") from exc
        return records

    def list_files(self) -> list[str]:
        """Paths of all files under this folder, relative to it, sorted."""
        info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.Directory:
            raise ValueError(f"{self.uri}: not a folder")
        selector = pafs.FileSelector(self.path, recursive=True)
        prefix = self.path.rstrip("/") + "/"
        return sorted(
            f.path[len(prefix) :]
            for f in self.fs.get_file_info(selector)
            if f.type == pafs.FileType.File and f.path.startswith(prefix)
        )


def resolve(path_or_uri: str, s3: S3Options | None = None) -> Location:
    """A local path or an s3://bucket/key URI -> Location."""
    if path_or_uri.startswith("s3://"):
        fs = (s3 or S3Options()).filesystem()
        return Location(fs, path_or_uri[len("s3://") :].rstrip("/"), "s3")
    if "://" in path_or_uri:
        raise ValueError(f"{path_or_uri}: only local paths and s3:// URIs are supported")
    return Location(pafs.LocalFileSystem(), os.path.abspath(path_or_uri))


def as_location(value: str | Location) -> Location:
    return value if isinstance(value, Location) else resolve(value)
