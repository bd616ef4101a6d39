"""The batch generation job: a Parquet prompt table in, images + a manifest out, on Ray Data.

Graph (all Ray's machinery; nothing here schedules, queues or retries by itself):

    from_items(read units)  --map_batches(_read_stage, tasks)-->      work items, one per image
                            --map_batches(GenerateStage, actor pool)--> + raw pixels
                            --map_batches(_write_stage, tasks)-->     PNGs + one manifest part per batch
    driver: iterate the small summaries (progress bar), then finalize manifest, job.json, contact sheet.

Exactly once: an image is written (atomically) before the manifest part that names it, and a rerun
skips every (key, k) with an "ok" row in some part, so a rerun after any crash redoes only what was in
flight. A killed model actor is restarted by Ray and its batch retried (Ray Data's actor pools use
`max_restarts=-1`, `max_task_retries=-1`); transient storage errors are retried by botocore inside
s3fs, and a map task that still fails with one is retried by Ray Data (`retried_map_errors`).
"""

from __future__ import annotations

import sd3_core.runtime  # noqa: F401  (thread/MKL settings must precede paddle's import)

import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from actors.replica import DEVICES, DTYPES, ReplicaSpec
from jobs import manifest
from jobs.benchmark_report import BenchmarkTally
from jobs.generate_stage import GROUP_COLUMNS, ITEM_SCHEMA, RESULT_SCHEMA, GenerateStage
from jobs.prompt_table import (
    JOB_LIMITS,
    KNOWN_COLUMNS,
    WORK_ROW_SCHEMA,
    JobDefaults,
    PromptTableError,
    ReadUnit,
    WorkRow,
    check_unique_ids,
    plan_table,
    prompts_table,
    read_unit,
    resolve_rows,
)
from sd3_core.folder_defaults import DEFAULT_T5_LENGTH, folder_guidance_scale, folder_max_sequence_length
from sd3_core.generation_fields import GENERATION_FIELDS, MAX_SEED
from sd3_core.lora_registry import LoRARefError, PinnedLoRA, fetch_lora, pin_lora
from sd3_core.storage import StorageOptions, get_fs, join_url, normalize_url, read_bytes, write_bytes_atomic

logger = logging.getLogger(__name__)

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
CONTACT_SHEET_IMAGES = 16
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


class JobError(ValueError):
    """A job-level problem found before any work (bad input, output, model or configuration)."""


class JobFailed(RuntimeError):
    """The job stopped part-way (e.g. the model cannot load on a replica); what is done is kept."""


@dataclass
class JobConfig:
    """Everything a batch job needs. `prompts` (a table URL) or `prompt_list` (in-memory prompts)."""

    output: str
    prompts: str | None = None
    prompt_list: Sequence[str] | None = None
    model: str = DEFAULT_MODEL
    replicas: int = 1
    device: str = "cpu"
    cpus_per_replica: float = 1.0
    mp: int = 1  # tensor-parallel shards per replica (issue 4)
    cfg_parallel: bool = False  # the two CFG halves on two devices: a replica of 2 x mp ranks
    lora: str | None = None  # a LoRA adapter for every row: file, folder, URL or REGISTRY[:VERSION]
    lora_scale: float = 1.0
    batch_size: int = 4
    dtype: str = "float32"
    inference_optimize: bool = False  # replicas run the transformer as static programs
    benchmark: bool = False  # warm-up, then stage timings, images/s and peak RSS (jobs.benchmark_report)
    defaults: JobDefaults = field(default_factory=JobDefaults)
    image_format: str = "png"
    ray_address: str | None = None
    storage: StorageOptions = field(default_factory=StorageOptions.from_env)
    contact_sheet_images: int = CONTACT_SHEET_IMAGES
    progress: bool = True

    def public_dict(self) -> dict[str, Any]:
        """The configuration for job.json (no credentials)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("storage", "defaults", "prompt_list")}
        d["prompt_list"] = list(self.prompt_list) if self.prompt_list is not None else None
        d["defaults"] = asdict(self.defaults)
        d["storage"] = self.storage.public_dict()
        return d


@dataclass
class JobResult:
    """What a finished run did: counts of the merged manifest and of this run's work."""

    output: str
    manifest: str | None
    counts: dict[str, Any]
    processed_images: int  # images rendered (or error rows recorded) by this run
    skipped_rows: int  # rows already done by an earlier run
    seconds: float
    finalized: bool  # False when there was nothing to do and nothing was written
    benchmark: dict[str, Any] | None = None  # with JobConfig.benchmark: BenchmarkTally.report

    @property
    def rows_failed(self) -> int:
        return int(self.counts.get("rows_failed", 0))


