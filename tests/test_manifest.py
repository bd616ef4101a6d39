"""jobs.manifest: parts, done_keys, finalize (dedupe, ok beats error, latest wins), ok images."""

from __future__ import annotations

import datetime as dt
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import manifest
from jobs.manifest import (
    MANIFEST_SCHEMA,
    done_keys,
    error_rows,
    finalize,
    image_url,
    manifest_row,
    new_part_id,
    read_manifest,
    write_part,
)
from jobs.prompt_table import prompts_table
from jobs.work_rows import JobDefaults, WorkRow, resolve_rows
from tests.s3_server import make_bucket, s3_client, storage_options


def work_rows(n: int = 4, num_images: int = 2) -> list[WorkRow]:
    table = prompts_table([f"prompt {i}" for i in range(n)])
    return resolve_rows(table, JobDefaults(height=64, width=64, guidance_scale=7.0, num_images=num_images))


def ok_rows(out: str, rows: list[WorkRow], replica: str = "r0") -> list[dict]:
    return [
        manifest_row(r, k, image=image_url(out, r.key, k), seconds=0.5, replica=replica, model="m#sha256:1")
        for r in rows
        for k in range(r.num_images)
    ]


def test_manifest_row_fields():
    r = work_rows(1)[0]
    row = manifest_row(r, 1, image="s3://b/o/images/x_1.png", seconds=1.25, replica="rep-3", model="m")
    assert set(row) == set(MANIFEST_SCHEMA.names)
    assert row["seed"] == r.seed + 1  # the per-image seed actually used
    assert (row["id"], row["key"], row["k"], row["status"], row["error"]) == (r.id, r.key, 1, "ok", None)
    assert (row["height"], row["width"], row["guidance_scale"]) == (64, 64, 7.0)
    with pytest.raises(ValueError):
        manifest_row(r, 0, status="done")


def test_error_rows_cover_every_image_and_invalid_counts():
    rows = resolve_rows(
        pa.table({"id": ["a", "b", "c"], "prompt": ["", "x", None], "num_images": [3, 0, None]}),
        JobDefaults(),
    )
    a = error_rows(rows[0])
    assert [(e["k"], e["status"]) for e in a] == [(0, "error"), (1, "error"), (2, "error")]
    assert "prompt: empty" in a[0]["error"] and a[2]["seed"] == rows[0].seed + 2
    b = error_rows(rows[1])  # num_images itself invalid: one k=0 row
    assert [e["k"] for e in b] == [0] and "num_images: 0" in b[0]["error"]
    c = error_rows(rows[2], "replica crashed: OOM", replica="r1")
    assert c[0]["error"] == "replica crashed: OOM" and c[0]["replica"] == "r1"


def test_image_url_and_part_ids():
    assert image_url("s3://b/out/", "key", 3) == "s3://b/out/images/key_3.png"
    assert image_url("/o", "key", 0, "webp") == "/o/images/key_0.webp"
    ids = [new_part_id() for _ in range(50)]
    assert len(set(ids)) == 50 and all("/" not in i for i in ids)


def test_parts_done_keys_and_finalize_local(tmp_path):
    out = str(tmp_path / "out")
    assert done_keys(out) == set()
    rows = work_rows(4, num_images=2)
    write_part(out, ok_rows(out, rows[:2]))
    write_part(out, [e for r in rows[2:] for e in error_rows(r, "boom")])
    assert done_keys(out) == {(r.key, k) for r in rows[:2] for k in (0, 1)}
    summary = finalize(out)
    assert summary["rows"] == 4 and summary["images"] == 8
    assert (summary["images_ok"], summary["images_error"], summary["rows_failed"]) == (4, 4, 2)
    assert summary["parts"] == 2 and summary["manifest"] == os.path.join(out, "manifest.parquet")
    assert summary["error_examples"][0] == {"id": rows[2].id, "error": "boom"}
    m = read_manifest(out)
    assert m.schema.equals(MANIFEST_SCHEMA)
    assert [(i, k) for i, k in zip(m["id"].to_pylist(), m["k"].to_pylist(), strict=True)] == [
        (r.id, k) for r in rows for k in (0, 1)
    ]


