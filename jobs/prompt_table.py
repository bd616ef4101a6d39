"""Prompt tables: planning, reading and checking the Parquet input of a batch job.

A table is one Parquet file or a dataset directory (hive partitions `key=value/` become columns),
at any storage URL. Work is planned as one `ReadUnit` per (file, row group), in sorted file order, so
every row has a stable POSITION `"{relative file path}#{row index in file}"` (for a single file the
relative path is its base name). Job-level problems (missing input, not Parquet, no `prompt` column,
wrong column types, duplicate ids) raise `PromptTableError` before any work. What a row then becomes
(defaults, per-row checks, ids, keys and seeds) is `jobs.work_rows`: a bad row never raises there,
`resolve_rows` gives it an `error` and the job writes it to the manifest as an error row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from sd3_core.generation_fields import GENERATION_FIELDS, field_names
from sd3_core.storage import StorageOptions, get_fs, join_url, normalize_url

_KIND = {f.name: f.kind for f in GENERATION_FIELDS}
STRING_COLUMNS = tuple(n for n, k in _KIND.items() if k == "text")
INT_COLUMNS = tuple(n for n, k in _KIND.items() if k == "int")
FLOAT_COLUMNS = tuple(n for n, k in _KIND.items() if k == "float")
KNOWN_COLUMNS = ("id", *field_names())
POSITION_COLUMN = "_position"


class PromptTableError(ValueError):
    """A job-level problem with the prompt table (raised before any work is done)."""


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


__all__ = [
    "PromptTableError",
    "ReadUnit",
    "TablePlan",
    "check_schema",
    "check_unique_ids",
    "plan_read_units",
    "plan_table",
    "prompts_table",
    "read_unit",
]
