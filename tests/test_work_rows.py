"""jobs.work_rows: safe keys, seeds, per-row validation (bad rows) and WorkRows through Arrow."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from jobs.prompt_table import plan_table
from jobs.work_rows import (
    resolve_rows,
    row_seed,
    safe_key,
    work_rows_from_batch,
    work_rows_to_table,
)
from sd3_core.generation_fields import MAX_SEED
from tests.test_prompt_table import SAFE, D, rows_of, write  # the tables these tests read

# ------------------------------------------------------------------ safe keys, seeds


UNSAFE = [
    "../x",
    "..",
    "a/b",
    "a\\b",
    "/abs",
    "\x00",
    "a\x00b",
    "tab\there",
    "new\nline",
    "x" * 300,
    "x" * 129,
    "",
    ".",
    ".hidden",
    "-dash",
    "_under",
    "a..b",
    "ünïcödé",
    "日本語",
    "emoji😀",
    "space here",
    "a:b",
    "a*b?",
    "CON%2F",
    "x--0123456789abcdef0123",  # looks like an encoded key: encoded too, so no collision
]


@pytest.mark.parametrize("raw", UNSAFE)
def test_unsafe_ids_are_encoded(raw):
    key = safe_key(raw)
    assert key != raw
    assert SAFE.match(key) and ".." not in key and "/" not in key
    assert len(key) <= 128 - len("_99.webp")  # room for the image suffix in a 128-char name
    assert safe_key(raw) == key  # stable


def test_encoded_keys_are_distinct_and_never_equal_a_raw_safe_id():
    keys = [safe_key(u) for u in UNSAFE]
    assert len(set(keys)) == len(UNSAFE)
    # "a/b" and "a_b" sanitise to the same prefix; the hash tells them apart, and the raw id stays.
    assert safe_key("a_b") == "a_b" and safe_key("a/b") != "a_b"
    for k in keys:  # an encoded key, used as an id, maps to something else (no collision)
        assert safe_key(k) != k


@pytest.mark.parametrize("raw", ["a", "row-0001", "A.b_c-9", "x" * 128, "123"])
def test_safe_ids_are_kept(raw):
    assert safe_key(raw) == raw


def test_row_seed_is_stable_63_bit_and_depends_on_job_seed_and_id():
    s = row_seed(0, "a")
    assert s == row_seed(0, "a") and 0 <= s <= MAX_SEED
    assert row_seed(1, "a") != s and row_seed(0, "b") != s
    assert row_seed(0, "日本\x00") == row_seed(0, "日本\x00")


# ------------------------------------------------------------------ bad rows


BAD_ROWS = [
    ({"prompt": None}, "prompt: null"),
    ({"prompt": ""}, "prompt: empty"),
    ({"prompt": "  \n\t"}, "prompt: empty"),
    ({"height": 100}, "height: 100 is not a positive multiple of 16"),
    ({"height": 0}, "height: 0 is not a positive multiple of 16"),
    ({"width": -16}, "width: -16 is not a positive multiple of 16"),
    ({"width": 8}, "width: 8 is not a positive multiple of 16"),
    ({"height": 8192}, "height: 8192 exceeds the job limit 4096"),
    ({"num_inference_steps": 0}, "num_inference_steps: 0 is < 1"),
    ({"num_inference_steps": -3}, "num_inference_steps: -3 is < 1"),
    ({"num_images": 0}, "num_images: 0 is < 1"),
    ({"num_images": 1000}, "num_images: 1000 exceeds the job limit 64"),
    ({"guidance_scale": math.nan}, "guidance_scale: nan is not finite"),
    ({"guidance_scale": math.inf}, "guidance_scale: inf is not finite"),
    ({"seed": -1}, "seed: -1 is outside"),
    ({"seed": MAX_SEED, "num_images": 2}, "seed: 9223372036854775807 is outside"),
    ({"seed_f": 1.5}, "seed: 1.5 is not an integer"),
    ({"height_f": 64.5}, "height: 64.5 is not an integer"),
    ({"max_sequence_length": 0}, "max_sequence_length: 0 is not in 1..512"),
    ({"max_sequence_length": 600}, "max_sequence_length: 600 is not in 1..512"),
]


@pytest.mark.parametrize("values, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_each_bad_row_reason(tmp_path, values, reason):
    base = {"id": "good", "prompt": "fine", "seed": 1, "height": 64, "width": 64, "num_inference_steps": 2}
    bad = {**base, "id": "bad"}
    for k, v in values.items():
        bad[k.removesuffix("_f")] = v
    cols = {k: [base[k], bad[k]] for k in base}
    for k, v in values.items():
        name = k.removesuffix("_f")
        typ = pa.float64() if k.endswith("_f") or isinstance(v, float) else None
        cols[name] = pa.array([base.get(name), v], typ)
    url = write(tmp_path / "t.parquet", cols)
    good, row = rows_of(url)  # validation never raises
    assert good.error is None
    assert row.error is not None
    assert reason in row.error
    assert "'bad'" in row.error  # the row id is named
    assert row.id == "bad" and row.key == "bad"


def test_several_problems_are_all_reported(tmp_path):
    url = write(
        tmp_path / "t.parquet", {"id": ["r"], "prompt": [""], "height": [10], "num_inference_steps": [0]}
    )
    (r,) = rows_of(url)
    assert "prompt: empty" in r.error and "height: 10" in r.error and "num_inference_steps: 0" in r.error
    assert r.error.startswith("row id 'r' (position t.parquet#0): ")


def test_bad_rows_do_not_affect_other_rows(tmp_path):
    prompts = ["ok", None, "ok", "", "ok"]
    url = write(tmp_path / "t.parquet", {"prompt": prompts, "height": [64, 64, 30, 64, 64]})
    rows = rows_of(url)
    assert [r.error is None for r in rows] == [True, False, False, False, True]
    assert len(rows) == 5


# ------------------------------------------------------------------ WorkRows through Arrow, positions


def test_work_rows_to_table_and_back(tmp_path):
    url = write(
        tmp_path / "t.parquet", {"id": ["a", "b"], "prompt": ["p", None], "num_images": [2, 1], "tag": [1, 2]}
    )
    rows = rows_of(url)
    table = work_rows_to_table(rows, plan_table(url).passthrough)
    assert table.schema.field("tag").type == pa.int64()
    assert work_rows_from_batch(table) == rows
    assert work_rows_from_batch(table.to_pydict()) == rows
    # pandas (Ray's default batch format) turns missing ints into NaN and ints into numpy types.
    back = work_rows_from_batch({k: v.to_numpy() for k, v in dict(table.to_pandas()).items()})
    assert back == rows
    assert all(type(r.seed) is int for r in back)


def test_resolve_rows_needs_positions_to_derive_ids():
    with pytest.raises(ValueError, match="_position"):
        resolve_rows(pa.table({"prompt": ["a"]}), D)
    (r,) = resolve_rows(pa.table({"id": ["x"], "prompt": ["a"]}), D)  # ids given: fine
    assert r.id == "x" and r.position == ""
