"""Wall-clock seconds per pipeline stage, for benchmarks (`StableDiffusion3Pipeline.stage_timer`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import paddle

STAGES = ("text_encoding", "denoising", "vae_decode")


class StageTimer:
    """Seconds spent in each of `STAGES`, summed over pipeline calls, plus the denoising steps run.

    Each stage waits for the device before and after, so queued GPU work is not misattributed."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.steps = 0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        _synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.seconds[name] += time.perf_counter() - started


def _synchronize() -> None:
    if not paddle.device.get_device().startswith("cpu"):
        paddle.device.synchronize()
