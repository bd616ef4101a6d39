"""The batch job's Ray Data graph: its stages, each a `Stage` carrying its `map_batches` options
and the columns it reads, and `build_graph`, which chains them on a plan's source.

    from_items(read units)  --read_stage (tasks)-->          work items, one per image
                            --GenerateStage (actor pool)-->  + raw pixels
                            --write_stage (tasks)-->         PNGs + one manifest part per batch
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from actors.pool_placement import PoolPlacementGroups
from jobs import manifest
from jobs.generate_stage import ITEM_SCHEMA, RESULT_SCHEMA, GenerateStage
from jobs.job_config import IMAGE_FORMATS, JobConfig
from jobs.job_preflight import JobPlan
from jobs.prompt_table import ReadUnit, read_unit
from jobs.work_rows import WORK_ROW_SCHEMA, JobDefaults, WorkRow, resolve_rows
from sd3_core.folder_defaults import DEFAULT_T5_LENGTH
from sd3_core.generation_fields import MAX_SEED, call_key
from sd3_core.storage import StorageOptions, write_bytes_atomic

logger = logging.getLogger(__name__)

# Map tasks that fail with one of these (after botocore/s3fs's own retries) are rerun by Ray Data.
TRANSIENT_STORAGE_ERRORS = [
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ConnectionRefusedError",
    "ConnectionResetError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "InternalError",
]

MAX_MAP_RETRIES = 4


def items_of_rows(rows: Sequence[WorkRow], done: frozenset, errors: frozenset) -> list[dict[str, Any]]:
    """Work items (one per image still to do) of validated rows; one "skip" item per row that an
    earlier run finished, so the driver can count it.

    `done`: (key, k) with an ok row; `errors`: (key, k, error) of recorded error rows. A bad row whose
    error rows are already recorded with the same reason is done too (it would fail the same way);
    images that failed while rendering are tried again."""
    out: list[dict[str, Any]] = []
    for row in rows:
        # Every work-row column; `seed` and `k` are set per image below.
        base = {**row.passthrough, **{name: getattr(row, name) for name in WORK_ROW_SCHEMA.names}}
        base["max_sequence_length"] = row.max_sequence_length or DEFAULT_T5_LENGTH
        if row.error is not None:
            todo = [
                r
                for r in manifest.error_rows(row)
                if (row.key, r["k"]) not in done and (row.key, r["k"], row.error) not in errors
            ]
            items = [{**base, "k": r["k"], "seed": _valid_seed(r["seed"]), "status": "error"} for r in todo]
        else:
            items = [
                {**base, "k": k, "seed": row.seed + k, "status": "todo"}
                for k in range(row.num_images)
                if (row.key, k) not in done
            ]
        if not items:
            items = [{**base, "k": -1, "seed": None, "status": "skip"}]
        for item in items:
            item["row_items"] = len(items)
        out.extend(items)
    # Same-shape images next to each other, so the replica's batches are mostly one pipeline call.
    out.sort(
        key=lambda it: (
            it["status"] != "todo",
            tuple(0 if v is None else v for v in call_key(it)),
            it["position"],
            it["k"],
        )
    )
    return out


def _valid_seed(seed: int | None) -> int | None:
    """A bad row's seed as the manifest may hold it (an out-of-range seed is why the row is bad)."""
    return seed if seed is not None and 0 <= seed <= MAX_SEED else None


def _to_items_table(items: list[dict[str, Any]], passthrough: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(items, schema=pa.schema([*ITEM_SCHEMA, *passthrough]))


def _get(value: Any) -> Any:
    """The value behind an ObjectRef (Ray Data passes fn_kwargs through unresolved)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def read_stage(
    batch: pa.Table,
    *,
    defaults: JobDefaults,
    storage: StorageOptions,
    done: frozenset,
    errors: frozenset,
    passthrough: pa.Schema,
) -> pa.Table:
    """Read units (one row group each) -> work items (with the job's pass-through columns)."""
    rows: list[WorkRow] = []
    for unit in batch.to_pylist():
        rows.extend(resolve_rows(read_unit(ReadUnit.from_dict(unit), storage), defaults))
    return _to_items_table(items_of_rows(rows, _get(done), _get(errors)), passthrough)


def inline_stage(batch: pa.Table, *, defaults: JobDefaults, done: frozenset, errors: frozenset) -> pa.Table:
    """Rows of an in-memory prompt table (`--prompt`) -> work items."""
    return _to_items_table(
        items_of_rows(resolve_rows(batch, defaults), _get(done), _get(errors)), pa.schema([])
    )


def encode_image(pixels: bytes, height: int, width: int, image_format: str) -> bytes:
    """Raw HxWx3 uint8 pixels -> PNG/JPEG/WebP bytes (deterministic for PNG)."""
    from PIL import Image

    array = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3)
    buf = io.BytesIO()
    fmt = IMAGE_FORMATS[image_format]
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


# What the write stage hands the driver per item: progress, and the --benchmark figures.
SUMMARY_COLUMNS = ["key", "k", "status", "row_items", "seconds", "replica", "_benchmark"]


def write_stage(batch: pa.Table, *, output: str, image_format: str, storage: StorageOptions) -> pa.Table:
    """Encode and store the batch's images, then its manifest part; returns small summaries."""
    items = batch.to_pylist()
    passthrough = pa.schema([f for f in batch.schema if f.name not in RESULT_SCHEMA.names])
    columns = [*manifest.MANIFEST_COLUMNS, *passthrough.names]
    records = []
    now = dt.datetime.now(dt.timezone.utc)
    for it in items:
        if it["status"] == "skip":
            continue
        uri = None
        if it["status"] == "ok":
            uri = manifest.image_url(output, it["key"], it["k"], image_format)
            data = encode_image(it["image"], it["height"], it["width"], image_format)
            write_bytes_atomic(uri, data, storage)
        record = {c: it.get(c) for c in columns if c in it}
        record.update(image=uri, finished_at=now)
        records.append(record)
    if records:
        # A content-derived part id: if Ray retries this task, the part is overwritten, not doubled.
        ids = sorted(f"{r['key']}\0{r['k']}" for r in records)
        part_id = "p-" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:24]
        manifest.write_part(output, records, storage, part_id=part_id, passthrough=passthrough)
    return batch.select(SUMMARY_COLUMNS)