def test_finalize_ok_beats_error_and_latest_wins(tmp_path):
    out = str(tmp_path)
    a, b, c = work_rows(3, num_images=1)
    write_part(out, ok_rows(out, [a], replica="first"), part_id="p1")
    time.sleep(0.002)
    write_part(out, error_rows(a, "later failure") + error_rows(b, "old error"), part_id="p2")
    time.sleep(0.002)
    write_part(out, error_rows(b, "new error") + ok_rows(out, [c], replica="old"), part_id="p3")
    time.sleep(0.002)
    write_part(out, ok_rows(out, [c], replica="new"), part_id="p0")  # latest by time, first by name
    finalize(out)
    m = read_manifest(out).to_pylist()
    assert len(m) == 3
    by_id = {r["id"]: r for r in m}
    assert by_id[a.id]["status"] == "ok" and by_id[a.id]["replica"] == "first"  # ok beats a later error
    assert by_id[b.id]["error"] == "new error"  # latest error wins
    assert by_id[c.id]["replica"] == "new"  # latest ok wins
    assert done_keys(out) == {(a.key, 0), (c.key, 0)}


def test_finalize_orders_by_input_position(tmp_path):
    table = pa.table({"prompt": ["p"] * 12, "_position": [f"f.parquet#{i}" for i in range(12)]})
    rows = resolve_rows(table, JobDefaults())
    write_part(str(tmp_path), ok_rows(str(tmp_path), rows[::-1]))
    finalize(str(tmp_path))
    assert read_manifest(str(tmp_path))["position"].to_pylist() == [f"f.parquet#{i}" for i in range(12)]


def test_finalize_without_parts_writes_an_empty_manifest(tmp_path):
    summary = finalize(str(tmp_path))
    assert summary["rows"] == 0 and summary["images"] == 0 and summary["parts"] == 0
    assert read_manifest(str(tmp_path)).num_rows == 0


def test_unreadable_and_temporary_parts_are_skipped(tmp_path):
    out = str(tmp_path)
    rows = work_rows(2, num_images=1)
    write_part(out, ok_rows(out, rows))
    parts = tmp_path / "manifest" / "parts"
    (parts / "zz-corrupt.parquet").write_bytes(b"PAR1 garbage")
    (parts / ".p.parquet.tmp-123").write_bytes(b"half")  # an interrupted local write
    (parts / "notes.txt").write_text("x")
    assert done_keys(out) == {(r.key, 0) for r in rows}
    summary = finalize(out)
    assert summary["unreadable_parts"] == [str(parts / "zz-corrupt.parquet")]
    assert summary["images_ok"] == 2


def test_a_part_written_before_the_lora_columns_reads_them_as_null(tmp_path):
    out = str(tmp_path)
    old, new = work_rows(2, num_images=1)
    parts = tmp_path / "manifest" / "parts"
    parts.mkdir(parents=True)
    older = manifest.rows_to_table(ok_rows(out, [old])).drop_columns(list(manifest.ADDED_COLUMNS))
    pq.write_table(older, parts / "older.parquet")
    write_part(out, [{**ok_rows(out, [new])[0], "lora": "/l.safetensors#sha256:ab", "lora_scale": 0.5}])
    assert done_keys(out) == {(old.key, 0), (new.key, 0)}
    summary = finalize(out)
    assert summary["unreadable_parts"] == [] and summary["images_ok"] == 2
    by_key = {r["key"]: r for r in read_manifest(out).to_pylist()}
    assert (by_key[old.key]["lora"], by_key[old.key]["lora_scale"]) == (None, None)
    assert (by_key[new.key]["lora"], by_key[new.key]["lora_scale"]) == ("/l.safetensors#sha256:ab", 0.5)


def test_failed_part_write_leaves_no_part(tmp_path, monkeypatch):
    out = str(tmp_path)
    rows = work_rows(1)

    def broken_fsync(fd):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_part(out, ok_rows(out, rows))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "manifest" / "parts") == []
    assert done_keys(out) == set()


def test_write_part_rejects_bad_part_ids_and_bad_rows(tmp_path):
    rows = ok_rows(str(tmp_path), work_rows(1))
    for bad in ["../x", "a/b", ".hidden", ""]:
        with pytest.raises(ValueError):
            write_part(str(tmp_path), rows, part_id=bad)
    with pytest.raises(ValueError, match="seed"):
        write_part(str(tmp_path), [{**rows[0], "seed": -5}])


def test_write_part_accepts_a_table_with_extra_columns(tmp_path):
    rows = ok_rows(str(tmp_path), work_rows(2, num_images=1))
    table = manifest.rows_to_table(rows).append_column("scratch", pa.array([1, 2]))
    url = write_part(str(tmp_path), table, part_id="t")
    assert pq.read_table(url).schema.equals(MANIFEST_SCHEMA)


PASSTHROUGH = pa.schema(
    [
        ("n", pa.int64()),
        ("score", pa.float64()),
        ("tag", pa.string()),
        ("flag", pa.bool_()),
        ("ids", pa.list_(pa.int64())),
        ("when", pa.timestamp("us", tz="UTC")),
    ]
)


