"""A real local Ray head for Ray Jobs tests: `ray start --head --block` as a subprocess with its own
temp dir, ports, auth token and loopback-only node address, so it never meets another test's (or
another user's) Ray. One head serves the session (the ``ray_head`` fixture in conftest.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str
    env: dict[str, str]  # what a user's shell has: the token, but no RAY_AUTH_MODE


def _stop(proc: subprocess.Popen) -> None:
    """Stop this head and everything it started, as `ray stop` would but only this head's processes:
    its process tree and its session (it was started with start_new_session, so sid == its pid)."""
    procs = {}
    try:
        procs = {p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)}
        procs[proc.pid] = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                procs.setdefault(p.pid, p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    # SIGTERM to all at once, then SIGKILL what is left after a few seconds: `ray start --block`
    # on its own stops its processes one by one with long grace periods (~30 s after a job ran).
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)


@contextmanager
def running_head() -> Iterator[Head]:
    """A started head (dashboard up), stopped with everything it started on exit."""
    # A short root: Ray's unix socket paths under it must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="sd3rj-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `sd3` is this venv's
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_TOKEN_PATH=str(token),  # never the user's ~/.ray/auth_token
        # Node address 127.0.0.1 (Ray otherwise picks the machine's routable address).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    dashboard = free_port()
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--port={free_port()}",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        f"--temp-dir={root}",
        "--disable-usage-stats",
    ]
    log = open(root / "ray-start.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        env={**env, "RAY_AUTH_MODE": "token"},
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        request = urllib.request.Request(
            f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token.read_text()}"}
        )
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited {proc.returncode}:\n{(root / 'ray-start.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(request, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray dashboard did not come up in 90 s")
            time.sleep(0.5)
        yield Head(address, env)
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def run(head: Head, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=head.env, capture_output=True, text=True, timeout=timeout
    )
