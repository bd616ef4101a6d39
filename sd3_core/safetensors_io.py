"""Reading and writing safetensors files without torch.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets"}`` (offsets relative to the end of the header) plus an
optional ``"__metadata__"`` dict of strings, then the raw little-endian tensor bytes. Files
are memory-mapped so a tensor (or a slice of one, for tensor parallelism) is read only when
asked for.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = [
    "FLOAT8_DTYPES",
    "SafetensorsFile",
    "WeightsFileError",
    "WeightsIndex",
    "open_weights",
    "write_safetensors",
    "DTYPE_FROM_CODE",
]

# safetensors dtype code -> numpy dtype (always little-endian in the file).
DTYPE_FROM_CODE: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    # 8-bit floats (torch.float8_e4m3fn / float8_e5m2), e.g. the fp8 T5 of published SD3 files.
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_CODE_FROM_DTYPE = {v: k for k, v in DTYPE_FROM_CODE.items()}
#: Storage-only dtypes: no framework computes in them here; loaders upcast them to float32.
FLOAT8_DTYPES = frozenset({DTYPE_FROM_CODE["F8_E4M3"], DTYPE_FROM_CODE["F8_E5M2"]})

# The reference implementation refuses headers above 100 MB; a larger value means garbage.
_MAX_HEADER_BYTES = 100_000_000


class WeightsFileError(ValueError):
    """A weights file (or shard index) is missing, corrupt or truncated."""


class SafetensorsFile:
    """A memory-mapped, read-only view of one ``.safetensors`` file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise WeightsFileError(
                        f"{self.path}: truncated safetensors file ({size} bytes, no header)"
                    )
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > min(_MAX_HEADER_BYTES, size - 8):
                    raise WeightsFileError(
                        f"{self.path}: corrupt or truncated safetensors header (declares {header_len} header "
                        f"bytes, file has {size})"
                    )
                raw_header = f.read(header_len)
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        except FileNotFoundError:
            raise WeightsFileError(f"{self.path}: weights file not found") from None
        except OSError as e:
            raise WeightsFileError(f"{self.path}: cannot read weights file ({e})") from e
        try:
            header = json.loads(raw_header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsFileError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise WeightsFileError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_len = size - self._data_start
        for name, info in header.items():
            self._entries[name] = self._check_entry(name, info, data_len)

    def _check_entry(
        self, name: str, info: object, data_len: int
    ) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            code, shape, (start, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
        except (TypeError, KeyError, ValueError) as e:
            raise WeightsFileError(f"{self.path}: corrupt header entry for tensor {name!r} ({e!r})") from None
        if code not in DTYPE_FROM_CODE:
            raise WeightsFileError(
                f"{self.path}: tensor {name!r} has unsupported dtype {code!r} "
                f"(supported: {', '.join(DTYPE_FROM_CODE)})"
            )
        dtype = DTYPE_FROM_CODE[code]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if any(d < 0 for d in shape) or not (0 <= start <= end) or end - start != nbytes:
            raise WeightsFileError(
                f"{self.path}: corrupt header entry for tensor {name!r}: shape {list(shape)} {code} needs "
                f"{nbytes} bytes, data_offsets are [{start}, {end}]"
            )
        if end > data_len:
            raise WeightsFileError(
                f"{self.path}: truncated file: tensor {name!r} ends at byte {end} of the data section, "
                f"which has only {data_len} bytes"
            )
        return dtype, shape, self._data_start + start, nbytes

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> np.dtype:
        return self._entry(key)[0]

    def get(self, key: str) -> np.ndarray:
        """The whole tensor as a read-only array backed by the memory map (no copy)."""
        dtype, shape, offset, nbytes = self._entry(key)
        if nbytes == 0:
            return np.zeros(shape, dtype)
        return np.frombuffer(self._mmap, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(
            shape
        )

    def get_slice(self, key: str, index) -> np.ndarray:
        """``tensor[index]`` as a new array; only the touched pages of the file are read."""
        # Basic indexing on the mmap-backed view is lazy: numpy computes strides, and the copy
        # below faults in just the rows (and, within rows, the columns) that were selected.
        return np.array(self.get(key)[index], copy=True)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # arrays still reference the map; it is freed with them
                pass

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"


class WeightsIndex(Mapping):
    """Tensor name -> the file holding it, over a single file or a sharded set."""

    def __init__(self, files: Mapping[str, SafetensorsFile], weight_map: Mapping[str, str], source: str):
        self.files = dict(files)
        self.weight_map = dict(weight_map)
        self.source = source

    def __getitem__(self, key: str) -> SafetensorsFile:
        return self.files[self.weight_map[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def file_of(self, key: str) -> Path:
        return self[key].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self[key].dtype(key)

    def get(self, key: str) -> np.ndarray:  # type: ignore[override]
        return self[key].get(key)

    def get_slice(self, key: str, index) -> np.ndarray:
        return self[key].get_slice(key, index)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __repr__(self) -> str:
        return f"WeightsIndex({self.source!r}, {len(self)} tensors in {len(self.files)} file(s))"


def open_weights(folder: str | os.PathLike, weights_name: str) -> WeightsIndex:
    """Open ``folder/weights_name``, or its shards via ``<stem>.safetensors.index.json``."""
    folder = Path(folder)
    single = folder / weights_name
    index_path = folder / f"{weights_name}.index.json"
    if single.is_file():
        f = SafetensorsFile(single)
        return WeightsIndex({single.name: f}, {k: single.name for k in f.keys()}, str(single))
    if not index_path.is_file():
        raise WeightsFileError(f"{folder}: neither {weights_name} nor {index_path.name} exists")
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise WeightsFileError(f"{index_path}: corrupt shard index ({e!r})") from None
    files = {}
    for shard in sorted(set(weight_map.values())):
        files[shard] = SafetensorsFile(folder / shard)
    for key, shard in weight_map.items():
        if key not in files[shard]:
            raise WeightsFileError(f"{index_path}: maps tensor {key!r} to {shard}, which does not contain it")
    return WeightsIndex(files, weight_map, str(index_path))


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` in the safetensors format readable by PyTorch's ``safetensors``.

    Written to a temporary file in the same folder and renamed, so readers never see a
    partial file.
    """
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):  # the reference writer orders by name; keeps files reproducible
        arr = np.asarray(tensors[name])
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        code = _CODE_FROM_DTYPE.get(np.dtype(dtype))
        if code is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {arr.dtype}, which safetensors cannot store")
        arr = np.ascontiguousarray(arr, dtype=dtype)
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        arrays.append(arr)
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as the reference writer does
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for arr in arrays:
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
