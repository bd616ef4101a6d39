"""The torch-free safetensors reader/writer: format compatibility, slicing, sharding, errors."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sd3_core.safetensors_io import (
    SafetensorsFile,
    WeightsFileError,
    open_weights,
    write_safetensors,
)


@pytest.fixture
def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(7, dtype=np.int64),
        "u8": np.arange(3, dtype=np.uint8),
        "flag": np.array([True, False]),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_written_file_is_read_by_the_reference_library(tmp_path, tensors):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v)
    # data section starts 8-byte aligned, like files written by PyTorch's safetensors
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 8 == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "w.safetensors"], "temporary file left behind"


def test_reads_files_from_the_reference_library(tmp_path, tensors):
    path = tmp_path / "ref.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert sorted(f.keys()) == sorted(tensors)
    assert f.metadata == {"format": "pt"}
    for k, v in tensors.items():
        assert f.shape(k) == v.shape
        assert f.dtype(k) == v.dtype
        assert np.array_equal(f.get(k), v)
    assert f.dtype("bf16") == np.dtype(ml_dtypes.bfloat16)


def test_get_slice_returns_only_the_requested_rows_and_columns(tmp_path):
    big = np.arange(60, dtype=np.float32).reshape(6, 10)
    write_safetensors(tmp_path / "s.safetensors", {"w": big})
    f = SafetensorsFile(tmp_path / "s.safetensors")
    part = f.get_slice("w", (slice(2, 4), slice(5, 10)))
    assert np.array_equal(part, big[2:4, 5:10])
    assert part.flags.writeable and part.flags.c_contiguous


def test_truncated_file_names_the_file(tmp_path, tensors):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(WeightsFileError, match=r"t\.safetensors.*truncated"):
        SafetensorsFile(path)
    path.write_bytes(data[:5])
    with pytest.raises(WeightsFileError, match=r"t\.safetensors.*truncated"):
        SafetensorsFile(path)
    path.write_bytes(data[:40])  # header cut off
    with pytest.raises(WeightsFileError, match=r"t\.safetensors"):
        SafetensorsFile(path)


def _raw_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unsupported dtype 'Q7'"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "corrupt header entry"),
        ({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "corrupt header entry"),
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ],
)
def test_corrupt_header_entries_are_reported(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _raw_file(path, header, data)
    with pytest.raises(WeightsFileError, match=message) as info:
        SafetensorsFile(path)
    assert "bad.safetensors" in str(info.value)


def test_garbage_header_is_reported(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 6) + b"{nope}" + b"\0" * 8)
    with pytest.raises(WeightsFileError, match=r"junk\.safetensors.*corrupt"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(WeightsFileError, match=r"junk\.safetensors"):
        SafetensorsFile(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(WeightsFileError, match="not found"):
        SafetensorsFile(tmp_path / "absent.safetensors")
    with pytest.raises(WeightsFileError, match="neither model.safetensors nor"):
        open_weights(tmp_path, "model.safetensors")


def test_open_weights_single_and_sharded(tmp_path, tensors):
    write_safetensors(tmp_path / "single" / "m.safetensors", tensors)
    single = open_weights(tmp_path / "single", "m.safetensors")
    assert sorted(single) == sorted(tensors)

    shard_dir = tmp_path / "sharded"
    names = sorted(tensors)
    halves = {"m-00001-of-00002.safetensors": names[:3], "m-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for fname, keys in halves.items():
        write_safetensors(shard_dir / fname, {k: tensors[k] for k in keys})
        weight_map.update(dict.fromkeys(keys, fname))
    (shard_dir / "m.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    index = open_weights(shard_dir, "m.safetensors")
    assert sorted(index) == names
    for k, v in tensors.items():
        assert np.array_equal(index.get(k), v)
        assert index.file_of(k).name == weight_map[k]


def test_shard_index_pointing_at_the_wrong_file_is_reported(tmp_path, tensors):
    write_safetensors(tmp_path / "a.safetensors", {"f32": tensors["f32"]})
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"i64": "a.safetensors"}}))
    with pytest.raises(WeightsFileError, match="'i64'.*a.safetensors"):
        open_weights(tmp_path, "m.safetensors")
    (tmp_path / "m.safetensors.index.json").write_text("{not json")
    with pytest.raises(WeightsFileError, match="index.json: corrupt shard index"):
        open_weights(tmp_path, "m.safetensors")


def test_unstorable_dtype_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'c'.*complex64"):
        write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})
