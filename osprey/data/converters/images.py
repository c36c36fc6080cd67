"""A plain folder (or S3 prefix) of images: the input of the captioning job.

One row per image file under the root (recursively, sorted by path), task "images", no regions
and no conversation; width/height from the image header. Listing goes through pyarrow
filesystems, so `s3://bucket/prefix` works as well as a local folder.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from osprey.data.converters.base import ConversionStats, load_image, make_row
from osprey.io.storage import Location, as_location

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageFolder:
    images: str | Location
    source: str = "images"

    def __post_init__(self) -> None:
        self.images = as_location(self.images)

    def entries(self) -> list[str]:
        return [
            name
            for name in self.images.list_files()
            if posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]

    def convert(self, entry: str, stats: ConversionStats) -> dict[str, Any] | None:
        image = load_image(self.images, [entry], stats, f"{self.source} {entry}")
        if image is None:
            return None
        return make_row(
            sample_id=f"{self.source}:{entry}", source=self.source, task="images", image=image
        )
