"""A replica's cold start: seconds from a new Python process to a loaded pipeline.

Every batch-job replica, shard worker and `sd3` command pays this once. Each run is a fresh
subprocess that imports Paddle and loads the embedded default model
(`StableDiffusion3Pipeline.from_pretrained`), timed by stage; the baseline does the same after a
plain `import paddlenlp` first (the whole package, as it was loaded before the encoders imported
only `paddlenlp.transformers`). Prints the median of ``--runs`` per stage and the ratio.

    python benchmarks/cold_start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import json, time
t0 = time.perf_counter()
import paddle
from sd3_core import runtime
runtime.configure()
t1 = time.perf_counter()
{whole}
from jobs.job_config import DEFAULT_MODEL
from pipelines import StableDiffusion3Pipeline
StableDiffusion3Pipeline.from_pretrained(DEFAULT_MODEL)
t2 = time.perf_counter()
print(json.dumps({{"import paddle": t1 - t0, "load pipeline": t2 - t1, "total": t2 - t0}}))
"""


def run(whole_package: bool) -> dict[str, float]:
    probe = _PROBE.format(whole="import paddlenlp" if whole_package else "")
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for name, whole in (("whole paddlenlp (before)", True), ("paddlenlp.transformers only", False)):
        runs = [run(whole) for _ in range(args.runs)]
        results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median of {args.runs} fresh processes, seconds")
    print(f"{'':30} {'import paddle':>14} {'load pipeline':>14} {'total':>8}")
    for name, r in results.items():
        print(f"{name:30} {r['import paddle']:14.2f} {r['load pipeline']:14.2f} {r['total']:8.2f}")
    before, after = results.values()
    print(f"cold start ratio (after / before): {after['total'] / before['total']:.2f}")


if __name__ == "__main__":
    main()
