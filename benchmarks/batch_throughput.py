"""Images/s of the batch job (Ray Data, one replica) against a bare in-process loop over the same pipeline.

The config is chosen so compute dominates (default: the embedded model at 192x192, 12 steps, batch 4,
2 threads per replica = the whole 2-core test machine). Both sides render the same 2N prompts with the
same seeds and batch size; the job also reads the table, encodes PNGs, writes them and one manifest
part per batch, overlapped with compute.

Both rates are measured the same way, over the SECOND half of a 2N-image run, so model loading, Ray's
start-up and the slow first iterations of a fresh Paddle process count on neither side:

- bare loop: the pipeline in this process; time from the end of image N to the end of image 2N;
- batch job: `run_job` on 2N rows; time from the N-th to the 2N-th image's `finished_at` in the
  manifest (when its PNG and part were stored). Its end-to-end rate (Ray start, model load and
  finalize included) and the replica's busy share (sum of per-image render seconds over its span)
  are printed too.

The ratio job/bare is the figure of merit (goal >= 0.95). With `--inference-optimize` the same run
also renders the table with the job's `--inference-optimize` (float32, and bfloat16 where the CPU has
it) and prints those rates against the eager job's. On a shared machine run it twice.

    python benchmarks/batch_throughput.py [--images 48] [--size 192] [--steps 12] [--batch-size 4] [--threads 2]
                                          [--inference-optimize]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sd3_core import runtime  # noqa: E402


def _second_half_rate(ends: list[float], counts: list[int]) -> float:
    """Images/s over the second half: from the moment half the images were done to the last one."""
    total, done = sum(counts), 0
    for t, c in zip(ends, counts, strict=True):
        done += c
        if done >= total / 2:
            return (total - done) / (ends[-1] - t)
    raise ValueError("no images")


def bare_loop(args: argparse.Namespace, prompts: list[str], seeds: list[int]) -> float:

    from jobs.job_config import DEFAULT_MODEL
    from pipelines import StableDiffusion3Pipeline

    runtime.configure(threads=args.threads)
    pipe = StableDiffusion3Pipeline.from_pretrained(args.model or DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    ends, counts = [], []
    for i in range(0, len(prompts), args.batch_size):
        hi = min(i + args.batch_size, len(prompts))
        pipe(
            prompt=prompts[i:hi],
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            seed=seeds[i:hi],
            output_type="np",
        )
        ends.append(time.perf_counter())
        counts.append(hi - i)
        print(f"  bare: {hi}/{len(prompts)} images", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    return _second_half_rate(ends, counts)


def batch_job(
    args: argparse.Namespace, table: str, out: str, inference_optimize: bool = False, dtype: str = "float32"
) -> tuple[float, float, float]:
    """(second-half images/s, end-to-end images/s, replica busy share) of one run of the job."""
    import pyarrow.compute as pc

    from jobs import manifest
    from jobs.batch_generate import run_job
    from jobs.job_config import DEFAULT_MODEL, JobConfig
    from jobs.work_rows import JobDefaults

    config = JobConfig(
        output=out,
        prompts=table,
        model=args.model or DEFAULT_MODEL,
        replicas=1,
        cpus_per_replica=float(args.threads),
        batch_size=args.batch_size,
        inference_optimize=inference_optimize,
        dtype=dtype,
        defaults=JobDefaults(
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
        ),
        progress=True,
    )
    started = time.perf_counter()
    result = run_job(config)
    wall = time.perf_counter() - started
    merged = manifest.read_manifest(out)
    finished = pc.cast(merged.column("finished_at"), "int64").to_pylist()
    seconds = merged.column("seconds").to_pylist()
    per_time: dict[int, int] = {}  # one finish time per stored batch (its part)
    for t in finished:
        per_time[t] = per_time.get(t, 0) + 1
    times = sorted(per_time)
    rate = _second_half_rate([t / 1e6 for t in times], [per_time[t] for t in times])
    first_batch = sum(s for s, t in zip(seconds, finished, strict=True) if t == times[0])
    busy = sum(seconds) / ((times[-1] - times[0]) / 1e6 + first_batch)
    return rate, result.counts["images_ok"] / wall, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48, help="N: each side renders 2N, timing the last N")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=7.0)
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of the bare loop = CPUs of the replica"
    )
    parser.add_argument("--model", default=None, help="model folder (default: the embedded tiny model)")
    parser.add_argument("--inference-optimize", action="store_true",
                        help="also time the job with --inference-optimize (float32; bfloat16 where supported)")  # fmt: skip
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.work_rows import row_seed

    n = 2 * args.images
    ids = [f"img{i:04d}" for i in range(n)]
    prompts = [f"a photograph of object number {i} on a table" for i in range(n)]
    seeds = [row_seed(0, i) for i in ids]  # what the job derives for (job seed 0, id)
    print(f"config: {n} images per side (last {args.images} timed), {args.size}x{args.size}, {args.steps} "
          f"steps, batch {args.batch_size}, {args.threads} threads, guidance {args.guidance_scale}", flush=True)  # fmt: skip
    load_before = os.getloadavg()[0]
    bare = bare_loop(args, prompts, seeds)
    with tempfile.TemporaryDirectory(prefix="sd3-bench-") as tmp:
        table = os.path.join(tmp, "prompts.parquet")
        pq.write_table(pa.table({"id": ids, "prompt": prompts}), table)
        job, end_to_end, busy = batch_job(args, table, os.path.join(tmp, "out"))
        optimised = {}
        if args.inference_optimize:
            from sd3_core.inference_program import cpu_has_native_bfloat16

            for dtype in ["float32"] + (["bfloat16"] if cpu_has_native_bfloat16() else []):
                optimised[dtype] = batch_job(args, table, os.path.join(tmp, f"out-{dtype}"), True, dtype)
    print(f"load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)")
    print(f"bare loop : {bare:7.3f} images/s (second half of {n})")
    print(f"batch job : {job:7.3f} images/s (second half of {n}); end-to-end {end_to_end:.3f} images/s "
          f"with Ray start, model load and finalize")  # fmt: skip
    print(f"replica busy: {busy:.1%} of its span from first to last batch")
    print(f"ratio job/bare: {job / bare:.3f}   (goal >= 0.95)")
    for dtype, (rate, e2e, share) in optimised.items():
        print(f"batch job --inference-optimize --dtype {dtype}: {rate:7.3f} images/s (second half); "
              f"end-to-end {e2e:.3f}; busy {share:.1%}; x{rate / job:.2f} the eager job")  # fmt: skip


if __name__ == "__main__":
    main()
