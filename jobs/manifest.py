"""The job manifest: one row per image (status "ok" or "error"), written as parts while the job runs.

Layout under the output URL `out`:
  images/{key}_{k}.{ext}                  the images (written before the part that names them)
  manifest/parts/{part_id}.parquet        one part per written batch, each written atomically
  manifest.parquet                        `finalize`: one row per (key, k), ok beats error, latest wins

Columns: `MANIFEST_SCHEMA`, then the input's pass-through columns (those the job does not use) with
their names and Arrow types (`manifest_schema`). The job's `job.json` beside them is `jobs.job_record`.

Resume: `done_keys` is the set of (key, k) with an "ok" row in some part; the job skips those. A
part is only written after all of its images exist, so an "ok" row always names a complete image.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.prompt_table import KNOWN_COLUMNS
from jobs.work_rows import WorkRow
from sd3_core.generation_fields import MAX_SEED, image_fields
from sd3_core.storage import StorageOptions, get_fs, join_url, list_files, normalize_url, write_bytes_atomic

log = logging.getLogger(__name__)
PART_FETCH_BATCH = 256
_PART_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")

PARTS_DIR = "manifest/parts"
MANIFEST_NAME = "manifest.parquet"
STATUS_OK = "ok"
STATUS_ERROR = "error"

MANIFEST_SCHEMA = pa.schema(
    [("id", pa.string()), ("key", pa.string()), ("k", pa.int32()), ("position", pa.string())]
    # The generation fields as rendered; `seed` is the per-image seed actually used (row seed + k).
    + [(f.name, f.arrow) for f in image_fields()]
    + [
        ("image", pa.string()),  # URI of the image (null for an error row)
        ("status", pa.string()),
        ("error", pa.string()),
        ("seconds", pa.float64()),  # compute time attributed to this image
        ("replica", pa.string()),
        ("model", pa.string()),  # model identity: URI + content hash (model_cache.model_identity)
        ("lora", pa.string()),  # adapter baked in: pinned reference + sha256 (PinnedLoRA.identity)
        ("lora_scale", pa.float64()),  # its scale (null without an adapter)
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)
# Columns added after parts were first written: an older part without them reads them as null.
ADDED_COLUMNS = ("lora", "lora_scale", "init_image", "strength")
_PART_COLUMN = "_part"  # added by `read_parts`


def reserved_names() -> frozenset[str]:
    """Names an input column cannot pass through under: manifest columns the job writes itself."""
    return frozenset(MANIFEST_COLUMNS).difference(KNOWN_COLUMNS) | {_PART_COLUMN}


def manifest_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """`MANIFEST_SCHEMA` followed by the `passthrough` columns."""
    return pa.schema([*MANIFEST_SCHEMA, *(passthrough or [])])


def images_url(out: str) -> str:
    """The folder of a job's images: `{out}/images`."""
    return join_url(out, "images")


def image_url(out: str, key: str, k: int, ext: str = "png") -> str:
    """Where image k of the row with `key` goes: `{out}/images/{key}_{k}.{ext}`."""
    return join_url(images_url(out), f"{key}_{k}.{ext}")


def parts_url(out: str) -> str:
    return join_url(out, PARTS_DIR)


def manifest_url(out: str) -> str:
    return join_url(out, MANIFEST_NAME)


def new_part_id() -> str:
    """A unique, time-sortable part id (safe as a file name)."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{now}-{uuid.uuid4().hex[:12]}"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def manifest_row(
    row: WorkRow,
    k: int,
    *,
    image: str | None = None,
    status: str = STATUS_OK,
    error: str | None = None,
    seconds: float | None = None,
    replica: str | None = None,
    model: str | None = None,
    seed: int | None = None,
    lora: str | None = None,
    lora_scale: float | None = None,
) -> dict[str, Any]:
    """The manifest row of image `k` of `row` (`seed` defaults to row seed + k)."""
    if status not in (STATUS_OK, STATUS_ERROR):
        raise ValueError(f"status must be 'ok' or 'error', not {status!r}")
    if seed is None and row.seed is not None and k >= 0:
        seed = row.seed + k
    return {
        "id": row.id,
        "key": row.key,
        "k": k,
        "position": row.position,
        **{f.name: getattr(row, f.name) for f in image_fields()},
        "seed": seed,
        "image": image,
        "status": status,
        "error": error,
        "seconds": seconds,
        "replica": replica,
        "model": model,
        "lora": lora,
        "lora_scale": lora_scale,
        "finished_at": _now(),
        **row.passthrough,
    }


def error_rows(
    row: WorkRow,
    error: str | None = None,
    *,
    seconds: float | None = None,
    replica: str | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Error rows for every image of `row` (k = 0..num_images-1; one k=0 row when num_images is
    itself invalid). `error` defaults to the row's validation error."""
    n = row.num_images if row.num_images is not None and row.num_images >= 1 else 1
    message = error or row.error or "unknown error"
    seed_ok = row.seed is not None and 0 <= row.seed and row.seed + n - 1 <= MAX_SEED
    return [
        manifest_row(
            row,
            k,
            status=STATUS_ERROR,
            error=message,
            seconds=seconds,
            replica=replica,
            model=model,
            seed=row.seed + k if seed_ok else None,
        )
        for k in range(n)
    ]


