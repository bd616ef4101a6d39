"""Reading an offline wandb run back without wandb's servers: the history rows of its `.wandb` file."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any


def _log_records(raw: bytes):
    # A .wandb file: a 7-byte header, then LevelDB log records in 32 KiB blocks
    # (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last).
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        data = raw[pos : pos + length]
        pos += length
        if kind == 1:
            yield data
        elif kind == 2:
            buf = data
        elif kind == 3:
            buf += data
        elif kind == 4:
            yield buf + data


def read_offline_history(run_dir: str) -> list[dict[str, Any]]:
    """The history rows (``run.log`` calls) stored in an offline run's ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(os.path.join(run_dir, "*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no .wandb file (not a wandb run folder?)")
    rows = []
    with open(files[0], "rb") as f:
        raw = f.read()
    for data in _log_records(raw):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            )
    return rows
