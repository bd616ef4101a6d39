"""jobs.prompt_table: planning, reading, row positions and ids, pass-through columns, job-level errors."""

from __future__ import annotations

import math
import os
import pickle
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.prompt_table import (
    PromptTableError,
    ReadUnit,
    check_unique_ids,
    plan_read_units,
    plan_table,
    prompts_table,
    read_unit,
)
from jobs.work_rows import (
    JobDefaults,
    WorkRow,
    iter_work_rows,
    position_id,
    resolve_rows,
    row_seed,
    work_rows_to_table,
)
from tests.s3_server import make_bucket, storage_options

SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
D = JobDefaults(height=64, width=64, num_inference_steps=2)


def write(path, data: dict, **kwargs) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(data), path, **kwargs)
    return str(path)


def rows_of(url, defaults=D, options=None) -> list[WorkRow]:
    return list(iter_work_rows(url, defaults, options))


# ------------------------------------------------------------------ single files, positions, ids


def test_single_file_rows_positions_and_defaults(tmp_path):
    url = write(tmp_path / "t.parquet", {"prompt": ["a", "b", "c"], "style": ["x", None, "z"]})
    rows = rows_of(url)
    assert [r.position for r in rows] == ["t.parquet#0", "t.parquet#1", "t.parquet#2"]
    assert [r.prompt for r in rows] == ["a", "b", "c"]
    r = rows[0]
    assert r.error is None
    assert r.id == position_id("t.parquet#0") and r.key == r.id and SAFE.match(r.key)
    assert r.seed == row_seed(0, r.id)
    # guidance None: the model's default (run_job resolves it from the folder before resolving rows)
    assert (r.height, r.width, r.num_inference_steps, r.guidance_scale, r.num_images) == (64, 64, 2, None, 1)
    assert r.passthrough == {"style": "x"} and rows[1].passthrough == {"style": None}
    assert len({r.id for r in rows}) == 3
    assert r.image_seeds() == [r.seed]


def test_ids_and_seeds_are_stable_across_runs_and_row_group_layouts(tmp_path):
    data = {"prompt": [f"p{i}" for i in range(10)]}
    a = rows_of(write(tmp_path / "a" / "t.parquet", data, row_group_size=3))
    b = rows_of(write(tmp_path / "b" / "t.parquet", data, row_group_size=100))
    assert len(plan_read_units(str(tmp_path / "a" / "t.parquet"))) == 4
    assert [(r.id, r.seed, r.position) for r in a] == [(r.id, r.seed, r.position) for r in b]
    assert [r.id for r in a] == [r.id for r in rows_of(str(tmp_path / "a" / "t.parquet"))]  # rerun
    # A job seed changes the derived seeds but not the ids.
    c = rows_of(str(tmp_path / "a" / "t.parquet"), JobDefaults(job_seed=7))
    assert [r.id for r in c] == [r.id for r in a] and [r.seed for r in c] != [r.seed for r in a]


def test_id_column_makes_ids_independent_of_position(tmp_path):
    one = rows_of(write(tmp_path / "1.parquet", {"id": ["x", "y"], "prompt": ["px", "py"]}))
    two = rows_of(write(tmp_path / "2.parquet", {"id": ["y", "x"], "prompt": ["py", "px"]}))
    assert {r.id: r.seed for r in one} == {r.id: r.seed for r in two}
    assert one[0].key == "x" and one[0].position == "1.parquet#0"


def test_integer_ids_unsafe_ids_and_null_ids(tmp_path):
    rows = rows_of(write(tmp_path / "i.parquet", {"id": [7, 8], "prompt": ["a", "b"]}))
    assert [r.id for r in rows] == ["7", "8"] and [r.key for r in rows] == ["7", "8"]
    rows = rows_of(write(tmp_path / "u.parquet", {"id": ["../../etc/passwd", None], "prompt": ["a", "b"]}))
    assert rows[0].id == "../../etc/passwd" and SAFE.match(rows[0].key) and "/" not in rows[0].key
    assert rows[1].id == position_id("u.parquet#1")  # a null id falls back to the position