def rows_to_table(rows: Sequence[Mapping[str, Any]], passthrough: pa.Schema | None = None) -> pa.Table:
    """Manifest rows (dicts) as an Arrow table with `manifest_schema(passthrough)`; missing keys are null."""
    schema = manifest_schema(passthrough)
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    seeds = cols["seed"]
    if any(s is not None and not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError("manifest seed outside 0..2**63-1")
    return pa.table(cols, schema=schema)


def write_part(
    out: str,
    rows: Sequence[Mapping[str, Any]] | pa.Table,
    options: StorageOptions | None = None,
    part_id: str | None = None,
    passthrough: pa.Schema | None = None,
) -> str:
    """Write `rows` (with their `passthrough` columns; other extra columns are dropped) as one
    manifest part atomically (call it after their images exist); returns its URL."""
    schema = manifest_schema(passthrough)
    table = rows if isinstance(rows, pa.Table) else rows_to_table(rows, passthrough)
    table = table.select(schema.names).cast(schema)
    part_id = new_part_id() if part_id is None else part_id
    if not _PART_ID.match(part_id) or ".." in part_id:
        raise ValueError(f"part id {part_id!r} is not a plain file name ([A-Za-z0-9._-], no '..')")
    url = join_url(normalize_url(out), PARTS_DIR, f"{part_id}.parquet")
    write_bytes_atomic(url, _parquet_bytes(table), options)
    return url


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def part_urls(out: str, options: StorageOptions | None = None) -> list[str]:
    """URLs of the manifest parts under `out`, sorted (hidden/temporary files skipped)."""
    return list_files(parts_url(normalize_url(out)), options, suffix=".parquet")


def read_parts(
    out: str, options: StorageOptions | None = None, columns: Sequence[str] | None = None
) -> tuple[pa.Table, list[str]]:
    """All parts as one table (plus `_part`, its part URL) and the list of unreadable parts (not
    Parquet: skipped with a warning, their rows are recomputed as if never written). A part that
    cannot be fetched (storage down beyond the retries) raises OSError instead. `columns=None`:
    every manifest column plus the parts' pass-through columns (null where a part lacks one)."""
    urls = part_urls(out, options)
    wanted = list(columns) if columns is not None else list(MANIFEST_COLUMNS)
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in wanted])
    keep_others = columns is None
    tables, bad = [], []
    if urls:
        fs, _ = get_fs(urls[0], options)
        paths = {get_fs(u, options)[1]: u for u in urls}
        names = list(paths)
        # Parts are small and many: fetch them in batches (concurrent GETs on s3fs), parse locally.
        for start in range(0, len(names), PART_FETCH_BATCH):
            chunk = names[start : start + PART_FETCH_BATCH]
            fetched = (
                fs.cat(chunk, on_error="return") if len(chunk) > 1 else {chunk[0]: _cat_one(fs, chunk[0])}
            )
            for path in chunk:
                url, data = paths[path], fetched.get(path)
                if isinstance(data, FileNotFoundError) or data is None:
                    continue  # removed since the listing
                if isinstance(data, BaseException):
                    # Storage failed even after botocore's retries: fail loudly rather than
                    # finalize a manifest that silently lacks this part's rows.
                    raise OSError(f"cannot read manifest part {url}: {data}") from data
                try:
                    t = _read_part(data, schema, keep_others)
                except (pa.ArrowException, KeyError, ValueError) as e:
                    # Parts are written atomically, so this is a foreign or damaged file.
                    log.warning("skipping unreadable manifest part %s: %s", url, e)
                    bad.append(url)
                    continue
                tables.append(t.append_column(_PART_COLUMN, pa.array([url] * t.num_rows, pa.string())))
    if not tables:
        return pa.schema([*schema, pa.field(_PART_COLUMN, pa.string())]).empty_table(), bad
    try:
        merged = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as e:  # a pass-through column's type changed between runs
        raise ValueError(f"{out}: the manifest parts disagree on a column's type ({e})") from None
    if keep_others:  # fixed columns first, `_part` last
        others = [n for n in merged.column_names if n not in schema.names and n != _PART_COLUMN]
        merged = merged.select([*schema.names, *others, _PART_COLUMN])
    return merged, bad


