"""Work rows: what one prompt-table row becomes before it is rendered.

`resolve_rows` turns the rows `jobs.prompt_table.read_unit` read into `WorkRow`s: the job's
`JobDefaults` filled in where a row has no value, every generation field checked as
`sd3_core.generation_fields` declares it, an id (from the row, else from its position), a key safe
as a path component, and a seed (from the row, else derived from the job seed and the id). A bad
row never raises: its `WorkRow` carries an `error` and the job writes it to the manifest as an
error row. `WORK_ROW_SCHEMA` and `work_rows_to_table` / `work_rows_from_batch` carry WorkRows
through Ray Data batches.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, field, fields, make_dataclass
from typing import Any

import pyarrow as pa

from jobs.prompt_table import INT_COLUMNS, KNOWN_COLUMNS, POSITION_COLUMN, plan_read_units, read_unit
from sd3_core.generation_fields import GENERATION_FIELDS, MAX_SEED, call_key
from sd3_core.storage import StorageOptions

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Encoded keys end with "--" + 20 hex digits; a raw id of that shape is encoded too, so an encoded
# key can never equal a raw one.
_ENCODED_TAIL = re.compile(r"--[0-9a-f]{20}$")

# Limits that turn an absurd row into an error row instead of an out-of-memory replica.
JOB_LIMITS = {"max_size": 4096, "max_num_images": 64}

#: Job-level defaults for every generation field but ``prompt`` (a row's own non-null value
#: wins), then ``job_seed``, ``model`` and the ``JOB_LIMITS``. ``seed=None`` derives each row's
#: seed from (``job_seed``, id); ``height``/``width`` None mean the model's default size (resolve
#: it from the model before ``resolve_rows`` so manifests hold concrete sizes);
#: ``max_sequence_length`` and ``guidance_scale`` None mean the model's defaults (its folder's,
#: else 256 and 7.0).
JobDefaults = make_dataclass(
    "JobDefaults",
    [(f.name, Any, f.default) for f in GENERATION_FIELDS if f.name != "prompt"]
    + [("job_seed", int, 0), ("model", Any, None)]
    + [(name, int, value) for name, value in JOB_LIMITS.items()],
    frozen=True,
    namespace={"__module__": __name__},
)


def _image_seeds(self) -> list[int]:
    """The per-image seeds (seed + k) of a valid row."""
    return [self.seed + k for k in range(self.num_images)]


def _shape_key(self) -> tuple:
    """Rows with equal keys can share one pipeline call (``generation_fields.call_key``)."""
    return call_key(vars(self))


#: One validated input row: what a replica renders (or an ``error`` saying why it cannot):
#: ``id``, ``key``, ``position``, every generation field, ``error``, and ``passthrough`` (the
#: input's unused columns, name -> value, carried to the manifest unchanged).
WorkRow = make_dataclass(
    "WorkRow",
    [("id", str), ("key", str), ("position", str), ("prompt", Any)]
    + [(f.name, Any, None) for f in GENERATION_FIELDS if f.name != "prompt"]
    + [("error", Any, None), ("passthrough", dict, field(default_factory=dict))],
    namespace={
        "__module__": __name__,
        "as_dict": asdict,
        "image_seeds": _image_seeds,
        "shape_key": _shape_key,
    },
)

WORK_ROW_SCHEMA = pa.schema(
    [("id", pa.string()), ("key", pa.string()), ("position", pa.string())]
    + [(f.name, f.arrow) for f in GENERATION_FIELDS]
    + [("error", pa.string())]
)


def work_rows_to_table(rows: Sequence[WorkRow], passthrough: pa.Schema | None = None) -> pa.Table:
    """WorkRows as an Arrow table: `WORK_ROW_SCHEMA` then the `passthrough` columns (the job's
    `TablePlan.passthrough`, so every batch has the same schema)."""
    extra = passthrough or pa.schema([])
    cols = {name: [getattr(r, name) for r in rows] for name in WORK_ROW_SCHEMA.names}
    cols.update({name: [r.passthrough.get(name) for r in rows] for name in extra.names})
    return pa.table(cols, schema=pa.schema([*WORK_ROW_SCHEMA, *extra]))


def work_rows_from_batch(batch: pa.Table | Mapping[str, Any]) -> list[WorkRow]:
    """WorkRows back from a table or a column dict (pyarrow, pandas or numpy batch format)."""
    if isinstance(batch, pa.Table):
        cols = batch.to_pydict()
    else:
        cols = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}
    n = len(cols["id"])
    others = [c for c in cols if c not in WORK_ROW_SCHEMA.names]
    out = []
    for i in range(n):
        values: dict[str, Any] = {"passthrough": {c: cols[c][i] for c in others}}
        for f in fields(WorkRow)[:-1]:
            v = cols[f.name][i] if f.name in cols else None
            if isinstance(v, float) and math.isnan(v):
                v = None  # pandas turns missing numbers into NaN (a NaN given in a table is an error row's)
            if v is not None and f.name in INT_COLUMNS:
                v = int(v)
            values[f.name] = v
        out.append(WorkRow(**values))
    return out


# --------------------------------------------------------------------------- ids, keys and seeds


def safe_key(value: str) -> str:
    """`value` if it is a safe path component, else a readable prefix plus a hash of it.

    Safe: 1-128 chars of [A-Za-z0-9._-], starting alphanumeric, without "..". Anything else (path
    separators, "..", control characters, unicode, empty, too long) becomes
    `{sanitised prefix}--{20 hex of sha256}`; distinct ids give distinct keys."""
    if _SAFE_KEY.match(value) and ".." not in value and not _ENCODED_TAIL.search(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", value)[:40]
    stem = re.sub(r"\.{2,}", "_", stem).strip("._-") or "id"
    return f"{stem}--{digest}"


def row_seed(job_seed: int, row_id: str) -> int:
    """A stable 63-bit seed derived from (job seed, id), so a rerun makes the same image."""
    digest = hashlib.sha256(f"{job_seed}:{row_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") & MAX_SEED


def position_id(position: str) -> str:
    """The id of a row without an `id`: stable, derived from its position, always a safe key."""
    return "r-" + hashlib.sha256(position.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# --------------------------------------------------------------------------- resolving rows


def resolve_rows(table: pa.Table, defaults: JobDefaults) -> list[WorkRow]:
    """Validated WorkRows of a table from `read_unit`; never raises for a bad row (see `error`)."""
    data = table.to_pydict()
    n = table.num_rows
    if POSITION_COLUMN in data:
        positions = [str(p) for p in data[POSITION_COLUMN]]
    elif "id" in data and all(v is not None for v in data["id"]):
        positions = [""] * n
    else:
        # Ids derived from a batch-local index would repeat across batches (and be skipped as done).
        raise ValueError(
            f"resolve_rows: rows without an `id` need the `{POSITION_COLUMN}` column of read_unit"
        )
    others = [c for c in table.column_names if c not in KNOWN_COLUMNS and c != POSITION_COLUMN]
    return [_resolve_one(data, i, positions[i], others, defaults) for i in range(n)]


def _resolve_one(data: dict, i: int, position: str, others: list[str], d: JobDefaults) -> WorkRow:
    problems: list[str] = []

    def get(name: str):
        col = data.get(name)
        return None if col is None else col[i]

    raw_id = get("id")
    row_id = position_id(position) if raw_id is None else str(raw_id)
    prompt = get("prompt")
    if prompt is None:
        problems.append("prompt: null")
    elif not prompt.strip():
        problems.append("prompt: empty")
    limits = {name: getattr(d, name) for name in JOB_LIMITS}
    values: dict[str, Any] = {}
    for f in GENERATION_FIELDS:
        v = get(f.name)
        if v is not None and f.kind == "int":
            v = _integer(f.name, v, problems)
        elif v is not None and f.kind == "float":
            v = float(v)
        if v is None:
            v = getattr(d, f.name, None)  # the job's default (prompt and seed have none here)
        elif f.name != "seed":  # the seed's range depends on num_images: checked below
            problem = f.problem(v, limits)
            if problem:
                problems.append(problem)
        values[f.name] = v

    for f in GENERATION_FIELDS:  # a field meaningless without another: refused, or left out
        if f.needs and values[f.needs] is None:
            if get(f.name) is not None:
                problems.append(f"{f.name}: given without {f.needs}")
            values[f.name] = None

    seed, num_images = values["seed"], values["num_images"]
    if seed is None and not any(p.startswith("seed:") for p in problems):
        values["seed"] = row_seed(d.job_seed, row_id)
    elif seed is not None:
        last = seed + max(num_images or 1, 1) - 1
        if seed < 0 or last > MAX_SEED:
            problems.append(f"seed: {seed} is outside 0..2**63-1 (for all {num_images} image seeds)")

    error = None
    if problems:
        error = f"row id {row_id!r} (position {position}): " + "; ".join(problems)
    return WorkRow(
        id=row_id,
        key=safe_key(row_id),
        position=position,
        **values,
        error=error,
        passthrough={name: get(name) for name in others},
    )


def _integer(name: str, v: Any, problems: list[str]) -> int | None:
    """A table value of an integer column as an int (None, with a problem, when it is not one)."""
    if isinstance(v, str):  # a hive partition value
        try:
            return int(v)
        except ValueError:
            problems.append(f"{name}: {v!r} is not an integer")
            return None
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            problems.append(f"{name}: {v} is not an integer")
            return None
        return int(v)
    return int(v)


def iter_work_rows(
    url: str, defaults: JobDefaults, options: StorageOptions | None = None
) -> Iterable[WorkRow]:
    """All WorkRows of a table in order (a convenience for small tables and tests)."""
    for unit in plan_read_units(url, options):
        yield from resolve_rows(read_unit(unit, options), defaults)


__all__ = [
    "JobDefaults",
    "WorkRow",
    "WORK_ROW_SCHEMA",
    "iter_work_rows",
    "position_id",
    "resolve_rows",
    "row_seed",
    "safe_key",
    "work_rows_from_batch",
    "work_rows_to_table",
]