def test_row_values_override_defaults(tmp_path):
    url = write(
        tmp_path / "t.parquet",
        {
            "id": ["a", "b"],
            "prompt": ["p", "q"],
            "prompt_2": ["p2", None],
            "negative_prompt": [None, "neg"],
            "seed": [5, None],
            "height": [128, None],
            "width": pa.array([32, None], pa.int16()),
            "num_inference_steps": [4, None],
            "guidance_scale": [1.5, None],
            "num_images": [3, None],
            "max_sequence_length": [77, None],
        },
    )
    defaults = JobDefaults(negative_prompt="dneg", prompt_3="d3", height=64, width=64, guidance_scale=4.0)
    a, b = rows_of(url, defaults)
    assert (a.prompt_2, a.prompt_3, a.negative_prompt) == ("p2", "d3", "dneg")
    assert (a.seed, a.height, a.width, a.num_inference_steps, a.guidance_scale, a.num_images) == (
        5,
        128,
        32,
        4,
        1.5,
        3,
    )
    assert a.max_sequence_length == 77 and a.image_seeds() == [5, 6, 7]
    assert (b.negative_prompt, b.seed, b.height, b.num_images, b.guidance_scale) == (
        "neg",
        row_seed(0, "b"),
        64,
        1,
        4.0,
    )
    assert a.shape_key() == (128, 32, 4, 1.5, 77, None, False)  # strength (shared), has init_image
    assert a.passthrough == {}


def test_float_columns_holding_integers_are_accepted(tmp_path):
    # pandas stores an integer column with gaps as float64.
    url = write(tmp_path / "t.parquet", {"prompt": ["a", "b"], "seed": [3.0, None], "height": [64.0, 32.0]})
    a, b = rows_of(url)
    assert (a.seed, a.height, b.height, a.error, b.error) == (3, 64, 32, None, None)
    assert isinstance(a.seed, int)


def test_dictionary_encoded_and_large_string_columns(tmp_path):
    url = write(
        tmp_path / "t.parquet",
        {"prompt": pa.array(["a", "b"]).dictionary_encode(), "id": pa.array(["x", "y"], pa.large_string())},
    )
    assert [(r.id, r.prompt) for r in rows_of(url)] == [("x", "a"), ("y", "b")]


def test_all_null_optional_column_uses_defaults(tmp_path):
    url = write(tmp_path / "t.parquet", {"prompt": ["a"], "seed": pa.array([None], pa.null())})
    (r,) = rows_of(url)
    assert r.error is None and r.seed == row_seed(0, r.id)


# ------------------------------------------------------------------ job-level errors


@pytest.mark.parametrize(
    "column, values, expected",
    [
        ("prompt", pa.array([1, 2], pa.int64()), "column `prompt` has type int64; expected string"),
        ("height", pa.array(["64", "64"]), "column `height` has type string; expected integer"),
        ("seed", pa.array([True, False]), "column `seed` has type bool; expected integer"),
        ("guidance_scale", pa.array(["7", "7"]), "column `guidance_scale` has type string; expected number"),
        ("id", pa.array([1.0, 2.0]), "column `id` has type double; expected string or integer"),
        ("negative_prompt", pa.array([1, 2]), "column `negative_prompt` has type int64"),
        ("num_images", pa.array([[1], [2]]), "column `num_images` has type list<"),
    ],
)
def test_wrong_column_types_are_job_level_errors(tmp_path, column, values, expected):
    data = {"prompt": ["a", "b"], column: values}
    url = write(tmp_path / "t.parquet", data)
    with pytest.raises(PromptTableError, match=re.escape(expected)) as e:
        plan_read_units(url)
    assert url in str(e.value)


