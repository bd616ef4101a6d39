"""Prompt tables: planning, reading and validating the Parquet input of a batch job.

A table is one Parquet file or a dataset directory (hive partitions `key=value/` become columns),
at any storage URL. Work is planned as one `ReadUnit` per (file, row group), in sorted file order, so
every row has a stable POSITION `"{relative file path}#{row index in file}"` (for a single file the
relative path is its base name). Job-level problems (missing input, not Parquet, no `prompt` column,
wrong column types, duplicate ids) raise `PromptTableError` before any work; a bad row never
raises: `resolve_rows` gives it an `error` and the job writes it to the manifest as an error row.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from sd3_core.generation_fields import GENERATION_FIELDS, MAX_SEED, field_names, shared_fields
from sd3_core.storage import StorageOptions, get_fs, join_url, normalize_url

_KIND = {f.name: f.kind for f in GENERATION_FIELDS}
STRING_COLUMNS = tuple(n for n, k in _KIND.items() if k == "text")
INT_COLUMNS = tuple(n for n, k in _KIND.items() if k == "int")
FLOAT_COLUMNS = tuple(n for n, k in _KIND.items() if k == "float")
KNOWN_COLUMNS = ("id", *field_names())
POSITION_COLUMN = "_position"

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Encoded keys end with "--" + 20 hex digits; a raw id of that shape is encoded too, so an encoded
# key can never equal a raw one.
_ENCODED_TAIL = re.compile(r"--[0-9a-f]{20}$")


class PromptTableError(ValueError):
    """A job-level problem with the prompt table (raised before any work is done)."""


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


@dataclass(frozen=True)
class ReadUnit:
    """One row group of one file: the unit of reading (picklable; `as_dict` for Ray Data items)."""

    url: str  # the file
    relpath: str  # path relative to the table root (base name for a single file)
    row_group: int
    first_row: int  # row index in the file of the group's first row
    num_rows: int
    partition: tuple[tuple[str, str | None], ...] = ()  # hive (key, value) pairs of the file's folders

    def as_dict(self) -> dict:
        d = asdict(self)
        d["partition"] = json.dumps(list(self.partition))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReadUnit:
        part = d.get("partition") or "[]"
        part = json.loads(part) if isinstance(part, str) else part
        return cls(
            url=str(d["url"]),
            relpath=str(d["relpath"]),
            row_group=int(d["row_group"]),
            first_row=int(d["first_row"]),
            num_rows=int(d["num_rows"]),
            partition=tuple((str(k), None if v is None else str(v)) for k, v in part),
        )


def _image_seeds(self) -> list[int]:
    """The per-image seeds (seed + k) of a valid row."""
    return [self.seed + k for k in range(self.num_images)]


def _shape_key(self) -> tuple:
    """Rows with equal keys can share one pipeline call (their shared generation fields agree)."""
    return tuple(getattr(self, name) for name in shared_fields())


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


safe_id = safe_key  # the name used by the old single-process path


def row_seed(job_seed: int, row_id: str) -> int:
    """A stable 63-bit seed derived from (job seed, id), so a rerun makes the same image."""
    digest = hashlib.sha256(f"{job_seed}:{row_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") & MAX_SEED


def position_id(position: str) -> str:
    """The id of a row without an `id`: stable, derived from its position, always a safe key."""
    return "r-" + hashlib.sha256(position.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class TablePlan:
    """What a job reads: its `ReadUnit`s and the schema of its pass-through columns (the columns
    the job does not use, in first-seen order, with their Arrow types; partition keys are strings)."""

    units: list[ReadUnit]
    passthrough: pa.Schema


def plan_table(url: str, options: StorageOptions | None = None) -> TablePlan:
    """The read units (one per non-empty row group, in a deterministic order) and pass-through schema
    of the table at `url`.

    Checks every file's footer first: PromptTableError for a missing input, a file that is not
    Parquet, a file without a `prompt` column, a known column of the wrong type, or a pass-through
    column whose type differs between files (an all-null column fits any type)."""
    url = normalize_url(url)
    files = _table_files(url, options)
    fs, _ = get_fs(url, options)
    units: list[ReadUnit] = []
    passthrough: dict[str, tuple[pa.Field, str]] = {}  # name -> (field, the file it came from)
    for file_url, relpath, partition in files:
        meta, schema = _footer(fs, file_url, options)
        check_schema(schema, f"{url} ({relpath})" if relpath != _basename(url) else url)
        _check_partition(partition, schema, url, relpath)
        columns = [*schema, *(pa.field(k, pa.string()) for k, _ in partition)]
        for f in columns:
            if f.name in KNOWN_COLUMNS or f.name == POSITION_COLUMN:
                continue
            seen = passthrough.get(f.name)
            if seen is None or pa.types.is_null(seen[0].type):
                passthrough[f.name] = (f.with_nullable(True), relpath)
            elif not pa.types.is_null(f.type) and f.type != seen[0].type:
                raise PromptTableError(
                    f"{url}: column `{f.name}` has type {seen[0].type} in {seen[1]} but {f.type} in "
                    f"{relpath}; the files of a table must agree (cast it in one of them)"
                )
        first = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if n:
                units.append(ReadUnit(file_url, relpath, g, first, n, partition))
            first += n
    return TablePlan(units, pa.schema([f for f, _ in passthrough.values()]))


def plan_read_units(url: str, options: StorageOptions | None = None) -> list[ReadUnit]:
    """The `ReadUnit`s of `plan_table`."""
    return plan_table(url, options).units


def check_schema(schema: pa.Schema, where: str) -> None:
    """PromptTableError unless `schema` has a `prompt` column and the known columns have usable types."""
    if "prompt" not in schema.names:
        raise PromptTableError(
            f"{where}: the table has no `prompt` column (columns: {', '.join(schema.names) or 'none'})"
        )
    for name in KNOWN_COLUMNS:
        if name not in schema.names:
            continue
        if schema.names.count(name) > 1:
            raise PromptTableError(f"{where}: column `{name}` appears more than once")
        t = schema.field(name).type
        want = _expected(name)
        if not _type_ok(name, t):
            raise PromptTableError(f"{where}: column `{name}` has type {t}; expected {want}")


def _expected(name: str) -> str:
    if name == "id":
        return "string or integer"
    if name in STRING_COLUMNS:
        return "string"
    if name in INT_COLUMNS:
        return "integer"
    return "number"


def _type_ok(name: str, t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        return True  # an all-null column: every row uses the default (or is a bad row for `prompt`)
    is_str = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if name == "id":
        return is_str or pa.types.is_integer(t)
    if name in STRING_COLUMNS:
        return is_str
    # Integral floats are accepted for integer columns: pandas stores an int column with gaps as float.
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _check_partition(partition: tuple, schema: pa.Schema, url: str, relpath: str) -> None:
    for k, v in partition:
        if k in schema.names:
            raise PromptTableError(
                f"{url}: partition folder `{k}=` of {relpath} repeats a column that is in the file"
            )
        if k == POSITION_COLUMN:
            raise PromptTableError(f"{url}: `{k}` is a reserved column name")
        if k in KNOWN_COLUMNS and k not in ("id", *STRING_COLUMNS) and v is not None:
            try:
                float(v) if k in FLOAT_COLUMNS else int(v)
            except ValueError:
                raise PromptTableError(
                    f"{url}: partition `{k}={v}` of {relpath} is not a valid {_expected(k)}"
                ) from None


def _table_files(url: str, options: StorageOptions | None) -> list[tuple[str, str, tuple]]:
    """(file url, relative path, partition pairs) of the table, sorted by relative path."""
    fs, path = get_fs(url, options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise PromptTableError(f"{url}: no such file or directory") from None
    except PermissionError as e:
        raise PromptTableError(f"{url}: permission denied ({e})") from None
    if info["type"] != "directory":
        return [(url, _basename(url), ())]
    root = path.rstrip("/")
    rels = []
    for p in fs.find(root):
        rel = p[len(root) :].lstrip("/")
        # The pyarrow/Spark convention: "_SUCCESS", "_metadata", ".crc", temp files are not data.
        if not rel or any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        rels.append(rel)
    if not rels:
        raise PromptTableError(f"{url}: the directory holds no Parquet files")
    out = []
    for rel in sorted(rels):
        partition = []
        for folder in rel.split("/")[:-1]:
            if "=" in folder:
                k, v = folder.split("=", 1)
                v = unquote(v)
                partition.append((unquote(k), None if v == "__HIVE_DEFAULT_PARTITION__" else v))
        out.append((join_url(url, rel), rel, tuple(partition)))
    return out


def _basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _footer(fs, file_url: str, options) -> tuple[pq.FileMetaData, pa.Schema]:
    _, path = get_fs(file_url, options)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            return pf.metadata, pf.schema_arrow
    except FileNotFoundError:
        raise PromptTableError(f"{file_url}: no such file") from None
    except PermissionError as e:
        raise PromptTableError(f"{file_url}: permission denied ({e})") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise PromptTableError(f"{file_url}: not a readable Parquet file ({e})") from None


# --------------------------------------------------------------------------- reading


def read_unit(unit: ReadUnit, options: StorageOptions | None = None) -> pa.Table:
    """The rows of `unit` (its file's columns, its partition columns as strings, `_position`)."""
    fs, path = get_fs(unit.url, options)
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(unit.row_group)
    n = table.num_rows
    for k, v in unit.partition:
        table = table.append_column(k, pa.array([v] * n, pa.string()))
    positions = [f"{unit.relpath}#{unit.first_row + i}" for i in range(n)]
    return table.append_column(POSITION_COLUMN, pa.array(positions, pa.string()))


def prompts_table(prompts: Sequence[str], negative_prompt: str | None = None) -> pa.Table:
    """An in-memory prompt table (for `--prompt "..."`): ids prompt0000.., with `_position`."""
    n = len(prompts)
    cols: dict[str, Any] = {
        "id": [f"prompt{i:04d}" for i in range(n)],
        "prompt": list(prompts),
        POSITION_COLUMN: [f"prompt#{i}" for i in range(n)],
    }
    if negative_prompt is not None:
        cols["negative_prompt"] = [negative_prompt] * n
    return pa.table(cols)


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


# --------------------------------------------------------------------------- whole-table checks


def check_unique_ids(url: str, options: StorageOptions | None = None, show: int = 5) -> int:
    """PromptTableError listing a few duplicated ids (reads only the `id` column); returns the number
    of rows with an id. Run before any work."""
    import pyarrow.compute as pc

    fs, _ = get_fs(url, options)
    chunks = []
    for file_url, _rel, partition in _table_files(url, options):
        _, path = get_fs(file_url, options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            part_id = [v for k, v in partition if k == "id"]
            if part_id:  # every row of the file has its folder's id
                chunks.append(pa.array(part_id * pf.metadata.num_rows, pa.string()))
                continue
            if "id" not in pf.schema_arrow.names:
                continue
            col = pf.read(columns=["id"]).column("id")
        for chunk in col.chunks:
            if pa.types.is_dictionary(chunk.type):
                chunk = chunk.dictionary_decode()
            chunks.append(pc.cast(chunk, pa.string()) if not pa.types.is_null(chunk.type) else chunk)
    ids = [c for c in chunks if not pa.types.is_null(c.type)]
    if not ids:
        return 0
    all_ids = pa.chunked_array(ids, pa.string()).drop_null()
    counts = pc.value_counts(all_ids)
    dup_mask = pc.greater(counts.field("counts"), 1)
    dups = counts.filter(dup_mask)
    if len(dups):
        listed = ", ".join(
            f"{v!r} ({c}x)"
            for v, c in zip(
                dups.field("values").to_pylist()[:show], dups.field("counts").to_pylist()[:show], strict=True
            )
        )
        more = f" and {len(dups) - show} more" if len(dups) > show else ""
        raise PromptTableError(f"{url}: {len(dups)} duplicate id(s): {listed}{more}; ids must be unique")
    return len(all_ids)


def iter_work_rows(
    url: str, defaults: JobDefaults, options: StorageOptions | None = None
) -> Iterable[WorkRow]:
    """All WorkRows of a table in order (a convenience for small tables and tests)."""
    for unit in plan_read_units(url, options):
        yield from resolve_rows(read_unit(unit, options), defaults)


__all__ = [
    "JobDefaults",
    "PromptTableError",
    "ReadUnit",
    "TablePlan",
    "WorkRow",
    "WORK_ROW_SCHEMA",
    "check_schema",
    "check_unique_ids",
    "iter_work_rows",
    "plan_read_units",
    "plan_table",
    "position_id",
    "prompts_table",
    "read_unit",
    "resolve_rows",
    "row_seed",
    "safe_id",
    "safe_key",
    "work_rows_from_batch",
    "work_rows_to_table",
]
