"""The batch generation job: a Parquet prompt table in, images + a manifest out, on Ray Data.

`run_job` is the driver: preflight (`jobs/job_preflight.py`: every check before any work) ->
graph (`jobs/job_graph.py`: Ray Data stages, nothing here schedules, queues or retries by itself)
-> iterate the small summaries (progress bar) -> finalize manifest, job.json, contact sheet.

Exactly once: an image is written (atomically) before the manifest part that names it, and a rerun
skips every (key, k) with an "ok" row in some part, so a rerun after any crash redoes only what was in
flight. A killed model actor is restarted by Ray and its batch retried (Ray Data's actor pools use
`max_restarts=-1`, `max_task_retries=-1`); transient storage errors are retried by botocore inside
s3fs, and a map task that still fails with one is retried by Ray Data (`retried_map_errors`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict

import pyarrow as pa

from actors.pool_placement import PoolPlacementGroups
from jobs import manifest
from jobs.benchmark_report import BenchmarkTally
from jobs.contact_sheet import write_contact_sheet
from jobs.job_config import JobConfig, JobFailed, JobResult
from jobs.job_graph import build_graph
from jobs.job_preflight import check_cluster, lora_record, plan_job
from jobs.job_record import write_job_json
from jobs.ray_session import connect_ray
from sd3_core.storage import StorageOptions, normalize_url, remove_abandoned_temporaries

logger = logging.getLogger(__name__)


class _Progress:
    """Rows done (a row is done when all its images of this run are), rows/s, ETA, failures."""

    def __init__(self, total_rows: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_rows,
            unit="row",
            desc="sd3 generate",
            disable=not enabled,
            file=sys.stderr,
            smoothing=0.1,
        )
        self.pending: dict[str, int] = {}
        self.rows_failed: set[str] = set()
        self.images = 0
        self.skipped_rows = 0

    def update(self, summary: pa.Table) -> None:
        finished = 0
        for key, status, row_items in zip(
            *(summary.column(c).to_pylist() for c in ("key", "status", "row_items")), strict=True
        ):
            if status == "skip":
                self.skipped_rows += 1
                finished += 1
                continue
            self.images += 1
            if status != "ok":
                self.rows_failed.add(key)
            left = self.pending.get(key, row_items) - 1
            if left:
                self.pending[key] = left
            else:
                self.pending.pop(key, None)
                finished += 1
        self.bar.update(finished)
        self.bar.set_postfix(images=self.images, failed_rows=len(self.rows_failed), refresh=False)

    def close(self) -> None:
        self.bar.close()


def run_job(config: JobConfig) -> JobResult:
    """Run (or resume) a batch job: preflight, graph, iterate, finalize. JobError for job-level
    problems, found before any work; JobFailed when the job stops part-way (what is done is kept)."""
    import ray

    started = time.time()
    plan = plan_job(config)
    storage, output = config.storage, plan.output
    started_ray = connect_ray(config.ray_address)
    try:
        check_cluster(plan.spec, config.replicas)
        # A cfg x mp pool's placement groups: made as Ray Data starts the pool, removed here.
        with PoolPlacementGroups(plan.spec, config.replicas) as placements:
            ds = build_graph(plan, config, placements)
            progress = _Progress(plan.total_rows, config.progress)
            tally = BenchmarkTally() if config.benchmark else None
            graph_started = time.perf_counter()
            try:
                for summary in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    progress.update(summary)
                    if tally is not None:
                        tally.update(summary)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                # Ray's text carries the remote traceback; its last line is the original exception.
                lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()] or [type(cause).__name__]
                raise JobFailed(
                    f"the job stopped after {progress.images} image(s): {type(cause).__name__}: {lines[-1]}\n"
                    f"Finished images are kept; rerun the same command to resume."
                ) from e
            finally:
                progress.close()
    finally:
        if started_ray:
            ray.shutdown()

    swept = remove_abandoned_temporaries(manifest.images_url(output), started, storage)
    if swept:
        logger.info("removed %d temporary file(s) an interrupted earlier run left in %s",
                    swept, manifest.images_url(output))  # fmt: skip
    # Merge the parts, job.json, contact sheet (skipped when this run had nothing to do).
    n_parts = len(manifest.part_urls(output, storage))
    if progress.images == 0 and plan.previous is not None and plan.previous.get("parts") == n_parts:
        counts = plan.previous.get("counts", {})
        return JobResult(output, manifest.manifest_url(output), counts, 0, progress.skipped_rows,
                         time.time() - started, finalized=False)  # fmt: skip
    bench = None if tally is None else tally.report(config.replicas, time.perf_counter() - graph_started)
    counts = manifest.finalize(output, storage)
    _write_contact_sheet(output, storage, config.contact_sheet_images)
    write_job_json(
        output,
        config.public_dict(),
        counts,
        started=started,
        finished=time.time(),
        options=storage,
        parts=n_parts,
        this_run={"images": progress.images, "skipped_rows": progress.skipped_rows},
        # What the job actually used: absolute URLs and the defaults with the model's size filled in.
        resolved={
            "prompts": normalize_url(config.prompts) if config.prompts is not None else None,
            "output": output,
            "model": plan.model,
            "lora": lora_record(plan.lora, config.lora_scale),
            "defaults": asdict(plan.defaults),
            "replica": {
                **asdict(plan.spec),
                "storage": storage.public_dict(),
                **plan.spec.pool_actor_resources(),
            },
        },
        **({} if bench is None else {"benchmark": bench}),
    )
    return JobResult(output, counts.get("manifest"), counts, progress.images, progress.skipped_rows,
                     time.time() - started, finalized=True, benchmark=bench)  # fmt: skip


def _write_contact_sheet(output: str, options: StorageOptions, n: int) -> str | None:
    """`{out}/contact_sheet.png` of the first `n` ok images with their prompts (None when there are none)."""
    if n < 1:
        return None
    merged = manifest.read_manifest(output, options)
    return write_contact_sheet(output, manifest.iter_ok_images(merged), options, limit=n)