def test_no_prompt_column(tmp_path):
    url = write(tmp_path / "t.parquet", {"text": ["a"], "id": ["x"]})
    with pytest.raises(PromptTableError, match=r"no `prompt` column \(columns: text, id\)"):
        plan_read_units(url)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(PromptTableError, match="no such file or directory") as e:
        plan_read_units(str(tmp_path / "missing.parquet"))
    assert "missing.parquet" in str(e.value)
    with pytest.raises(PromptTableError, match="no such file"):
        plan_read_units(f"file://{tmp_path}/nodir/")


def test_not_parquet(tmp_path):
    (tmp_path / "t.parquet").write_text("id,prompt\n1,a\n")
    with pytest.raises(PromptTableError, match="not a readable Parquet file") as e:
        plan_read_units(str(tmp_path / "t.parquet"))
    assert "t.parquet" in str(e.value)
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(PromptTableError, match="not a readable Parquet file"):
        plan_read_units(str(tmp_path / "empty.parquet"))


def test_not_parquet_inside_a_dataset_and_empty_dataset(tmp_path):
    write(tmp_path / "ds" / "a.parquet", {"prompt": ["a"]})
    (tmp_path / "ds" / "notes.txt").write_text("hello")
    with pytest.raises(PromptTableError, match="notes.txt"):
        plan_read_units(str(tmp_path / "ds"))
    os.makedirs(tmp_path / "empty" / "_meta")
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    with pytest.raises(PromptTableError, match="holds no Parquet files"):
        plan_read_units(str(tmp_path / "empty"))


def test_one_file_of_a_dataset_without_prompt(tmp_path):
    write(tmp_path / "ds" / "a.parquet", {"prompt": ["a"]})
    write(tmp_path / "ds" / "b.parquet", {"text": ["b"]})
    with pytest.raises(PromptTableError, match=r"\(b.parquet\): the table has no `prompt` column"):
        plan_read_units(str(tmp_path / "ds"))


def test_unknown_scheme():
    with pytest.raises(ValueError, match="gs://b/t.parquet"):
        plan_read_units("gs://b/t.parquet")


@pytest.mark.parametrize(
    "files, dups",
    [
        ({"a.parquet": ["x", "y", "x"]}, ["'x' (2x)"]),
        ({"a.parquet": ["x", "y"], "b.parquet": ["z", "y"]}, ["'y' (2x)"]),
        ({"a.parquet": [1, 2], "b.parquet": ["1", "3"]}, ["'1' (2x)"]),  # int 1 and "1" are the same id
    ],
)
def test_duplicate_ids(tmp_path, files, dups):
    for name, ids in files.items():
        write(tmp_path / "ds" / name, {"id": ids, "prompt": ["p"] * len(ids)})
    with pytest.raises(PromptTableError, match="duplicate id") as e:
        check_unique_ids(str(tmp_path / "ds"))
    for d in dups:
        assert d in str(e.value)


def test_duplicate_ids_lists_only_a_few(tmp_path):
    ids = [f"id{i}" for i in range(20)] * 2
    write(tmp_path / "t.parquet", {"id": ids, "prompt": ["p"] * 40})
    with pytest.raises(PromptTableError, match="20 duplicate id.*and 15 more"):
        check_unique_ids(str(tmp_path / "t.parquet"))


def test_unique_ids_pass(tmp_path):
    write(tmp_path / "ds" / "a.parquet", {"id": ["a", None, None], "prompt": ["p"] * 3})
    write(tmp_path / "ds" / "b.parquet", {"prompt": ["q"]})  # no id column: position ids
    assert check_unique_ids(str(tmp_path / "ds")) == 1  # nulls fall back to positions: not duplicates
    write(tmp_path / "n.parquet", {"prompt": ["q"]})
    assert check_unique_ids(str(tmp_path / "n.parquet")) == 0


# ------------------------------------------------------------------ datasets and partitions


