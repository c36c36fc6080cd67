"""Log format and level for the training drivers and workers (OSPREY_LOG_LEVEL, default INFO).

Its own module so that the worker loop (osprey.train.loop) and the driver (osprey.train.runner),
which imports the loop, both use it without importing each other."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("OSPREY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