# --------------------------------------------------------------------------- validation


def _check_config(config: JobConfig) -> None:
    if (config.prompts is None) == (config.prompt_list is None):
        raise JobError("give exactly one of --prompts URL or --prompt TEXT")
    if config.prompt_list is not None and not config.prompt_list:
        raise JobError("--prompt: no prompts given")
    if not isinstance(config.replicas, int) or config.replicas < 1:
        raise JobError(f"--replicas {config.replicas!r} must be an integer >= 1")
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise JobError(f"--batch-size {config.batch_size!r} must be an integer >= 1")
    if not isinstance(config.mp, int) or config.mp < 1:
        raise JobError(f"--mp {config.mp!r} must be an integer >= 1")
    if config.device not in DEVICES:
        raise JobError(f"--device {config.device!r} must be one of {', '.join(DEVICES)}")
    if config.dtype not in DTYPES:
        raise JobError(f"--dtype {config.dtype!r} must be one of {', '.join(DTYPES)}")
    if config.inference_optimize and config.device == "npu":
        raise JobError("--inference-optimize runs on CPU and GPU; --device npu runs eagerly")
    if config.inference_optimize and config.mp > 1:
        raise JobError(f"--inference-optimize runs whole transformers; --mp {config.mp} shards run eagerly "
                       "(use --mp 1; --cfg-parallel works with it)")  # fmt: skip
    if config.image_format not in IMAGE_FORMATS:
        raise JobError(f"--image-format {config.image_format!r} must be one of {', '.join(IMAGE_FORMATS)}")
    d = config.defaults
    limits = {name: getattr(d, name) for name in JOB_LIMITS}
    for f in GENERATION_FIELDS:
        v = getattr(d, f.name, None)
        spelling = f.flags[0] if f.flags else f.name
        if v is None and f.default is not None:
            raise JobError(f"{spelling} must be given (default {f.default})")
        problem = None if v is None else f.problem(v, limits)
        if problem is None and f.name == "seed" and v is not None and not 0 <= v <= MAX_SEED:
            problem = f"seed: {v} is outside 0..2**63-1"
        if problem:
            raise JobError(f"{spelling} {problem.split(': ', 1)[1]}")
    if config.lora is not None and not config.lora.strip():
        raise JobError("--lora: empty reference")
    if not isinstance(config.lora_scale, int | float) or not math.isfinite(config.lora_scale):
        raise JobError(f"--lora-scale {config.lora_scale!r} must be a finite number")
    if config.lora is None and config.lora_scale != 1.0:
        raise JobError(f"--lora-scale {config.lora_scale:g} needs --lora")


