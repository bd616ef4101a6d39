"""Connecting a job's driver to Ray: the one place that decides which cluster a job runs on."""

from __future__ import annotations

import logging
import os


def connect_ray(address: str | None) -> bool:
    """Connect to Ray; returns True when this call started a private local instance (to stop later).

    `address`: a cluster address ("auto": the one `ray start` left on this machine). Without one,
    RAY_ADDRESS is used if set, else a local Ray is started for this job."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # One logical CPU more than the machine has: a batch job's replicas may take every core, and
    # Ray Data's block-splitting tasks (repartition) need a CPU slot; they are light and mostly wait.
    cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) + 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True
