"""Submit `sd3` jobs to a Ray cluster through Ray Jobs (the job server in the Ray dashboard).

`sd3 submit [options] generate ARGS...` runs `sd3 generate ARGS...` as the entrypoint of a Ray
job: the driver runs on the cluster's head node, survives the submitting terminal, and its logs and
status are kept by Ray (`ray job logs --follow ID`, `ray job status ID`). Submitting, following
and stopping are Ray's own machinery; this module only builds the entrypoint safely and reports.

A job kind that can be submitted is an `sd3` subcommand listed in `SUBMITTABLE`; a later command
(e.g. `train`) becomes submittable by adding it there.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from sd3_core.hub import is_hub_id

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# `sd3` subcommands that can run as a Ray job, with a one-line description for `sd3 submit --help`.
SUBMITTABLE: dict[str, str] = {
    "generate": "render a prompt table on the cluster (the same arguments as `sd3 generate`)",
    "train": "fine-tune on the cluster: `train dreambooth ...` or `train dreambooth-lora ...` (as `sd3 train`)",
}

# Arguments of submittable commands that name files; a relative one resolves on the cluster, in
# the job's working directory, which is rarely what the submitter meant.
PATH_ARGUMENTS = (
    "prompts", "output", "model", "lora",
    "instance_data_dir", "dataset", "class_data_dir", "output_dir", "pretrained_model_name_or_path",
)  # fmt: skip


# Path arguments that may also be a Hugging Face Hub id (org/name).
MODEL_ARGUMENTS = ("model", "pretrained_model_name_or_path")


def default_address() -> str:
    """The Ray dashboard address: the same environment variables as `ray job submit`, else local."""
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def build_entrypoint(command: str, args: Sequence[str]) -> str:
    """The shell command of the job, every argument quoted so the cluster's shell passes it as is."""
    if command not in SUBMITTABLE:
        raise ValueError(f"cannot submit {command!r}: submittable commands are {sorted(SUBMITTABLE)}")
    return shlex.join(["sd3", command, *args])


def build_runtime_env(
    runtime_env_file: str | None = None,
    runtime_env_json: str | None = None,
    working_dir: str | None = None,
) -> dict[str, Any] | None:
    """A runtime_env dict from the same three options `ray job submit` takes (Ray's own parser)."""
    import json

    import yaml
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    if working_dir is not None and not os.path.isdir(working_dir) and "://" not in working_dir:
        raise ValueError(f"--working-dir {working_dir}: no such directory")
    try:
        env = parse_runtime_env_args(
            runtime_env=runtime_env_file, runtime_env_json=runtime_env_json, working_dir=working_dir
        )
    except FileNotFoundError as e:
        raise ValueError(f"--runtime-env {runtime_env_file}: no such file") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--runtime-env-json: not valid JSON ({e})") from e
    except yaml.YAMLError as e:
        raise ValueError(f"--runtime-env {runtime_env_file}: not valid YAML ({e})") from e
    if env is not None and not isinstance(env, dict):
        flag = "--runtime-env" if runtime_env_file else "--runtime-env-json"
        raise ValueError(f"{flag}: a runtime_env must be a mapping, got {type(env).__name__}")
    return env or None


def relative_path_warnings(parsed: object) -> list[str]:
    """Notes for path arguments of a parsed job command that are relative local paths."""
    notes = []
    for name in PATH_ARGUMENTS:
        value = getattr(parsed, name, None)
        if (
            isinstance(value, str)
            and value
            and "://" not in value
            and not os.path.isabs(value)
            and not (name in MODEL_ARGUMENTS and is_hub_id(value))  # resolved on each node's HF cache
        ):
            # `sd3 train` keeps the reference scripts' underscore flags.
            flag = "--" + (name if getattr(parsed, "command", None) == "train" else name.replace("_", "-"))
            notes.append(
                f"note: {flag} {value} is a relative path; it resolves on the cluster in the job's "
                "working directory (use an absolute path or an s3:// URL to be sure where it is)"
            )
    return notes