def test_passthrough_columns_keep_names_and_types_through_parts_and_finalize(tmp_path):
    out = str(tmp_path)
    when = [dt.datetime(2024, 5, i + 1, tzinfo=dt.timezone.utc) for i in range(3)]
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "prompt": ["x", "y", ""],  # c is a bad row
            "n": [1, 2, 3],
            "score": [0.5, None, 2.5],
            "tag": ["t0", "t1", "t2"],
            "flag": [True, False, None],
            "ids": [[1], [], [2, 3]],
            "when": pa.array(when, PASSTHROUGH.field("when").type),
        }
    )
    a, b, c = resolve_rows(table, JobDefaults(height=64, width=64))
    write_part(out, error_rows(a, "crashed") + error_rows(c), part_id="p1", passthrough=PASSTHROUGH)
    time.sleep(0.002)
    # A rerun renders a and b; c fails the same way; a part without pass-through values (an
    # older run) merges too.
    write_part(out, ok_rows(out, [a, b]), part_id="p2", passthrough=PASSTHROUGH)
    write_part(out, ok_rows(out, work_rows(1, num_images=1)), part_id="p3")
    finalize(out)
    m = read_manifest(out)
    assert m.schema.equals(manifest.manifest_schema(PASSTHROUGH))
    rows = {r["id"]: r for r in m.to_pylist()}
    assert [rows[i]["status"] for i in "abc"] == ["ok", "ok", "error"]
    assert (rows["c"]["n"], rows["c"]["tag"], rows["c"]["ids"], rows["c"]["when"]) == (
        3,
        "t2",
        [2, 3],
        when[2],
    )
    assert (rows["a"]["score"], rows["a"]["flag"], rows["b"]["score"], rows["b"]["ids"]) == (
        0.5,
        True,
        None,
        [],
    )
    assert rows["prompt0000"]["n"] is None


def test_parts_and_finalize_on_s3(s3_endpoint):
    bucket = make_bucket(s3_endpoint)
    opts = storage_options(s3_endpoint)
    out = f"s3://{bucket}/jobs/run1"
    rows = work_rows(3, num_images=1)
    write_part(out, ok_rows(out, rows[:2]), opts)
    write_part(out, error_rows(rows[2], "bad"), opts)
    assert done_keys(out, opts) == {(r.key, 0) for r in rows[:2]}
    summary = finalize(out, opts)
    assert summary["manifest"] == f"{out}/manifest.parquet"
    assert (summary["images_ok"], summary["rows_failed"]) == (2, 1)
    m = read_manifest(out, opts)
    assert m.num_rows == 3 and m["image"].to_pylist()[0] == f"{out}/images/{rows[0].key}_0.png"
    assert "Uploads" not in s3_client(s3_endpoint).list_multipart_uploads(Bucket=bucket)


def test_iter_ok_images(tmp_path):
    out = str(tmp_path)
    rows = work_rows(3, num_images=1)
    write_part(out, ok_rows(out, rows[:2]) + error_rows(rows[2], "x"))
    finalize(out)
    got = list(manifest.iter_ok_images(read_manifest(out)))
    assert got == [(image_url(out, r.key, 0), r.prompt) for r in rows[:2]]
    assert len(list(manifest.iter_ok_images(read_manifest(out), limit=1))) == 1


def test_unfetchable_part_raises_instead_of_being_dropped(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    out = str(tmp_path)
    rows = work_rows(3, num_images=1)
    write_part(out, ok_rows(out, rows[:1]), part_id="a")
    write_part(out, ok_rows(out, rows[1:]), part_id="b")

    def flaky(self, path, *args, **kwargs):
        raise ConnectionError(f"storage unreachable: {path}")

    monkeypatch.setattr(LocalFileSystem, "cat_file", flaky)
    with pytest.raises(OSError, match="cannot read manifest part"):
        done_keys(out)
    with pytest.raises(OSError, match="cannot read manifest part"):
        finalize(out)
    monkeypatch.undo()
    assert not os.path.exists(tmp_path / "manifest.parquet")
    assert finalize(out)["images_ok"] == 3


def test_many_parts_are_fetched_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "PART_FETCH_BATCH", 2)
    out = str(tmp_path)
    rows = work_rows(5, num_images=1)
    for i, r in enumerate(rows):
        write_part(out, ok_rows(out, [r]), part_id=f"p{i}")
    assert done_keys(out) == {(r.key, 0) for r in rows}
    assert finalize(out)["parts"] == 5
