"""Start a local Ray or join a cluster: the one place every driver (training, captioning,
evaluation, data preparation, the bases, the quickstart, `osprey serve`) gets its Ray from."""

from __future__ import annotations

import math
import os


def init_ray(
    address: str | None = None,
    *,
    num_cpus: float | None = None,
    log_to_driver: bool = True,
) -> bool:
    """Join `address` (else `RAY_ADDRESS`) or start a local Ray; return True when this call
    initialised Ray (so the caller shuts it down), False when Ray was already up.

    A local Ray listens on 127.0.0.1 only, and gets at least `num_cpus` logical CPUs even
    above the core count: a driver's actor pools could otherwise hold every CPU and starve the
    tasks that feed them (the data reader waits forever for a free CPU)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return True
    cpus = os.cpu_count() or 1
    if num_cpus is not None:
        cpus = max(cpus, math.ceil(num_cpus))
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        _node_ip_address="127.0.0.1",
    )
    return True
