"""The batch job's generate stage: the callable class given to `Dataset.map_batches`.

`GenerateStage` builds its replica once (in `__init__`, i.e. once per actor and again when Ray
restarts a killed actor), groups the work items of a batch by (height, width, steps, guidance,
max_sequence_length), renders each group with one pipeline call and per-image seeds, and returns
raw uint8 pixels plus metadata. Encoding and upload happen in the next (CPU task) stage so they
overlap the next batch's compute. The schemas of the items it takes and gives are declared here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from actors.replica import LocalReplica, RenderRequest, Replica, ReplicaSpec
from jobs.work_rows import WORK_ROW_SCHEMA
from sd3_core.generation_fields import call_key, image_fields, rendered_value

logger = logging.getLogger(__name__)


def _item_schema() -> pa.Schema:
    """A work row (jobs.work_rows.WORK_ROW_SCHEMA) expanded to one image: plus `k`, a `status`
    ("todo": render; "error": a bad row, `error` says why; "skip": done by an earlier run) and
    `row_items` (items emitted for this row in this run; progress counts rows). `seed` is the seed
    of this image (row seed + k, modulo 2**63)."""
    fields = list(WORK_ROW_SCHEMA)
    fields.insert(fields.index(WORK_ROW_SCHEMA.field("key")) + 1, pa.field("k", pa.int64()))
    fields.insert(fields.index(WORK_ROW_SCHEMA.field("error")), pa.field("status", pa.string()))
    fields.append(pa.field("row_items", pa.int64()))
    return pa.schema(fields)


# Columns a work item carries through the graph (read stage -> GenerateStage -> write stage).
ITEM_SCHEMA = _item_schema()
# With `ReplicaSpec.benchmark`: an image's share of its pipeline call's stage seconds and denoising
# steps (summing over images gives the totals; null for a replica group, whose stages run on its
# ranks), and the peak RSS of the process that rendered it.
BENCHMARK_TYPE = pa.struct(
    [
        ("text_encoding", pa.float64()),
        ("denoising", pa.float64()),
        ("denoising_steps", pa.float64()),
        ("vae_decode", pa.float64()),
        ("peak_rss_bytes", pa.int64()),
    ]
)
# What GenerateStage adds: pixels (H*W*3 uint8, row-major), render seconds per image, who rendered it.
RESULT_SCHEMA = pa.schema(
    [
        *ITEM_SCHEMA,
        ("image", pa.binary()),
        ("seconds", pa.float64()),
        ("replica", pa.string()),
        ("model", pa.string()),  # model identity: URI + hash of its configs
        ("lora", pa.string()),  # adapter identity: pinned reference + sha256 (null: no adapter)
        ("lora_scale", pa.float64()),
        ("_benchmark", BENCHMARK_TYPE),  # null unless ReplicaSpec.benchmark
    ]
)


def make_replica(spec: ReplicaSpec) -> Replica:
    """The replica for `spec`: in this process for 1 x 1, else a group of cfg x mp actors."""
    if spec.world_size == 1:
        return LocalReplica(spec)
    # Imported here: it loads Paddle and the pipelines, which the job's driver never needs.
    from actors.parallel_pipeline import GroupReplica

    return GroupReplica(spec)


def _rows_of(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


class GenerateStage:
    """`map_batches` callable: work items in, the same items plus pixels out (one row per image).

    Rows with status "error" or "skip" pass through untouched (no model time). A pipeline call that
    fails is retried image by image so one bad row cannot fail its neighbours; an image that still
    fails becomes an error row naming the exception. A crash of the process itself is Ray's to
    handle: the actor is restarted (this `__init__` runs again) and the batch is retried."""

    def __init__(self, spec: ReplicaSpec) -> None:
        started = time.perf_counter()
        self.replica = make_replica(spec)
        self.lora_scale = None if spec.lora is None else spec.lora_scale
        self.benchmark = spec.benchmark
        self.warmed_up = not spec.benchmark
        logger.info(
            "replica %s loaded %s in %.1fs", self.replica.name, spec.model, time.perf_counter() - started
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _rows_of(batch)
        out: list[dict[str, Any]] = []
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            row.update(image=None, seconds=None, replica=None, model=self.replica.model)
            row.update(lora=self.replica.lora, lora_scale=self.lora_scale, _benchmark=None)
            if row["status"] == "todo":
                groups.setdefault(call_key(row), []).append(row)
            else:
                out.append(row)
        for members in groups.values():
            out.extend(self._render_group(members))
        # The items' pass-through columns (beyond ITEM_SCHEMA) ride along unchanged.
        passthrough = [f for f in batch.schema if f.name not in ITEM_SCHEMA.names]
        return pa.Table.from_pylist(out, schema=pa.schema([*RESULT_SCHEMA, *passthrough]))

    def _render_group(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            return self._render(rows)
        except Exception as e:  # isolate the failing image(s); see the class docstring
            if len(rows) == 1:
                row = rows[0]
                row.update(status="error", error=f"generation failed: {type(e).__name__}: {e}")
                row["replica"] = self.replica.name
                return [row]
            logger.warning("a batch of %d failed (%s); rendering its images one by one", len(rows), e)
            return [r for row in rows for r in self._render_group([row])]

    def _render(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        request = RenderRequest(
            **{
                f.name: rows[0][f.name] if f.shared else [rendered_value(r, f) for r in rows]
                for f in image_fields()
            }
        )
        if not self.warmed_up:  # the first call pays one-off costs (allocations, kernel choice)
            self.replica.render(request)
            self.warmed_up = True
        timer = getattr(getattr(self.replica, "pipe", None), "stage_timer", None)
        if timer is not None:
            timer.reset()
        started = time.perf_counter()
        images = self.replica.render(request)
        seconds = (time.perf_counter() - started) / len(rows)
        if len(images) != len(rows):
            raise RuntimeError(f"replica returned {len(images)} images for {len(rows)} requests")
        bench = self._benchmark_share(timer, len(rows)) if self.benchmark else None
        for row, image in zip(rows, images, strict=True):
            row.update(
                status="ok",
                image=np.ascontiguousarray(image, dtype=np.uint8).tobytes(),
                seconds=seconds,
                replica=self.replica.name,
                _benchmark=bench,
            )
        return rows

    @staticmethod
    def _benchmark_share(timer: Any, n: int) -> dict[str, Any]:
        """One image's share of the call's stage figures (see BENCHMARK_TYPE)."""
        import resource

        share: dict[str, Any] = dict.fromkeys(BENCHMARK_TYPE.names[:-1])
        if timer is not None:
            share.update({name: s / n for name, s in timer.seconds.items()}, denoising_steps=timer.steps / n)
        share["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return share
