"""A registry of LoRA adapters under one folder or object-storage prefix.

Layout (``REGISTRY`` a local folder or ``s3://bucket/prefix``)::

    REGISTRY/<version>/pytorch_lora_weights.safetensors
    REGISTRY/<version>/adapter.json     # what was trained (base model, steps, rank, sha256)
    REGISTRY/latest                     # text: the newest published version

A version is complete once its ``adapter.json`` exists (written after the weights), and
``latest`` is written after that, so a reader following ``latest`` never meets a half-published
adapter. Consumers name an adapter as ``REGISTRY`` (its latest version) or ``REGISTRY:VERSION``
and call :func:`resolve_lora` for a local file path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from typing import Any

from jobs.storage import StorageOptions, exists, join_url, read_bytes, split_url, write_bytes_atomic

WEIGHTS = "pytorch_lora_weights.safetensors"
INFO = "adapter.json"
LATEST = "latest"
CACHE_ENV = "SD3_RAY_LORA_CACHE"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"LoRA version {version!r}: use letters, digits, '.', '_' or '-' (e.g. 2026-11-26)")
    return version


def is_published(registry: str, version: str, options: StorageOptions | None = None) -> bool:
    return exists(join_url(registry, check_version(version), INFO), options)


def publish(
    weights_url: str,
    registry: str,
    version: str,
    options: StorageOptions | None = None,
    info: dict[str, Any] | None = None,
) -> str:
    """Copy a LoRA file into ``REGISTRY/<version>/`` and point ``latest`` at it (written last)."""
    check_version(version)
    data = read_bytes(weights_url, options)
    folder = join_url(registry, version)
    write_bytes_atomic(join_url(folder, WEIGHTS), data, options)
    meta = {
        "version": version,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "source": weights_url,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(info or {}),
    }
    write_bytes_atomic(join_url(folder, INFO), json.dumps(meta, indent=2, sort_keys=True).encode(), options)
    write_bytes_atomic(join_url(registry, LATEST), (version + "\n").encode(), options)
    return folder


def split_ref(ref: str) -> tuple[str, str | None]:
    """``REGISTRY[:VERSION]`` -> (registry, version or None). A colon only separates a version when
    what follows it has no '/' (so ``s3://bucket/x`` and ``C:\\`` paths stay whole)."""
    head, sep, tail = ref.rpartition(":")
    if (
        sep
        and head
        and tail
        and "/" not in tail
        and "\\" not in tail
        and not head.endswith(("s3", "s3a", "file"))
    ):
        if len(head) == 1:  # a Windows drive letter, not a version
            return ref, None
        return head, tail
    return ref, None


def latest_version(registry: str, options: StorageOptions | None = None) -> str:
    try:
        text = read_bytes(join_url(registry, LATEST), options).decode().strip()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"LoRA registry {registry}: no `latest` pointer (nothing published yet?)"
        ) from None
    return check_version(text)


def resolve_lora(ref: str, options: StorageOptions | None = None, cache_dir: str | None = None) -> str:
    """A local path to the LoRA file that ``ref`` names.

    ``ref`` is ``REGISTRY`` (its ``latest`` version), ``REGISTRY:VERSION``, or a LoRA file / a
    folder holding ``pytorch_lora_weights.safetensors`` (local or remote). Remote files are
    downloaded once into ``$SD3_RAY_LORA_CACHE`` (default ``~/.cache/sd3-ray/loras``), keyed by
    their URL and content hash, so every actor on a node reads the same verified copy.
    """
    base, version = split_ref(ref)
    scheme, path = split_url(base)
    if version is None:
        if base.endswith(".safetensors"):
            url = base
        elif exists(join_url(base, LATEST), options):
            version = latest_version(base, options)
            url = join_url(base, version, WEIGHTS)
        elif exists(join_url(base, WEIGHTS), options):
            url = join_url(base, WEIGHTS)
        else:
            raise FileNotFoundError(
                f"LoRA {ref}: neither a registry (no {LATEST}), a folder with {WEIGHTS}, nor a .safetensors file"
            )
    else:
        if not is_published(base, version, options):
            raise FileNotFoundError(f"LoRA {ref}: version {version!r} is not published in registry {base}")
        url = join_url(base, version, WEIGHTS)
    if split_url(url)[0] == "":
        local = split_url(url)[1]
        if not os.path.isfile(local):
            raise FileNotFoundError(f"LoRA {ref}: {local} does not exist")
        return local
    return _cached_copy(url, options, cache_dir)


def _cached_copy(url: str, options: StorageOptions | None, cache_dir: str | None) -> str:
    root = (
        cache_dir
        or os.environ.get(CACHE_ENV)
        or os.path.join(os.path.expanduser("~"), ".cache", "sd3-ray", "loras")
    )
    data = read_bytes(url, options)
    digest = hashlib.sha256(data).hexdigest()
    dest = os.path.join(root, hashlib.sha256(url.encode()).hexdigest()[:16], digest[:16], WEIGHTS)
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    return dest