def _read_part(data: bytes, schema: pa.Schema, keep_others: bool = False) -> pa.Table:
    """The `schema` columns of a part's bytes (then its other columns if `keep_others`); an
    `ADDED_COLUMNS` column it predates is null."""
    # Not pq.read_table: its background reads of an in-memory file can outlive the call and abort
    # the process when it exits soon after (apache/arrow#34314), e.g. a refused `sd3 generate`.
    with pq.ParquetFile(pa.BufferReader(data), pre_buffer=False) as part:
        present = set(part.schema_arrow.names)
        absent = {name for name in schema.names if name not in present and name in ADDED_COLUMNS}
        others = [n for n in part.schema_arrow.names if n not in schema.names] if keep_others else []
        table = part.read(columns=[n for n in schema.names if n not in absent] + others, use_threads=False)
    for name in absent:
        table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    fixed = table.select(schema.names).cast(schema)
    for name in others:
        fixed = fixed.append_column(table.schema.field(name), table.column(name))
    return fixed


def _cat_one(fs, path: str) -> bytes | BaseException:
    try:
        return fs.cat_file(path)
    except Exception as e:  # noqa: BLE001 - handled like fs.cat(on_error="return")
        return e


def done_keys(out: str, options: StorageOptions | None = None) -> set[tuple[str, int]]:
    """(key, k) of every image with an "ok" row in some part: the work a rerun skips."""
    table, _ = read_parts(out, options, columns=["key", "k", "status"])
    keys = table.column("key").to_pylist()
    ks = table.column("k").to_pylist()
    status = table.column("status").to_pylist()
    return {(key, k) for key, k, s in zip(keys, ks, status, strict=True) if s == STATUS_OK}


def _position_sort_key(position: str | None, key: str, k: int) -> tuple:
    if position and "#" in position:
        file, _, idx = position.rpartition("#")
        if idx.isdigit():
            return (0, file, int(idx), key, k)
    return (1, position or "", 0, key, k)


def finalize(out: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """Merge all parts into `{out}/manifest.parquet` (written atomically): one row per (key, k),
    an ok row beats an error row, else the latest wins; rows in input order. Returns counts."""
    table, bad = read_parts(out, options)
    n_parts = len(part_urls(out, options))
    keep: dict[tuple[str, int], tuple[tuple, int]] = {}
    if table.num_rows:
        keys = table.column("key").to_pylist()
        ks = table.column("k").to_pylist()
        status = table.column("status").to_pylist()
        finished = table.column("finished_at").cast(pa.int64()).to_pylist()
        parts = table.column("_part").to_pylist()
        for i in range(table.num_rows):
            rank = (status[i] == STATUS_OK, finished[i] or 0, parts[i], i)
            best = keep.get((keys[i], ks[i]))
            if best is None or rank > best[0]:
                keep[(keys[i], ks[i])] = (rank, i)
        positions = table.column("position").to_pylist()
        order = sorted(
            (i for _, i in keep.values()), key=lambda i: _position_sort_key(positions[i], keys[i], ks[i])
        )
        merged = table.take(pa.array(order, pa.int64())).drop_columns([_PART_COLUMN])
    else:
        merged = MANIFEST_SCHEMA.empty_table()
    url = manifest_url(normalize_url(out))
    write_bytes_atomic(url, _parquet_bytes(merged), options)
    return summarize(merged, manifest=url, parts=n_parts, unreadable_parts=bad)


def summarize(merged: pa.Table, **more: Any) -> dict[str, Any]:
    """Counts of a merged manifest: rows (ids), images ok, error images, failed rows + examples."""
    ids = merged.column("id").to_pylist()
    status = merged.column("status").to_pylist()
    errors = merged.column("error").to_pylist()
    failed: dict[str, str] = {}
    for i, s in enumerate(status):
        if s != STATUS_OK and ids[i] not in failed:
            failed[ids[i]] = errors[i] or ""
    return {
        "rows": len(set(ids)),
        "images": len(ids),
        "images_ok": sum(1 for s in status if s == STATUS_OK),
        "images_error": sum(1 for s in status if s != STATUS_OK),
        "rows_failed": len(failed),
        "error_examples": [{"id": i, "error": e} for i, e in list(failed.items())[:5]],
        **more,
    }


def read_manifest(out: str, options: StorageOptions | None = None) -> pa.Table:
    """The finalized `{out}/manifest.parquet`."""
    url = manifest_url(normalize_url(out))
    fs, path = get_fs(url, options)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def iter_ok_images(merged: pa.Table, limit: int | None = None) -> Iterable[tuple[str, str]]:
    """(image URI, prompt) of the ok rows of a merged manifest, in manifest order."""
    n = 0
    for image, prompt, status in zip(
        merged.column("image").to_pylist(),
        merged.column("prompt").to_pylist(),
        merged.column("status").to_pylist(),
        strict=True,
    ):
        if status == STATUS_OK and image:
            yield image, prompt or ""
            n += 1
            if limit is not None and n >= limit:
                return
