"""A real S3 endpoint on loopback for tests (moto's server as a subprocess, as s3fs's own tests do),
and a loopback TCP proxy that can be paused to simulate an unreachable endpoint.

Usage: the session fixture `s3_endpoint` (tests/conftest.py) yields the endpoint URL and sets the
standard AWS variables; `make_bucket(endpoint)` creates a fresh bucket; `PausableProxy(endpoint)`
forwards a second port to it and `proxy.pause(5)` makes it unreachable for 5 seconds.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Keep botocore from probing the EC2 metadata service (network only to 127.0.0.1).
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_server_exe() -> str:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return str(exe)
    found = shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found: install the test extra (pip install -e .[test])")
    return found


def wait_until_up(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers an HTTP request (RuntimeError after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"moto_server exited early with code {proc.returncode}")
        try:
            with opener.open(url, timeout=2) as r:
                r.read()
            return
        except OSError as e:
            if getattr(e, "code", None):  # an HTTP error status: the server answers
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:.0f}s: {e}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def moto_server(port: int | None = None) -> Iterator[str]:
    """Run moto_server on 127.0.0.1 (a free port) and yield its endpoint URL."""
    port = port or free_port()
    env = {**os.environ, **TEST_CREDENTIALS}
    proc = subprocess.Popen(
        [_moto_server_exe(), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(endpoint + "/moto-api/", proc=proc)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def aws_env(endpoint: str) -> Iterator[None]:
    """Set the standard AWS variables (test credentials, `endpoint`) and restore them afterwards."""
    values = {
        **TEST_CREDENTIALS,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "NO_PROXY": ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get("NO_PROXY")])),
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_client(endpoint: str):
    """A boto3 S3 client for `endpoint` with the test credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def make_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a fresh bucket (unique name by default) and return its name."""
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def storage_options(endpoint: str):
    """`sd3_core.storage.StorageOptions` for `endpoint` with the test credentials."""
    from sd3_core.storage import StorageOptions

    return StorageOptions(
        endpoint_url=endpoint,
        key=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


class PausableProxy:
    """A loopback TCP proxy to `target` ("http://host:port" or (host, port)) that can be paused.

    While paused, new connections are refused (the listening socket is closed: "connection
    refused", mode="refuse") or accepted and closed at once (mode="close"), and every open
    connection is cut, so clients see the endpoint as unreachable. `url` is the endpoint to use."""

    def __init__(self, target: str | tuple[str, int], port: int | None = None) -> None:
        if isinstance(target, str):
            hostport = target.split("://", 1)[-1].rstrip("/")
            host, _, p = hostport.rpartition(":")
            target = (host, int(p))
        self.target = target
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0  # connections forwarded to the target
        self.refused = 0  # connections accepted and closed while paused (mode="close" only; in
        # mode="refuse" the kernel refuses them and nothing is counted)
        self._lock = threading.Lock()
        self._paused = threading.Event()
        self._stopped = threading.Event()
        self._mode = "refuse"
        self._listener: socket.socket | None = None
        self._listening = threading.Event()
        self._closed = threading.Event()
        self._pipes: set[socket.socket] = set()
        self._resume_timer: threading.Timer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> PausableProxy:
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="pausable-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._resume_timer:
            self._resume_timer.cancel()
        if self._thread:
            self._thread.join(timeout=5)  # it closes the listener
        self._cut_all()

    def __enter__(self) -> PausableProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- control
    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self, seconds: float | None = None, mode: str = "refuse") -> None:
        """Make the endpoint unreachable now; resume by itself after `seconds` (None: until resume())."""
        if mode not in ("refuse", "close"):
            raise ValueError("mode must be 'refuse' or 'close'")
        with self._lock:
            self._mode = mode
            if mode == "refuse":
                self._listening.clear()
            self._paused.set()
        if mode == "refuse":
            self._closed.wait(5)  # the accept thread owns the listener; wait until it closed it
        self._cut_all()
        if self._resume_timer:
            self._resume_timer.cancel()
        if seconds is not None:
            self._resume_timer = threading.Timer(seconds, self.resume)
            self._resume_timer.daemon = True
            self._resume_timer.start()

    def resume(self) -> None:
        """Accept and forward connections again (returns once the port listens)."""
        with self._lock:
            self._paused.clear()
        if not self._stopped.is_set():
            self._listening.wait(5)

    @contextlib.contextmanager
    def paused_for(self, seconds: float, mode: str = "refuse") -> Iterator[None]:
        """Pause, run the body, and make sure the proxy is resumed afterwards."""
        self.pause(seconds, mode)
        try:
            yield
        finally:
            self.resume()

    # -- internals
    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:
            try:
                s.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    s.close()
                    raise
                time.sleep(0.05)
        s.listen(128)
        s.settimeout(0.05)
        self._listener = s
        self._closed.clear()
        self._listening.set()

    def _close_listener(self) -> None:
        s, self._listener = self._listener, None
        if s is not None:
            s.close()
        self._closed.set()

    def _cut_all(self) -> None:
        with self._lock:
            pipes, self._pipes = self._pipes, set()
        for s in pipes:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept_loop(self) -> None:
        # Only this thread touches the listening socket (closing it under a blocked accept() in
        # another thread would leave it listening until that call returns).
        try:
            while not self._stopped.is_set():
                if self._paused.is_set() and self._mode == "refuse":
                    if self._listener is not None:
                        self._close_listener()
                    time.sleep(0.02)
                    continue
                if self._listener is None:
                    self._listen()
                try:
                    client, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    time.sleep(0.02)  # e.g. ECONNABORTED: keep serving
                    continue
                if self._paused.is_set():
                    self.refused += 1
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                self.connections += 1
                with self._lock:
                    self._pipes.update((client, upstream))
                threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
        finally:
            self._close_listener()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        try:
            while not self._stopped.is_set():
                readable, _, _ = select.select(socks, [], [], 0.2)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._pipes.discard(a)
                self._pipes.discard(b)
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()