def make_dataset(root) -> None:
    write(root / "lang=en" / "size=64" / "part-1.parquet", {"id": ["en1", "en2"], "prompt": ["a", "b"]})
    write(root / "lang=en" / "size=64" / "part-0.parquet", {"id": ["en0"], "prompt": ["c"]}, row_group_size=1)
    write(root / "lang=fr%20ca" / "size=32" / "part-0.parquet", {"id": ["fr0", "fr1"], "prompt": ["d", "e"]})
    (root / "_SUCCESS").write_text("")
    (root / "lang=en" / ".part-0.parquet.crc").write_text("junk")
    os.makedirs(root / "_temporary" / "0")
    (root / "_temporary" / "0" / "junk.parquet").write_text("junk")


def test_partitioned_dataset_directory(tmp_path):
    make_dataset(tmp_path / "ds")
    units = plan_read_units(str(tmp_path / "ds"))
    assert [(u.relpath, u.row_group, u.first_row) for u in units] == [
        ("lang=en/size=64/part-0.parquet", 0, 0),
        ("lang=en/size=64/part-1.parquet", 0, 0),
        ("lang=fr%20ca/size=32/part-0.parquet", 0, 0),
    ]
    assert units[2].partition == (("lang", "fr ca"), ("size", "32"))
    t = read_unit(units[2])
    assert t.column("lang").to_pylist() == ["fr ca", "fr ca"]
    assert t.column("_position").to_pylist() == [
        "lang=fr%20ca/size=32/part-0.parquet#0",
        "lang=fr%20ca/size=32/part-0.parquet#1",
    ]
    rows = rows_of(str(tmp_path / "ds"))
    assert [r.id for r in rows] == ["en0", "en1", "en2", "fr0", "fr1"]
    assert rows[3].passthrough == {"lang": "fr ca", "size": "32"}
    assert plan_table(str(tmp_path / "ds")).passthrough == pa.schema(
        [("lang", pa.string()), ("size", pa.string())]
    )
    # Deterministic: the same plan every time.
    assert plan_read_units(str(tmp_path / "ds")) == units
    assert check_unique_ids(str(tmp_path / "ds")) == 5


def test_partition_on_a_known_column(tmp_path):
    write(tmp_path / "ds" / "height=128" / "a.parquet", {"prompt": ["a"]})
    write(tmp_path / "ds" / "height=64" / "a.parquet", {"prompt": ["b"]})
    rows = rows_of(str(tmp_path / "ds"))
    assert [(r.prompt, r.height) for r in rows] == [("a", 128), ("b", 64)]
    write(tmp_path / "bad" / "height=big" / "a.parquet", {"prompt": ["a"]})
    with pytest.raises(PromptTableError, match="partition `height=big`"):
        plan_read_units(str(tmp_path / "bad"))
    write(tmp_path / "dup" / "prompt=x" / "a.parquet", {"prompt": ["a"]})
    with pytest.raises(PromptTableError, match="repeats a column"):
        plan_read_units(str(tmp_path / "dup"))


def test_empty_file_gives_no_units(tmp_path):
    url = write(tmp_path / "t.parquet", {"prompt": pa.array([], pa.string())})
    assert plan_read_units(url) == []


def test_file_url_and_relative_path(tmp_path, monkeypatch):
    make_dataset(tmp_path / "ds")
    by_path = rows_of(str(tmp_path / "ds"))
    by_url = rows_of(f"file://{tmp_path}/ds/")
    monkeypatch.chdir(tmp_path)
    units = plan_read_units("ds")
    assert all(os.path.isabs(u.url) for u in units)  # Ray workers do not share our cwd
    assert (
        [r.as_dict() for r in by_path]
        == [r.as_dict() for r in by_url]
        == [r.as_dict() for r in rows_of("ds")]
    )


