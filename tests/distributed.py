"""Run a test program on N local processes joined by real Paddle collectives (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_ranks(world_size: int, module: str, spec: dict, timeout: float = 300) -> None:
    """Start ``python -m module SPEC`` once per rank and wait for all; raise with the logs of
    failed ranks. Each rank gets ``spec`` plus its ``rank`` and every rank's ``endpoints``."""
    endpoints = [f"127.0.0.1:{p}" for p in free_ports(world_size)]
    # One thread per rank: the ranks share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, json.dumps({**spec, "rank": r, "endpoints": endpoints})],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [
        (r, p.returncode, log) for r, (p, log) in enumerate(zip(procs, logs, strict=False)) if p.returncode
    ]
    if failed:
        detail = "\n".join(f"--- rank {r} exited {code}:\n{log[-3000:]}" for r, code, log in failed)
        raise RuntimeError(f"{len(failed)} of {world_size} ranks failed\n{detail}")