def _check_output(url: str, options: StorageOptions) -> None:
    """JobError unless `url` is a folder/prefix we can write to (probe written, then removed)."""
    try:
        fs, path = get_fs(url, options)
    except ValueError as e:
        raise JobError(f"--output {url}: {e}") from None
    try:
        if fs.isfile(path):
            raise JobError(f"--output {url}: is an existing file, not a folder")
    except JobError:
        raise
    except Exception as e:  # e.g. a missing bucket or no permission (botocore's error text says which)
        raise JobError(f"--output {url}: cannot access it ({type(e).__name__}: {e})") from None
    probe = join_url(url, f".sd3-write-probe-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes_atomic(probe, b"probe", options)
    except Exception as e:
        raise JobError(f"--output {url}: not writable ({type(e).__name__}: {e})") from None
    try:
        _, probe_path = get_fs(probe, options)
        fs.rm_file(probe_path)
    except Exception as e:  # harmless: a hidden name is never read as output
        logger.warning("could not remove the write probe %s: %s", probe, e)


class ModelDefaults(NamedTuple):
    """What a model folder implies for rows that do not say: image side, T5 length, guidance."""

    size: int  # transformer sample_size x VAE factor
    max_sequence_length: int  # model_index.json ``_max_sequence_length``, else 256
    guidance_scale: float  # model_index.json ``_guidance_scale``, else 7.0


def _model_defaults(model: str, options: StorageOptions) -> ModelDefaults:
    """The model's call defaults (`ModelDefaults`), read from its configs.

    Also the up-front check that `model` is a readable diffusers folder/prefix."""
    try:
        index = json.loads(read_bytes(join_url(model, "model_index.json"), options))
        transformer = json.loads(read_bytes(join_url(model, "transformer", "config.json"), options))
        vae = json.loads(read_bytes(join_url(model, "vae", "config.json"), options))
    except FileNotFoundError as e:
        raise JobError(f"--model {model}: not a diffusers SD3 folder ({e})") from None
    except json.JSONDecodeError as e:
        raise JobError(f"--model {model}: a config file is not valid JSON ({e})") from None
    except ValueError as e:
        raise JobError(f"--model {model}: {e}") from None
    except Exception as e:
        raise JobError(f"--model {model}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict) or "transformer" not in index:
        raise JobError(f"--model {model}: model_index.json lists no transformer")
    factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    where = join_url(model, "model_index.json")
    try:
        t5_length = folder_max_sequence_length(index, where)
        guidance = folder_guidance_scale(index, where)
    except ValueError as e:
        raise JobError(f"--model {model}: {e}") from None
    return ModelDefaults(int(transformer.get("sample_size", 128)) * factor, t5_length, guidance)


def _pin_lora(ref: str, model: str, options: StorageOptions) -> PinnedLoRA:
    """The adapter `ref` names now, pinned (version, sha256) and checked against `model`'s
    transformer, so a missing, unreadable or mismatched adapter fails before any row runs."""
    from sd3_core.lora import LoRAError
    from sd3_core.safetensors_io import WeightsFileError

    try:
        pinned = pin_lora(ref, options)
        _check_lora_fits(fetch_lora(pinned, options), model, options, pinned.pinned_ref)
    except LoRARefError as e:
        raise JobError(f"--lora {ref}: {e.reason}") from None
    except (LoRAError, WeightsFileError, ValueError) as e:
        raise JobError(f"--lora {ref}: {e}") from None
    except Exception as e:  # storage errors: botocore's text says which (no access, no bucket, ...)
        raise JobError(f"--lora {ref}: cannot read it ({type(e).__name__}: {e})") from None
    return pinned


def _check_lora_fits(path: str, model: str, options: StorageOptions, source: str) -> None:
    """LoRAError unless the LoRA file at `path` fits `model`'s transformer (built from its config
    without weights: shapes only)."""
    import paddle

    from sd3_core.lora_file import check_lora_fits, read_lora_file
    from sd3_core.transformer import SD3Transformer2DModel

    config = json.loads(read_bytes(join_url(model, "transformer", "config.json"), options))
    with paddle.LazyGuard():
        transformer = SD3Transformer2DModel.from_config(config)
    check_lora_fits(transformer, replace(read_lora_file(path), source=source))


def _lora_record(lora: PinnedLoRA | None, scale: float) -> dict[str, Any] | None:
    """What job.json says about the adapter the images were rendered with."""
    if lora is None:
        return None
    return {
        **asdict(lora),
        "pinned": lora.pinned_ref,
        "identity": lora.identity,
        "scale": scale,
        "fused": True,
    }


def _check_same_lora(output: str, rendered: Counter, lora: PinnedLoRA | None, scale: float) -> None:
    """JobError when `output` holds images rendered with another adapter or scale than this run's.

    `rendered`: (lora identity, scale) of the ok images there -> count. Adapters are the same when
    their bytes are (sha256), wherever the file is now."""
    now = (lora.identity, scale) if lora is not None else (None, None)
    for (identity, used_scale), n in rendered.items():
        if (_sha256_of(identity), used_scale) == (_sha256_of(now[0]), now[1]):
            continue
        before = _describe_lora(identity, used_scale)
        raise JobError(
            f"--lora: {output} already holds {n} image(s) rendered with {before}, but this run has "
            f"{_describe_lora(*now)}; resume with the same --lora and --lora-scale, or write to a new "
            "--output"
        )


def _sha256_of(identity: str | None) -> str | None:
    return identity.rpartition("#sha256:")[2] if identity else None


def _describe_lora(identity: str | None, scale: float | None) -> str:
    if identity is None:
        return "no --lora"
    ref, _, sha256 = identity.rpartition("#sha256:")
    return f"--lora {ref} --lora-scale {scale:g} (sha256 {sha256[:16]}...)"


# --------------------------------------------------------------------------- stages


def _items_of_rows(rows: Sequence[WorkRow], done: frozenset, errors: frozenset) -> list[dict[str, Any]]:
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
            tuple(it[c] or 0 for c in GROUP_COLUMNS),
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


def _check_passthrough(passthrough: pa.Schema, where: str) -> None:
    """JobError for a pass-through column named like a column the job writes itself."""
    reserved = manifest.reserved_names() | set(RESULT_SCHEMA.names).difference(KNOWN_COLUMNS)
    clash = [name for name in passthrough.names if name in reserved]
    if clash:
        names = ", ".join(f"`{n}`" for n in clash)
        raise JobError(
            f"--prompts {where}: column(s) {names} would pass through to the manifest, which writes "
            f"its own column of that name; rename them in the table (e.g. `input_{clash[0]}`)"
        )


def _get(value: Any) -> Any:
    """The value behind an ObjectRef (Ray Data passes fn_kwargs through unresolved)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _read_stage(
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
    return _to_items_table(_items_of_rows(rows, _get(done), _get(errors)), passthrough)


def _inline_stage(batch: pa.Table, *, defaults: JobDefaults, done: frozenset, errors: frozenset) -> pa.Table:
    """Rows of an in-memory prompt table (`--prompt`) -> work items."""
    return _to_items_table(
        _items_of_rows(resolve_rows(batch, defaults), _get(done), _get(errors)), pa.schema([])
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


def _write_stage(batch: pa.Table, *, output: str, image_format: str, storage: StorageOptions) -> pa.Table:
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


# --------------------------------------------------------------------------- the job


def _connect_ray(address: str | None) -> bool:
    """Connect to Ray; returns True when this call started a private local instance (to stop later).

    `address`: a cluster address ("auto": the one `ray start` left on this machine). Without one,
    RAY_ADDRESS is used if set, else a local Ray is started for this job."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # One logical CPU more than the machine has: the replicas may take every core, and Ray Data's
    # block-splitting tasks (repartition) need a CPU slot; they are light and mostly wait.
    cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) + 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def _check_cluster(spec: ReplicaSpec, replicas: int) -> None:
    """JobError when the replicas would leave no CPU for the other stages (Ray Data would wait
    forever); a warning when the cluster has fewer devices than the replicas need right now (an
    autoscaling cluster may add them)."""
    import ray

    have = ray.cluster_resources()
    need = spec.total_resources(replicas)
    spare = have.get("CPU", 0.0) - need.get("CPU", 0.0)
    if spare < 1:
        raise JobError(
            f"{replicas} replica(s) x {spec.cpus:g} CPU(s) leave {max(spare, 0):g} of the cluster's "
            f"{have.get('CPU', 0):g} CPUs for reading and encoding (at least 1 is needed); lower "
            "--replicas or --cpus-per-replica"
        )
    for name in ("GPU", "NPU"):
        if need.get(name, 0) > have.get(name, 0):
            logger.warning(
                "the replicas need %g %s but the cluster has %g now; they start when it has them",
                need[name], name, have.get(name, 0),
            )  # fmt: skip


def _configure_ray_data() -> None:
    import warnings

    import ray.data

    # Ray Data warns when a job has fewer batches than the write stage's task limit (small jobs).
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job shows one bar of its own (rows/s, ETA, failures)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled" notice
    ctx.print_on_execution_start = False
    ctx.retried_map_errors = list(TRANSIENT_STORAGE_ERRORS)
    ctx.max_map_retries = MAX_MAP_RETRIES


class _Outcomes(NamedTuple):
    """What the parts of earlier runs hold."""

    done: frozenset  # (key, k) with an ok row
    errors: frozenset  # (key, k, error) of error rows
    adapters: Counter  # (lora identity, lora scale) -> ok images
    models: Counter  # model identity -> ok images


def _known_outcomes(output: str, options: StorageOptions) -> _Outcomes:
    """The `_Outcomes` recorded in `output`'s manifest parts."""
    columns = ["key", "k", "status", "error", "model", "lora", "lora_scale"]
    table, bad = manifest.read_parts(output, options, columns=columns)
    if bad:
        logger.warning("%d unreadable manifest part(s) ignored; their rows are redone", len(bad))
    done, errors, adapters, models = set(), set(), Counter(), Counter()
    for key, k, status, error, model, lora, scale in zip(
        *(table.column(c).to_pylist() for c in columns), strict=True
    ):
        if status == manifest.STATUS_OK:
            done.add((key, k))
            adapters[(lora, scale)] += 1
            models[model] += 1
        else:
            errors.add((key, k, error))
    return _Outcomes(frozenset(done), frozenset(errors), adapters, models)


def _check_same_model(output: str, models: Counter, model: str, options: StorageOptions) -> None:
    """JobError when `output` holds images another model (URL or configs) rendered: a resume must
    not mix two models' images in one manifest."""
    from sd3_core.model_cache import model_identity

    if not models:  # a new output: nothing to compare, so no listing of the model
        return
    fs, path = get_fs(model, options)
    now = model_identity(path, model, fs)
    for identity, n in models.items():
        if identity != now:
            raise JobError(
                f"--model: {output} already holds {n} image(s) rendered by {identity}, but this run's "
                f"model is {now} (URL and config hash); resume with the same --model, or write to a "
                "new --output"
            )


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
    """Run (or resume) a batch job; JobError for job-level problems, found before any work."""
    started = time.time()
    _check_config(config)
    storage = config.storage
    try:
        output = normalize_url(config.output)
    except ValueError as e:
        raise JobError(f"--output {config.output}: {e}") from None

    # 1. Inputs, checked before anything is written.
    units: list[ReadUnit] = []
    passthrough = pa.schema([])
    inline: pa.Table | None = None
    if config.prompts is not None:
        try:
            prompts_url = normalize_url(config.prompts)
            plan = plan_table(prompts_url, storage)
            units, passthrough = plan.units, plan.passthrough
            check_unique_ids(prompts_url, storage)
        except PromptTableError as e:
            raise JobError(f"--prompts {e}") from None
        except ValueError as e:
            raise JobError(f"--prompts {config.prompts}: {e}") from None
        _check_passthrough(passthrough, config.prompts)
        total_rows = sum(u.num_rows for u in units)
        if total_rows == 0:
            raise JobError(f"--prompts {config.prompts}: the table has no rows")
    else:
        inline = prompts_table(list(config.prompt_list), config.defaults.negative_prompt)
        total_rows = inline.num_rows
    try:
        model = normalize_url(config.model)
    except ValueError as e:
        raise JobError(f"--model {config.model}: {e}") from None
    implied = _model_defaults(model, storage)
    given = config.defaults
    defaults = replace(
        given,
        height=given.height or implied.size,
        width=given.width or implied.size,
        max_sequence_length=given.max_sequence_length or implied.max_sequence_length,
        guidance_scale=implied.guidance_scale if given.guidance_scale is None else given.guidance_scale,
        model=model,
    )
    # Pinned once, here: every replica then loads these bytes even if a registry's `latest` moves.
    lora = _pin_lora(config.lora, model, storage) if config.lora is not None else None
    spec = ReplicaSpec(
        model=model, dtype=config.dtype, device=config.device, cpus=config.cpus_per_replica, storage=storage,
        cfg=2 if config.cfg_parallel else 1, mp=config.mp, lora=lora, lora_scale=config.lora_scale,
        inference_optimize=config.inference_optimize, benchmark=config.benchmark,
    )  # fmt: skip
    if spec.world_size > 1:  # heads % mp, before any actor starts
        from actors.replica_group import check_replica_shape  # loads Paddle: only for groups

        try:
            check_replica_shape(spec)
        except ValueError as e:
            raise JobError(f"--mp {config.mp}: {e}") from None
    previous = _read_job_json(output, storage)
    if previous is None:  # a finished job's rerun must write nothing, not even a probe
        _check_output(output, storage)
    known = _known_outcomes(output, storage)
    _check_same_model(output, known.models, model, storage)
    _check_same_lora(output, known.adapters, lora, config.lora_scale)
    done, errors = known.done, known.errors

    # 2. The graph.
    import ray
    import ray.data

    started_ray = _connect_ray(config.ray_address)
    try:
        _check_cluster(spec, config.replicas)
        _configure_ray_data()
        outcome_kwargs = {"done": ray.put(done), "errors": ray.put(errors)}
        if inline is None:
            ds = ray.data.from_items([u.as_dict() for u in units]).map_batches(
                _read_stage,
                batch_size=1,
                batch_format="pyarrow",
                fn_kwargs={
                    "defaults": defaults,
                    "storage": storage,
                    "passthrough": passthrough,
                    **outcome_kwargs,
                },
                num_cpus=0,  # I/O bound; must not wait for CPUs the replicas hold
                compute=ray.data.TaskPoolStrategy(size=min(2, len(units))),
            )
        else:
            ds = ray.data.from_arrow(inline).map_batches(
                _inline_stage,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={"defaults": defaults, **outcome_kwargs},
                num_cpus=0,
            )
        # Blocks of one batch each: a replica task then renders one batch and hands it to the write
        # stage at once (encoding/upload overlap the next batch; a crash loses one batch, not a unit).
        # Ray Data runs this split as 1-CPU tasks: `_check_cluster` keeps a CPU free for them.
        ds = (
            ds.repartition(target_num_rows_per_block=config.batch_size)
            .map_batches(
                GenerateStage,
                fn_constructor_kwargs={"spec": spec},
                batch_size=config.batch_size,
                batch_format="pyarrow",
                # A fixed pool; Ray restarts a dead actor and retries its batch (max_restarts=-1,
                # max_task_retries=-1 are Ray Data's defaults for actor pools).
                compute=ray.data.ActorPoolStrategy(size=config.replicas),
                **spec.pool_actor_resources(),
            )
            .map_batches(
                _write_stage,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={"output": output, "image_format": config.image_format, "storage": storage},
                # Encoding + upload: light, and it must never wait for CPUs the replicas hold.
                num_cpus=0,
                compute=ray.data.TaskPoolStrategy(size=max(2, 2 * config.replicas)),
            )
        )
        progress = _Progress(total_rows, config.progress)
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

    # 3. Merge the parts, job.json, contact sheet (skipped when this run had nothing to do).
    n_parts = len(manifest.part_urls(output, storage))
    if progress.images == 0 and previous is not None and previous.get("parts") == n_parts:
        counts = previous.get("counts", {})
        return JobResult(output, manifest.manifest_url(output), counts, 0, progress.skipped_rows,
                         time.time() - started, finalized=False)  # fmt: skip
    bench = None if tally is None else tally.report(config.replicas, time.perf_counter() - graph_started)
    counts = manifest.finalize(output, storage)
    _write_contact_sheet(output, storage, config.contact_sheet_images)
    manifest.write_job_json(
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
            "model": model,
            "lora": _lora_record(lora, config.lora_scale),
            "defaults": asdict(defaults),
            "replica": {**asdict(spec), "storage": storage.public_dict(), **spec.pool_actor_resources()},
        },
        **({} if bench is None else {"benchmark": bench}),
    )
    return JobResult(output, counts.get("manifest"), counts, progress.images, progress.skipped_rows,
                     time.time() - started, finalized=True, benchmark=bench)  # fmt: skip


def _read_job_json(output: str, options: StorageOptions) -> dict | None:
    """The job.json of an earlier finished run, or None (absent or unreadable: `_check_output` then
    says what is wrong with the output)."""
    try:
        doc = json.loads(read_bytes(join_url(output, manifest.JOB_JSON_NAME), options))
    except Exception:
        return None
    return doc if isinstance(doc, dict) else None


def _write_contact_sheet(output: str, options: StorageOptions, n: int) -> str | None:
    """`{out}/contact_sheet.png` of the first `n` ok images with their prompts (None when there are none)."""
    from jobs.contact_sheet import write_contact_sheet

    if n < 1:
        return None
    merged = manifest.read_manifest(output, options)
    return write_contact_sheet(output, manifest.iter_ok_images(merged), options, limit=n)