def test_s3_dataset(s3_endpoint, tmp_path):
    import s3fs

    bucket = make_bucket(s3_endpoint)
    opts = storage_options(s3_endpoint)
    make_dataset(tmp_path / "ds")
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint)
    fs.put(str(tmp_path / "ds") + "/", f"{bucket}/in/ds/", recursive=True)
    local = rows_of(str(tmp_path / "ds"))
    remote = rows_of(f"s3://{bucket}/in/ds", options=opts)
    assert [r.as_dict() for r in remote] == [r.as_dict() for r in local]
    units = plan_read_units(f"s3://{bucket}/in/ds", opts)
    assert units[0].url == f"s3://{bucket}/in/ds/lang=en/size=64/part-0.parquet"
    assert check_unique_ids(f"s3://{bucket}/in/ds", opts) == 5
    with pytest.raises(PromptTableError, match="no such file"):
        plan_read_units(f"s3://{bucket}/in/missing.parquet", opts)
    fs.pipe(f"{bucket}/in/bad.parquet", b"not parquet at all")
    with pytest.raises(PromptTableError, match="not a readable Parquet"):
        plan_read_units(f"s3://{bucket}/in/bad.parquet", opts)


# ------------------------------------------------------------------ units and batches


def test_read_unit_roundtrips_through_dict_and_pickle(tmp_path):
    make_dataset(tmp_path / "ds")
    for u in plan_read_units(str(tmp_path / "ds")):
        assert ReadUnit.from_dict(u.as_dict()) == u
        assert pickle.loads(pickle.dumps(u)) == u
        assert read_unit(ReadUnit.from_dict(u.as_dict())).equals(read_unit(u))


def test_prompts_table_for_command_line_prompts():
    rows = resolve_rows(prompts_table(["a cat", " "], negative_prompt="blurry"), D)
    assert [r.id for r in rows] == ["prompt0000", "prompt0001"]
    assert rows[0].negative_prompt == "blurry" and rows[0].error is None
    assert "prompt: empty" in rows[1].error
    assert rows[0].position == "prompt#0"


PASSTHROUGH = {
    "score": pa.array([math.nan], pa.float64()),
    "tags": pa.array([["x", "y"]], pa.list_(pa.string())),
    "blob": pa.array([b"\x01\x02"], pa.binary()),
    "meta": pa.array([{"k": 1}], pa.struct([("k", pa.int64())])),
    "when": pa.array([1_700_000_000_000_000], pa.timestamp("us", tz="UTC")),
}


def test_passthrough_columns_keep_their_values_and_types(tmp_path):
    url = write(tmp_path / "t.parquet", {"prompt": ["a"], **PASSTHROUGH})
    plan = plan_table(url)
    assert plan.passthrough == pa.schema([(k, v.type) for k, v in PASSTHROUGH.items()])
    (r,) = rows_of(url)
    table = work_rows_to_table([r], plan.passthrough)
    for name, col in PASSTHROUGH.items():
        assert table.column(name).combine_chunks().equals(col) or name == "score"  # NaN != NaN
    assert math.isnan(r.passthrough["score"]) and r.passthrough["tags"] == ["x", "y"]
    assert r.passthrough["blob"] == b"\x01\x02" and r.passthrough["meta"] == {"k": 1}


def test_files_of_a_table_agree_on_passthrough_types(tmp_path):
    write(tmp_path / "ds" / "a.parquet", {"prompt": ["a"], "tag": pa.array([1], pa.int64())})
    write(tmp_path / "ds" / "b.parquet", {"prompt": ["b"], "tag": pa.array([None], pa.null())})
    write(tmp_path / "ds" / "c.parquet", {"prompt": ["c"]})  # missing: null in its rows
    assert plan_table(str(tmp_path / "ds")).passthrough == pa.schema([("tag", pa.int64())])
    write(tmp_path / "ds" / "d.parquet", {"prompt": ["d"], "tag": ["x"]})
    with pytest.raises(
        PromptTableError, match=r"column `tag` has type int64 in a.parquet but string in d.parquet"
    ):
        plan_table(str(tmp_path / "ds"))


def test_unreadable_file_is_a_job_level_error(tmp_path):
    url = write(tmp_path / "t.parquet", {"prompt": ["a"]})
    os.chmod(url, 0)
    try:
        if os.access(url, os.R_OK):
            pytest.skip("running as a user that ignores file permissions")
        with pytest.raises(PromptTableError, match="permission denied"):
            plan_read_units(url)
    finally:
        os.chmod(url, 0o644)
