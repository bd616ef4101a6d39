"""Training checkpoints in a local folder or under an object-storage prefix: saving a run, resuming it.

``OUTPUT/checkpoint-<step>/`` holds the trainable weights (LoRA: ``pytorch_lora_weights.safetensors``;
full fine-tune: ``transformer/`` in diffusers layout), ``optimizer.safetensors`` (AdamW moments
keyed by parameter name) and ``training_state.json`` (step, optimizer counters, loss scaler, lr
schedule, and what the data order depends on). No pickles anywhere.

A checkpoint is complete once ``training_state.json`` exists, and it is always written last:
locally the whole folder is built beside the output and renamed into place; on object storage
every other file is uploaded first. ``latest`` resolves to the complete checkpoint with the
highest step, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from pipelines.training.model import TrainModels
from pipelines.training.optim import AdamW, LossScaler
from sd3_core.safetensors_io import SafetensorsFile, write_safetensors
from sd3_core.storage import (
    StorageOptions,
    exists,
    get_fs,
    join_url,
    read_bytes,
    split_url,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)

STATE_NAME = "training_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def list_checkpoints(output: str, options: StorageOptions | None = None) -> list[tuple[int, str]]:
    """``(step, url)`` of the complete checkpoints under ``output``, by step."""
    fs, path = get_fs(output, options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for e in entries:
        name = os.path.basename(e["name"].rstrip("/"))
        m = _CHECKPOINT_RE.match(name)
        if m and e.get("type") == "directory":
            url = join_url(output, name)
            if exists(join_url(url, STATE_NAME), options):
                found.append((int(m.group(1)), url))
    return sorted(found)


def resolve_checkpoint(output: str, which: str, options: StorageOptions | None = None) -> str | None:
    """The checkpoint URL for ``latest`` (None when there is none yet), ``checkpoint-<N>`` under
    ``output``, or a checkpoint folder's own path/URL."""
    if which == "latest":
        found = list_checkpoints(output, options)
        return found[-1][1] if found else None
    url = join_url(output, which) if _CHECKPOINT_RE.match(which) else which
    if not exists(join_url(url, STATE_NAME), options):
        have = [os.path.basename(u) for _, u in list_checkpoints(output, options)]
        raise FileNotFoundError(
            f"resume_from_checkpoint={which!r}: {url} is not a complete checkpoint (no {STATE_NAME}); "
            f"complete checkpoints in {output}: {have or 'none'}"
        )
    return url


def read_state(checkpoint: str, options: StorageOptions | None = None) -> dict:
    return json.loads(read_bytes(join_url(checkpoint, STATE_NAME), options))


def publish_folder(
    local: str | Path, url: str, options: StorageOptions | None = None, last: str | None = STATE_NAME
) -> str:
    """Put the contents of the local folder ``local`` at ``url`` with the file ``last`` written last.

    Locally the folder is moved into place whole (after removing an older folder of that name);
    on object storage each file is one upload, ``last`` after all others."""
    local = Path(local)
    scheme, path = split_url(url)
    if scheme == "":
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        staging = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.copytree(local, staging)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
        return url
    fs, _ = get_fs(url, options)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(local).as_posix() == last)  # `last` goes last
    for file in files:
        rel = file.relative_to(local).as_posix()
        if rel == last:
            write_bytes_atomic(join_url(url, rel), file.read_bytes(), options)
        else:
            fs.put_file(str(file), f"{path}/{rel}")
    return url


def fetch_folder(url: str, options: StorageOptions | None = None) -> str:
    """A local folder with the contents of ``url`` (the folder itself when local; a temporary copy otherwise)."""
    scheme, path = split_url(url)
    if scheme == "":
        return path
    fs, _ = get_fs(url, options)
    dest = tempfile.mkdtemp(prefix="sd3-checkpoint-")
    for remote in fs.find(path):
        rel = remote[len(path) :].lstrip("/")
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(remote, target)
    return dest


def remove_folder(url: str, options: StorageOptions | None = None) -> None:
    fs, path = get_fs(url, options)
    # Remove the completeness marker first: a half-deleted checkpoint is then never picked up.
    marker = f"{path}/{STATE_NAME}"
    if fs.exists(marker):
        fs.rm_file(marker)
    fs.rm(path, recursive=True)


def prune(output: str, keep: int | None, options: StorageOptions | None = None) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints; returns the removed URLs."""
    if not keep:
        return []
    found = list_checkpoints(output, options)
    doomed = [url for _, url in found[:-keep]] if len(found) > keep else []
    for url in doomed:
        remove_folder(url, options)
    return doomed


# ---- saving and resuming a run ---------------------------------------------------------------------


def save_checkpoint(
    output: str,
    step: int,
    state: dict[str, Any],
    models: TrainModels,
    optimizer: AdamW,
    options: StorageOptions | None = None,
    keep: int | None = None,
) -> str:
    """Write ``OUTPUT/checkpoint-<step>/`` (weights, optimizer moments, ``state`` as
    ``training_state.json``, last), then prune to the newest ``keep``; returns its URL."""
    url = join_url(output, checkpoint_name(step))
    with tempfile.TemporaryDirectory(prefix="sd3-ckpt-") as tmp:
        folder = Path(tmp)
        models.write_weights(folder)
        write_safetensors(folder / OPTIMIZER_NAME, optimizer.state_tensors(), {"format": "sd3-ray-adamw"})
        (folder / STATE_NAME).write_text(json.dumps(state, indent=2, sort_keys=True))
        publish_folder(folder, url, options)
    for removed in prune(output, keep, options):
        log.info("removed old checkpoint %s", removed)
    return url


def load_checkpoint(
    url: str,
    now: dict[str, Any],
    models: TrainModels,
    optimizer: AdamW,
    scaler: LossScaler,
    options: StorageOptions | None = None,
) -> int:
    """Restore the weights, optimizer and loss scaler saved at ``url``; returns its step.

    ``now``: this run's state; a checkpoint whose data order or mode differ is refused."""
    state = read_state(url, options)
    want = now["order"]
    diff = {k: (state["order"].get(k), v) for k, v in want.items() if state["order"].get(k) != v}
    if state.get("mode") != now["mode"]:
        diff["mode"] = (state.get("mode"), now["mode"])
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"cannot resume from {url}: the run differs in what the data order and state depend on ({detail}); "
            "resume with the same settings and data, or start a fresh --output_dir"
        )
    local = fetch_folder(url, options)
    models.load_weights(local, url)
    with SafetensorsFile(Path(local) / OPTIMIZER_NAME) as f:
        tensors = {k: f.get(k) for k in f.keys()}
    optimizer.load_state(tensors, state["optimizer"])
    scaler.load_state_dict(state["loss_scaler"])
    return int(state["global_step"])