def configure_ray_data() -> None:
    import warnings

    import ray.data

    # Ray Data warns when a job has fewer batches than the write stage's task limit (small jobs).
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    # Deprecated without a replacement yet; ray.data.llm places its multi-device engines with it too.
    warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job shows one bar of its own (rows/s, ETA, failures)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled" notice
    ctx.print_on_execution_start = False
    ctx.retried_map_errors = list(TRANSIENT_STORAGE_ERRORS)
    ctx.max_map_retries = MAX_MAP_RETRIES


@dataclass(frozen=True)
class Stage:
    """One `map_batches` step of the graph: what it runs, the columns it reads and its options."""

    name: str
    fn: Any
    input_columns: tuple[str, ...]
    options: dict[str, Any]

    def apply(self, ds: Any) -> Any:
        return ds.map_batches(self.fn, **self.options)


def graph_stages(
    plan: JobPlan, config: JobConfig, done: Any, errors: Any, placements: PoolPlacementGroups | None = None
) -> list[Stage]:
    """The graph's stages in order (no Ray call: inspectable alone). ``done``/``errors``: the
    plan's known outcomes, or ObjectRefs of them (Ray Data passes fn_kwargs through unresolved).
    ``placements``: the driver's placement groups for a cfg x mp pool (one per pool actor)."""
    import ray.data

    pool = dict(compute=ray.data.ActorPoolStrategy(size=config.replicas), **plan.spec.pool_actor_resources())
    if plan.spec.world_size > 1:
        if placements is None:
            raise ValueError("a cfg x mp pool's actors need the driver's PoolPlacementGroups (placements=)")
        pool["ray_remote_args_fn"] = placements  # each pool actor in its own group's last bundle

    outcomes = {"done": done, "errors": errors}
    if plan.inline is None:
        source = Stage(
            "read", read_stage, tuple(ReadUnit.__dataclass_fields__),
            dict(batch_size=1, batch_format="pyarrow", num_cpus=0,  # I/O bound; never waits for replica CPUs
                 fn_kwargs={"defaults": plan.defaults, "storage": config.storage,
                            "passthrough": plan.passthrough, **outcomes},
                 compute=ray.data.TaskPoolStrategy(size=min(2, len(plan.units)))),
        )  # fmt: skip
    else:
        source = Stage(
            "read", inline_stage, tuple(plan.inline.column_names),
            dict(batch_size=None, batch_format="pyarrow", num_cpus=0,
                 fn_kwargs={"defaults": plan.defaults, **outcomes}),
        )  # fmt: skip
    generate = Stage(
        "generate", GenerateStage, tuple(ITEM_SCHEMA.names),
        # A fixed pool; Ray restarts a dead actor and retries its batch (max_restarts=-1,
        # max_task_retries=-1 are Ray Data's defaults for actor pools).
        dict(fn_constructor_kwargs={"spec": plan.spec}, batch_size=config.batch_size, batch_format="pyarrow",
             **pool),
    )  # fmt: skip
    write = Stage(
        "write", write_stage, tuple(RESULT_SCHEMA.names),
        # Encoding + upload: light, and it must never wait for CPUs the replicas hold.
        dict(batch_size=None, batch_format="pyarrow", num_cpus=0,
             fn_kwargs={"output": plan.output, "image_format": config.image_format, "storage": config.storage},
             compute=ray.data.TaskPoolStrategy(size=max(2, 2 * config.replicas))),
    )  # fmt: skip
    return [source, generate, write]


def build_graph(plan: JobPlan, config: JobConfig, placements: PoolPlacementGroups | None = None) -> Any:
    """The job's Dataset: the plan's source through every stage; iterating it runs the job and
    yields each written batch's summary (`SUMMARY_COLUMNS`). ``placements``: see `graph_stages`
    (the caller removes them when the job ends)."""
    import ray
    import ray.data

    configure_ray_data()
    known = ray.put(plan.known.done), ray.put(plan.known.errors)
    read, generate, write = graph_stages(plan, config, *known, placements)
    if plan.inline is None:
        ds = ray.data.from_items([u.as_dict() for u in plan.units])
    else:
        ds = ray.data.from_arrow(plan.inline)
    # Blocks of one batch each: a replica task then renders one batch and hands it to the write stage
    # at once (encoding/upload overlap the next batch; a crash loses one batch, not a unit). Ray Data
    # runs this split as 1-CPU tasks: `check_cluster` keeps a CPU free for them.
    ds = read.apply(ds).repartition(target_num_rows_per_block=config.batch_size)
    return write.apply(generate.apply(ds))
