"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sd3_core import runtime
from tests.ray_head import Head, running_head
from tests.s3_server import aws_env, moto_server


def pytest_configure(config: pytest.Config) -> None:
    """The test process is an entry point: it computes with sd3-ray's process settings."""
    runtime.configure()


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