@dataclass(frozen=True)
class Submission:
    """A submitted job: where it went, its id, and what it runs."""

    address: str
    submission_id: str
    entrypoint: str
    # The job server wants the auth token; Ray's CLI sends it only with RAY_AUTH_MODE=token set.
    token_auth: bool = False

    def follow_hint(self) -> str:
        """How to follow, inspect and stop the job with Ray's own CLI."""
        addr = "" if self.address == DEFAULT_ADDRESS else f" --address {shlex.quote(self.address)}"
        sid = shlex.quote(self.submission_id)
        ray = "RAY_AUTH_MODE=token ray" if self.token_auth else "ray"
        return "\n".join(
            [
                f"submitted Ray job {self.submission_id} to {self.address}",
                f"  entrypoint: {self.entrypoint}",
                f"  follow its logs:  {ray} job logs{addr} --follow {sid}",
                f"  its status:       {ray} job status{addr} {sid}",
                f"  stop it:          {ray} job stop{addr} {sid}",
                f"  dashboard:        {self.address}/#/jobs/{self.submission_id}",
            ]
        )


def enable_token_auth_if_available() -> bool:
    """Use the local Ray auth token the way `ray.init` does when it joins a running cluster.

    A Ray cluster started after a token exists (`~/.ray/auth_token`, `RAY_AUTH_TOKEN_PATH` or
    `RAY_AUTH_TOKEN`) requires it; Ray's HTTP clients only send it when `RAY_AUTH_MODE=token` is
    set, so without this step a plain `ray start --head` cluster would refuse the submission.
    Returns True when requests will carry the token.
    """
    import logging

    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    # Ray logs a "token authentication is enabled for this cluster" warning meant for `ray start`.
    setup_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = setup_logger.level
    setup_logger.setLevel(logging.ERROR)
    try:
        return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        setup_logger.setLevel(level)


def connect(address: str | None = None) -> Any:
    """A `JobSubmissionClient` for `address`; ConnectionError says which address was tried."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or default_address()
    enable_token_auth_if_available()
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise ConnectionError(
            f"cannot reach the Ray dashboard at {address} (start a cluster with `ray start --head`, "
            f"or pass --address / set RAY_API_SERVER_ADDRESS): {e}"
        ) from e
    except AuthenticationError as e:
        raise ConnectionError(f"the Ray cluster at {address} refused our credentials: {e}") from e


def submit(
    command: str,
    args: Sequence[str],
    *,
    address: str | None = None,
    submission_id: str | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    client: Any = None,
) -> Submission:
    """Submit `sd3 COMMAND ARGS...` as a Ray job and return its `Submission`."""
    entrypoint = build_entrypoint(command, args)
    client = client or connect(address)
    job_metadata = {"sd3_command": command, **(metadata or {})}
    try:
        sid = client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=dict(runtime_env) if runtime_env else None,
            metadata=job_metadata,
        )
    except RuntimeError as e:
        # The job server's refusals (e.g. a submission id already used) come back as RuntimeError.
        raise ValueError(f"Ray refused the job: {e}") from e
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return Submission(
        address=client.get_address(),
        submission_id=sid,
        entrypoint=entrypoint,
        token_auth=is_token_auth_enabled(),
    )


def follow(submission: Submission, client: Any = None, out: TextIO | None = None) -> str:
    """Stream the job's logs until it ends (Ray's log tail); return its final status name."""
    client = client or connect(submission.address)
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission.submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the stream broke off before the job ended; its status still tells
        print(f"(log stream ended early: {e})", file=sys.stderr)
    # The log stream closes as the job ends; its final status may land a moment later.
    deadline = time.monotonic() + 30
    status = client.get_job_status(submission.submission_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.2)
        status = client.get_job_status(submission.submission_id)
    return str(status.value)
