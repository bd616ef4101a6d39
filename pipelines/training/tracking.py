"""Experiment tracking for training jobs: wandb, offline unless the user configured otherwise.

``WANDB_MODE`` defaults to ``offline`` (no account, no network): the run lands in
``<dir>/wandb/offline-run-*/`` and can be pushed later with ``wandb sync``. A user who sets
``WANDB_MODE=online`` (and is logged in) gets an online run instead.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

REPORTERS = ("wandb", "none", "tensorboard", "all")


class Tracker:
    """Logs scalars and images for one training run (a no-op unless ``report_to`` names wandb)."""

    def __init__(
        self,
        report_to: str | None,
        log_dir: str,
        project: str,
        config: Mapping[str, Any],
        name: str | None = None,
    ):
        self.run = None
        self.log_dir = log_dir
        report_to = report_to or "none"
        if report_to not in REPORTERS:
            raise ValueError(f"report_to={report_to!r} is not one of {REPORTERS}")
        if report_to == "tensorboard":
            log.warning(
                "report_to=tensorboard is not supported here; metrics go nowhere (use --report_to wandb)"
            )
        if report_to not in ("wandb", "all"):
            return
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        os.makedirs(log_dir, exist_ok=True)
        self.run = wandb.init(
            project=project, dir=log_dir, config=dict(config), name=name, reinit="create_new"
        )

    @property
    def run_dir(self) -> str | None:
        """The run's own folder (``.../wandb/offline-run-*``), or None without wandb."""
        return os.path.dirname(self.run.dir) if self.run is not None else None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_images(self, key: str, images: Sequence[Any], caption: str, step: int) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log(
            {key: [wandb.Image(im, caption=f"{i}: {caption}") for i, im in enumerate(images)]}, step=step
        )

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


# ---- reading an offline run back (tests, and a quick look without wandb's servers) -------------


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
