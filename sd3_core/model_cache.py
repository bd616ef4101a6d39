"""Model folders for replicas: a local folder is used as is; an object-storage prefix is downloaded
once per node into a local cache; a Hugging Face Hub id (``org/name``) is resolved through this
node's Hugging Face cache (``sd3_core.hub``: huggingface_hub's own cache, HF_HUB_OFFLINE, HF_TOKEN).

The download happens under a file lock (so concurrent actors on one node download once) into a
temporary sibling folder that is renamed into place when complete (so nobody ever sees half a
model). The cache folder's existence is the "complete" marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from typing import Any

from sd3_core.hub import hub_commit, is_hub_id, model_folder
from sd3_core.storage import StorageOptions, get_fs, normalize_url, split_url

log = logging.getLogger(__name__)

CACHE_ENV = "SD3_RAY_MODEL_CACHE"
INFO_NAME = ".sd3-ray-download.json"


def default_cache_dir() -> str:
    """`$SD3_RAY_MODEL_CACHE`, else `~/.cache/sd3-ray/models`."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sd3-ray", "models")


def cache_path(uri: str, cache_dir: str | None = None) -> str:
    """The local folder an object-storage model `uri` is cached in."""
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:20]
    return os.path.join(cache_dir or default_cache_dir(), digest)


def local_model_path(
    uri: str,
    options: StorageOptions | None = None,
    cache_dir: str | None = None,
    lock_timeout: float = -1,
) -> str:
    """A local folder holding the model at `uri` (downloading it once per node when remote)."""
    if is_hub_id(uri):
        return hub_model_path(uri)
    scheme, path = split_url(uri)
    if scheme == "":
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model {uri}: no such folder")
        return path
    uri = normalize_url(uri).rstrip("/")
    dest = cache_path(uri, cache_dir)
    if os.path.isdir(dest):
        return dest
    from filelock import FileLock

    os.makedirs(os.path.dirname(dest), exist_ok=True)
    lock = FileLock(dest + ".lock", timeout=lock_timeout)
    t0 = time.monotonic()
    with lock:
        if os.path.isdir(dest):  # another process finished it while we waited
            log.info("model %s: cached by another process (waited %.1fs)", uri, time.monotonic() - t0)
            return dest
        _remove_stale_temps(dest)  # leftovers of a killed download (we hold the lock: nobody else writes)
        tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _download(uri, tmp, options)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def hub_model_path(repo_id: str, configs_only: bool = False) -> str:
    """This node's snapshot of Hub model `repo_id` with the files the pipeline loads (fetched into the
    Hugging Face cache when missing), or with only its JSON files (what the job's driver reads)."""
    from sd3_core.folder_layout import pipeline_files  # loads Paddle: only Hub ids need it

    patterns = pipeline_files()
    if configs_only:
        patterns = [p for p in patterns if p.endswith(".json")]
    return model_folder(repo_id, allow_patterns=patterns)


def _remove_stale_temps(dest: str) -> None:
    parent, name = os.path.split(dest)
    for entry in os.listdir(parent):
        if entry.startswith(name + ".tmp-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _download(uri: str, target: str, options: StorageOptions | None) -> None:
    """Copy every object under `uri` into the new folder `target` (s3fs fetches them concurrently)."""
    fs, root = get_fs(uri, options)
    root = root.rstrip("/")
    files = sorted(p for p in fs.find(root) if p != root)
    rels = [p[len(root) :].lstrip("/") for p in files]
    if "model_index.json" not in rels:
        raise FileNotFoundError(
            f"model {uri}: no model_index.json under this prefix (is it a diffusers folder?)"
        )
    total = sum(fs.info(p).get("size", 0) or 0 for p in files)
    log.info("downloading model %s (%d files, %.1f MB) to %s", uri, len(files), total / 1e6, target)
    t0 = time.monotonic()
    locals_ = [os.path.join(target, *rel.split("/")) for rel in rels]
    for d in {os.path.dirname(p) for p in locals_}:
        os.makedirs(d, exist_ok=True)
    fs.get(files, locals_)
    missing = [r for r, p in zip(rels, locals_, strict=True) if not os.path.isfile(p)]
    if missing:
        raise OSError(f"model {uri}: download incomplete, missing {missing[:5]}")
    with open(os.path.join(target, INFO_NAME), "w") as f:
        json.dump(
            {
                "uri": uri,
                "files": len(files),
                "bytes": total,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "seconds": round(time.monotonic() - t0, 3),
                "time": time.time(),
            },
            f,
        )
    log.info("model %s downloaded in %.1fs", uri, time.monotonic() - t0)


def model_identity(path: str, uri: str | None = None, fs: Any = None) -> str:
    """`{uri}#sha256:{16 hex}` hashing model_index.json and every config JSON of the folder `path`
    (on fsspec filesystem `fs`, default local), so a manifest says which model (and configuration)
    made an image without hashing the weights. The same folder gives the same identity locally and
    through s3://: files are hashed in os.walk order (a folder's files, then its sorted subfolders).
    A Hub id's snapshot is `{id}@{commit}` (the commit pins every file)."""
    import fsspec

    commit = hub_commit(path) if uri is not None and is_hub_id(uri) else None
    if commit is not None:
        return f"{uri}@{commit}"

    fs = fs or fsspec.filesystem("file")
    root = fs._strip_protocol(path).rstrip("/")
    rels = [f[len(root) + 1 :] for f in fs.find(root)]
    wanted = [r for r in rels if _is_identity_file(r.rsplit("/", 1)[-1])]
    h = hashlib.sha256()
    for rel in sorted(wanted, key=_walk_order):
        h.update(rel.encode() + b"\0")
        h.update(fs.cat_file(f"{root}/{rel}"))
        h.update(b"\0")
    return f"{uri or path}#sha256:{h.hexdigest()[:16]}"


def _is_identity_file(name: str) -> bool:
    return name.endswith(".json") and name != INFO_NAME and ("config" in name or name == "model_index.json")


def _walk_order(rel: str) -> tuple:
    """Sort key putting a folder's files (sorted) before its subfolders (sorted), as os.walk does."""
    *folders, name = rel.split("/")
    return (*((1, d) for d in folders), (0, name))
