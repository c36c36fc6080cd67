"""Converters from every source data set Osprey trains on into SHARD_SCHEMA rows (docs/data.md).

One module per source family; each converter has `entries()` (read the annotation file) and
`convert(entry, stats)` (one row); `iter_rows(converter)` runs both.
"""

from osprey.data.converters.base import ConversionStats, Converter, iter_rows
from osprey.data.converters.coco import CocoInstances, RefCoco, VisualGenome
from osprey.data.converters.images import ImageFolder
from osprey.data.converters.llava import LlavaCaptions
from osprey.data.converters.osprey724k import Osprey724K
from osprey.data.converters.vcr import Vcr
from osprey.io.storage import Location, S3Options, resolve

__all__ = [
    "CocoInstances",
    "ConversionStats",
    "Converter",
    "ImageFolder",
    "LlavaCaptions",
    "Location",
    "Osprey724K",
    "RefCoco",
    "S3Options",
    "Vcr",
    "VisualGenome",
    "iter_rows",
    "resolve",
]
