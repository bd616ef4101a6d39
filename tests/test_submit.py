"""`sd3 submit`: jobs through Ray Jobs on a real local Ray head (`ray start --head`, dashboard on).

The head (tests/ray_head.py, one for the session) runs as a `ray start --block` subprocess with its
own temp dir, ports, auth token and loopback-only node address; the CLI runs as a subprocess too,
exactly as a user runs it.
"""

from __future__ import annotations

import secrets
import shlex
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from jobs.submit import Submission, build_entrypoint, build_runtime_env, relative_path_warnings
from tests.ray_head import BIN, Head, free_port, run
from tests.reference_cases import fixture_path

TINY = ["--model", fixture_path("sd3-tiny"), "--steps", "1", "--height", "64", "--width", "64"]


def test_submit_generate_succeeds_and_writes_images(ray_head: Head, tmp_path: Path) -> None:
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["fox", "cat"], "prompt": ["a red fox", "a cat's portrait"]}), table)
    # Spaces, a quote and a `$` in the path: the job's shell must see it as one literal argument.
    out = tmp_path / "out dir's $HOME"
    sid = f"sd3-test-{secrets.token_hex(4)}"
    submitted = run(
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
    followed = run(ray_head, *common, "--follow", *job)
    assert followed.returncode == 1, followed.stdout + followed.stderr
    assert f"Ray job {sid} FAILED" in followed.stderr
    assert str(missing) in followed.stdout  # the job's own error, streamed from its logs
    assert not (tmp_path / "out" / "images").exists() or not any((tmp_path / "out" / "images").iterdir())

    # The same submission id again: Ray refuses, and the CLI says so instead of a traceback.
    again = run(ray_head, *common, *job)
    assert again.returncode == 2
    assert "Ray refused the job" in again.stderr and sid in again.stderr


def test_bad_job_arguments_fail_before_contacting_ray(capsys: pytest.CaptureFixture) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
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
    closed = f"http://127.0.0.1:{free_port()}"
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
