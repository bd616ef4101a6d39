"""`sd3 submit`: jobs through Ray Jobs on a real local Ray head (`ray start --head`, dashboard on).

The head runs as a `ray start --block` subprocess with its own temp dir, ports, auth token and
loopback-only node address, so it never meets another test's (or another user's) Ray; the CLI
runs as a subprocess too, exactly as a user runs it.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from jobs.submit import Submission, build_entrypoint, build_runtime_env, relative_path_warnings
from tests.reference_cases import fixture_path

BIN = Path(sys.executable).parent
TINY = ["--model", fixture_path("sd3-tiny"), "--steps", "1", "--height", "64", "--width", "64"]


def _free_port() -> int:
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


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
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
    dashboard = _free_port()
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--port={_free_port()}",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
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


def _run(head: Head, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=head.env, capture_output=True, text=True, timeout=timeout
    )


def test_submit_generate_succeeds_and_writes_images(ray_head: Head, tmp_path: Path) -> None:
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["fox", "cat"], "prompt": ["a red fox", "a cat's portrait"]}), table)
    # Spaces, a quote and a `$` in the path: the job's shell must see it as one literal argument.
    out = tmp_path / "out dir's $HOME"
    sid = f"sd3-test-{secrets.token_hex(4)}"
    submitted = _run(
        ray_head,
        "sd3",
        "submit",
        "--address",
        ray_head.address,
        "--submission-id",
        sid,
        "generate",
        "--prompts",
        str(table),
        "--output",
        str(out),
        *TINY,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert f"submitted Ray job {sid}" in submitted.stdout
    assert f"job logs --address {ray_head.address} --follow {sid}" in submitted.stdout
    assert f"job status --address {ray_head.address} {sid}" in submitted.stdout
    assert "RAY_AUTH_MODE=token ray job" in submitted.stdout  # the cluster wants the token

    # Follow with Ray's own CLI, as the printed hint says; it returns when the job ends.
    auth = {**ray_head.env, "RAY_AUTH_MODE": "token"}
    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", ray_head.address, "--follow", sid],
        env=auth,
        capture_output=True,
        text=True,
        timeout=240,
    )
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", ray_head.address, sid],
        env=auth,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"Job '{sid}' succeeded" in status.stdout, logs.stdout + logs.stderr
    images = sorted((out / "images").iterdir())
    assert [p.name for p in images] == ["cat_0.png", "fox_0.png"]
    assert all(Image.open(p).size == (64, 64) for p in images)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted((r["id"], r["k"], r["status"]) for r in manifest) == [("cat", 0, "ok"), ("fox", 0, "ok")]


def test_failing_job_reports_failed(ray_head: Head, tmp_path: Path) -> None:
    sid = f"sd3-test-{secrets.token_hex(4)}"
    missing = tmp_path / "missing.parquet"
    common = ["sd3", "submit", "--address", ray_head.address, "--submission-id", sid]
    job = ["generate", "--prompts", str(missing), "--output", str(tmp_path / "out"), *TINY]
    followed = _run(ray_head, *common, "--follow", *job)
    assert followed.returncode == 1, followed.stdout + followed.stderr
    assert f"Ray job {sid} FAILED" in followed.stderr
    assert str(missing) in followed.stdout  # the job's own error, streamed from its logs
    assert not (tmp_path / "out" / "images").exists() or not any((tmp_path / "out" / "images").iterdir())

    # The same submission id again: Ray refuses, and the CLI says so instead of a traceback.
    again = _run(ray_head, *common, *job)
    assert again.returncode == 2
    assert "Ray refused the job" in again.stderr and sid in again.stderr


def test_bad_job_arguments_fail_before_contacting_ray(capsys: pytest.CaptureFixture) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(SystemExit) as exc:
        main(["submit", "--address", closed, "generate", "--prompt", "x", "--output", "o", "--steps", "0"])
    assert exc.value.code == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["submit", "--address", closed, "train", "--output", "o"])  # not a submittable command


def test_unreachable_dashboard_is_a_clear_error(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # keep this process's Ray auth state untouched
    closed = f"http://127.0.0.1:{_free_port()}"
    rc = main(["submit", "--address", closed, "generate", "--prompt", "x", "--output", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray dashboard at {closed}" in err and "ray start --head" in err


def test_entrypoint_quotes_every_argument() -> None:
    args = ["--prompt", "a fox; rm -rf / && echo $HOME `id` 'q' \"dq\"", "--output", "s3://b/out dir"]
    entrypoint = build_entrypoint("generate", args)
    assert shlex.split(entrypoint) == ["sd3", "generate", *args]
    with pytest.raises(ValueError, match="cannot submit 'bogus'"):
        build_entrypoint("bogus", [])


def test_runtime_env_options(tmp_path: Path) -> None:
    assert build_runtime_env() is None
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars:\n  A: '1'\nworking_dir: /elsewhere\n")
    assert build_runtime_env(str(env_file), None, str(tmp_path)) == {
        "env_vars": {"A": "1"},
        "working_dir": str(tmp_path),
    }
    assert build_runtime_env(None, '{"pip": ["x"]}') == {"pip": ["x"]}
    with pytest.raises(ValueError, match="--runtime-env-json: not valid JSON"):
        build_runtime_env(None, "{nope")
    with pytest.raises(ValueError, match="--runtime-env .*no such file"):
        build_runtime_env(str(tmp_path / "absent.yaml"))
    with pytest.raises(ValueError, match="must be a mapping"):
        build_runtime_env(None, "[1, 2]")
    with pytest.raises(ValueError, match="--working-dir .*no such directory"):
        build_runtime_env(None, None, str(tmp_path / "absent"))


def test_relative_paths_are_pointed_out() -> None:
    class Parsed:
        prompts = "table.parquet"
        output = "s3://bucket/out"
        model = "/models/sd3"

    notes = relative_path_warnings(Parsed())
    assert len(notes) == 1 and "--prompts table.parquet is a relative path" in notes[0]


def test_follow_hint_with_default_address() -> None:
    hint = Submission("http://127.0.0.1:8265", "raysubmit_x", "sd3 generate --prompt x").follow_hint()
    assert "ray job logs --follow raysubmit_x" in hint and "--address" not in hint
