"""Process-level settings that must be in place before paddle is first imported.

Paddle sets OMP_NUM_THREADS=1 when it is unset, which silently makes every CPU run single
threaded; and on AMD processors its bundled MKL takes a slow generic path unless
MKL_DEBUG_CPU_TYPE=5 is set before the library loads. Both are applied here only when the
user has not chosen a value, so an explicit setting always wins.
"""

from __future__ import annotations

import os
import sys


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _is_amd() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "AuthenticAMD" in line
    except OSError:
        pass
    return False


def cpu_threads() -> int:
    """The CPU threads this process computes with: ``OMP_NUM_THREADS`` (set here, or by Ray for an
    actor), else the cores it may run on."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS") or _cpu_count()))
    except ValueError:
        return _cpu_count()


def apply_cpu_defaults() -> None:
    """Set thread count and the MKL code path unless the environment already sets them."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(_cpu_count())
        paddle = sys.modules.get("paddle")
        if paddle is not None:  # imported before us: it has already pinned itself to one thread
            paddle.base.core.set_num_threads(_cpu_count())
    if _is_amd():
        # Safe: it only selects MKL's AVX2 kernels, which every AMD CPU Paddle supports has.
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


apply_cpu_defaults()
