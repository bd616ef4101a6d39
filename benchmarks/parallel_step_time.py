"""Seconds per denoising step on replica groups of (cfg, mp) = (1,1), (2,1), (1,2), (2,2), in one run.

The "small" config of ``benchmarks/step_time.py`` (8 layers, 6 heads x 64, a 512x512 image: 1024
image tokens plus 333 text tokens, float32), with one thread per rank, on a local Ray with
CPU-kind bundles (gloo collectives). The transformer's pooled projection takes the tiny CLIP
encoders' 80 features instead of 2048 (one small matmul per step) and T5 is dropped (its 256
tokens are zeros, as in the pipeline without T5), so the pipeline folder needs no large encoder.

A step is one transformer forward on each rank (batch 2 with CFG on one rank, batch 1 per half
with the CFG split), the CFG exchange and the scheduler step; it is timed inside the ranks
(the slowest rank counts). Also printed: the collectives per step, from the instrumentation.
A 4-rank shape needs 4 cores; on a smaller machine the ranks share cores and the figure says
more about the machine than about the split.

    python benchmarks/parallel_step_time.py [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(1, 1), (2, 1), (1, 2), (2, 2)]


def build_folder(root: str) -> str:
    """A pipeline folder: the tiny fixture encoders, VAE and scheduler with a small transformer."""
    import paddle

    from benchmarks.step_time import SMALL
    from sd3_core.transformer import SD3Transformer2DModel

    folder = os.path.join(root, "small")
    fixture = os.path.join(ROOT, "tests", "fixtures", "sd3-tiny")
    dropped = ("transformer", "text_encoder_3", "tokenizer_3")
    shutil.copytree(fixture, folder, ignore=shutil.ignore_patterns(*dropped))
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    index.update({"text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f)
    paddle.seed(0)
    SD3Transformer2DModel(**{**SMALL, "pooled_projection_dim": 80}).save_pretrained(
        os.path.join(folder, "transformer")
    )
    return folder


def measure(folder: str, cfg: int, mp: int, steps: int, threads: int) -> dict:
    from actors.replica import ReplicaSpec
    from actors.replica_group import ReplicaGroup

    group = ReplicaGroup(ReplicaSpec(model=folder, device="cpu", cfg=cfg, mp=mp, cpus=threads))
    try:
        args = dict(prompt="a lighthouse at dusk", height=512, width=512, guidance_scale=7.0, seed=0,
                    max_sequence_length=256, output_type="latent")  # fmt: skip
        group.generate({**args, "num_inference_steps": 1})  # warm-up: first-call allocations
        group.generate({**args, "num_inference_steps": steps})
        stats = group.last_stats
    finally:
        group.shutdown()
    calls = stats[0]["denoise_collectives"]["calls"]
    nbytes = stats[0]["denoise_collectives"]["bytes"]
    return {
        "seconds_per_step": max(s["denoise_seconds"] / s["steps"] for s in stats),
        "collectives_per_step": {k: v / steps for k, v in calls.items()},
        "mbytes_per_step": sum(nbytes.values()) / steps / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="timed denoising steps per shape")
    parser.add_argument("--threads", type=int, default=1, help="threads (and Ray CPUs) per rank")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before paddle loads, here and in the ranks
    sys.path.insert(0, ROOT)

    from sd3_core import runtime

    runtime.configure()

    import ray

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    most = max(c * m for c, m in SHAPES) * args.threads
    ray.init(address="local", num_cpus=most, include_dashboard=False, logging_level=logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(tmp)
        try:
            for cfg, mp in SHAPES:
                results[(cfg, mp)] = measure(folder, cfg, mp, args.steps, args.threads)
        finally:
            ray.shutdown()
    base = results[(1, 1)]["seconds_per_step"]
    print(
        f"small config, 512x512, float32, {args.threads} thread(s) per rank, {args.steps} steps, {cores} cores"
    )
    print("cfg  mp  ranks  s/step  speedup  collectives/step  MB/step")
    for (cfg, mp), r in results.items():
        note = "  (ranks > cores: oversubscribed)" if cfg * mp * args.threads > cores else ""
        print(
            f"{cfg:3}  {mp:2}  {cfg * mp:5}  {r['seconds_per_step']:6.2f}  {base / r['seconds_per_step']:6.2f}x"
            f"  {r['collectives_per_step']}  {r['mbytes_per_step']:.2f}{note}"
        )


if __name__ == "__main__":
    main()
