"""The job record: `{out}/job.json`, what a finished batch job did.

It holds the job's configuration (no credentials), the versions of the software that made the
images, the manifest's counts, start and end times, and whatever the driver adds (parts, this
run's work, what was resolved). Written atomically when the job finishes, after the manifest;
preflight reads an earlier run's (`read_job_json`) so that rerunning a finished job writes nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Mapping
from typing import Any

from sd3_core.storage import StorageOptions, join_url, normalize_url, read_bytes, write_bytes_atomic

JOB_JSON_NAME = "job.json"


def versions() -> dict[str, str | None]:
    """Versions of the software that made the images (from package metadata: no heavy imports)."""
    from importlib import metadata

    def version(*names: str) -> str | None:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return None

    return {
        "sd3-ray": version("sd3-ray"),
        "paddle": version("paddlepaddle", "paddlepaddle-gpu"),
        "ray": version("ray"),
        "pyarrow": version("pyarrow"),
        "python": platform.python_version(),
    }


def _iso(t: _dt.datetime | float | None) -> str | None:
    if t is None:
        return None
    if isinstance(t, int | float):
        t = _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    return t.isoformat()


def write_job_json(
    out: str,
    config: Mapping[str, Any],
    counts: Mapping[str, Any] | None = None,
    *,
    started: _dt.datetime | float | None = None,
    finished: _dt.datetime | float | None = None,
    options: StorageOptions | None = None,
    **more: Any,
) -> str:
    """Write `{out}/job.json` atomically (configuration, versions, counts, start/end); returns its URL.

    Never put credentials in `config` (use `StorageOptions.public_dict()`)."""
    doc = {
        "config": dict(config),
        "versions": versions(),
        "counts": dict(counts or {}),
        "started": _iso(started),
        "finished": _iso(finished),
        **more,
    }
    url = join_url(normalize_url(out), JOB_JSON_NAME)
    data = json.dumps(doc, indent=2, sort_keys=True, default=str).encode()
    write_bytes_atomic(url, data, options)
    return url


def read_job_json(output: str, options: StorageOptions) -> dict | None:
    """The job.json of an earlier finished run, or None (absent or unreadable: `check_output` then
    says what is wrong with the output)."""
    try:
        doc = json.loads(read_bytes(join_url(output, JOB_JSON_NAME), options))
    except Exception:
        return None
    return doc if isinstance(doc, dict) else None
