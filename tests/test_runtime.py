"""Process settings: applied by `runtime.configure()`, never by importing a module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sd3_core", "pipelines", "actors", "jobs")


def _run(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_DEBUG_CPU_TYPE")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _is_amd() -> bool:
    return "AuthenticAMD" in Path("/proc/cpuinfo").read_text(errors="replace")


def test_importing_every_module_changes_no_process_setting():
    # The third-party libraries our modules import are imported first: what they change is theirs.
    code = f"""
import importlib, json, os, pkgutil, sys, warnings
import paddle, pyarrow, fsspec, ray, ray.data, PIL.Image, huggingface_hub  # noqa
env, filters = dict(os.environ), list(warnings.filters)
names = []
for package in {PACKAGES!r}:
    names.append(package)
    module = importlib.import_module(package)
    names += [m.name for m in pkgutil.walk_packages(module.__path__, package + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({{
    "modules": len(names),
    "env": {{k: [env.get(k), os.environ.get(k)] for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)}},
    "filters": [repr(f) for f in warnings.filters if f not in filters],
}}))
"""
    seen = _run(code)
    assert seen["modules"] > 60
    assert seen["env"] == {}
    assert seen["filters"] == []


def test_configure_uses_every_core_when_the_user_chose_no_thread_count():
    # Paddle's import fills OMP_NUM_THREADS=1 in; that is not the user's choice.
    code = """
import json, os
import paddle
from sd3_core import runtime
n = runtime.configure()
print(json.dumps({"n": n, "omp": os.environ["OMP_NUM_THREADS"], "mkl": os.environ.get("MKL_DEBUG_CPU_TYPE"),
                  "again": runtime.configure(), "threads": runtime.cpu_threads()}))
"""
    seen = _run(code)
    cores = len(os.sched_getaffinity(0))
    assert seen == {
        "n": cores,
        "omp": str(cores),
        "mkl": "5" if _is_amd() else None,
        "again": cores,
        "threads": cores,
    }


def test_configure_keeps_the_users_settings_and_an_explicit_count_wins():
    code = """
import json, os
import paddle
from sd3_core import runtime
first = runtime.configure()
explicit = runtime.configure(threads=2)
print(json.dumps({"first": first, "explicit": explicit, "kept": runtime.configure(),
                  "omp": os.environ["OMP_NUM_THREADS"], "mkl": os.environ.get("MKL_DEBUG_CPU_TYPE")}))
"""
    seen = _run(code, OMP_NUM_THREADS="3", MKL_DEBUG_CPU_TYPE="4")
    assert seen == {"first": 3, "explicit": 2, "kept": 2, "omp": "2", "mkl": "4"}


def test_configure_before_paddle_is_imported_reads_the_thread_count_set_in_the_process():
    code = """
import json, os
os.environ["OMP_NUM_THREADS"] = "1"
from sd3_core import runtime
n = runtime.configure()
import paddle
print(json.dumps({"n": n, "omp": os.environ["OMP_NUM_THREADS"]}))
"""
    assert _run(code) == {"n": 1, "omp": "1"}
