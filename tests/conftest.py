"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sd3_core import runtime
from tests.ray_head import Head, running_head
from tests.s3_server import aws_env, moto_server


def pytest_configure(config: pytest.Config) -> None:
    """The test process is an entry point: it computes with sd3-ray's process settings.

    Under pytest-xdist (`make test`) the workers split the cores between them. Measured on 2 cores
    (2026-12-08), 12 default-model images: one 2-thread process alone 6.0 s; two side by side with
    2 threads each 12.8-15.5 s each, with 1 thread each 7.3-7.5 s each. The whole suite, the same
    evening: 532 s with 2 workers of 1 thread, 638 s with 2 workers of 2 threads, 773 s in one
    process."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    runtime.configure(threads=max(1, len(os.sched_getaffinity(0)) // workers) if workers > 1 else None)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint on loopback (moto_server subprocess) for the whole session; sets the
    standard AWS variables (endpoint, test credentials) while it runs. Use
    `tests.s3_server.make_bucket(s3_endpoint)` for a fresh bucket per test."""
    with moto_server() as endpoint, aws_env(endpoint):
        yield endpoint


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Head]:
    """A real local Ray head with the Jobs API (`ray start --head` subprocess) for the whole session."""
    with running_head() as head:
        yield head
