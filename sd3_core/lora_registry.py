"""A registry of LoRA adapters under one folder or object-storage prefix.

Layout (``REGISTRY`` a local folder or ``s3://bucket/prefix``)::

    REGISTRY/<version>/pytorch_lora_weights.safetensors
    REGISTRY/<version>/adapter.json     # what was trained (base model, steps, rank, sha256)
    REGISTRY/latest                     # text: the newest published version

A version is complete once its ``adapter.json`` exists (written after the weights), and
``latest`` is written after that, so a reader following ``latest`` never meets a half-published
adapter. Consumers name an adapter as ``REGISTRY`` (its latest version) or ``REGISTRY:VERSION``
and call :func:`resolve_lora` for a local file path. A batch job calls :func:`pin_lora` once, on
its driver, and every replica :func:`fetch_lora` with the result, so all of them render with the
same bytes even if ``latest`` moves meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sd3_core.storage import (
    StorageOptions,
    exists,
    get_fs,
    join_url,
    normalize_url,
    read_bytes,
    split_url,
    write_bytes_atomic,
)

WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's save_pretrained
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


class LoRARefError(FileNotFoundError):
    """A LoRA reference that names no adapter; ``reason`` says why without repeating ``ref``."""

    def __init__(self, ref: str, reason: str) -> None:
        super().__init__(f"LoRA {ref}: {reason}")
        self.ref, self.reason = ref, reason


@dataclass(frozen=True)
class PinnedLoRA:
    """One adapter file, named so that it cannot move: its URL and the sha256 of its bytes.

    ``ref`` is the reference as given; ``registry``/``version`` are set when it named a registry
    (``url`` is then that version's weights, whatever ``latest`` says later). ``peft_config`` is
    the text of ``adapter_config.json`` when ``ref`` named a peft adapter folder (its alpha is
    part of the adapter, so it is pinned too, with ``peft_config_sha256``)."""

    ref: str
    url: str
    sha256: str
    size: int
    registry: str | None = None
    version: str | None = None
    peft_config: str | None = None
    peft_config_sha256: str | None = None

    @property
    def pinned_ref(self) -> str:
        """A reference to exactly this adapter: ``REGISTRY:VERSION``, a peft folder's URL, else
        the file's URL."""
        if self.registry is not None:
            return f"{self.registry}:{self.version}"
        return self.url.rpartition("/")[0] if self.peft_config is not None else self.url

    @property
    def identity(self) -> str:
        """``{pinned_ref}#sha256:{hex}`` (a peft folder's adds ``+{PEFT_CONFIG}:{hex}``): what a
        manifest records as the adapter of an image."""
        config = f"+{PEFT_CONFIG}:{self.peft_config_sha256}" if self.peft_config is not None else ""
        return f"{self.pinned_ref}#sha256:{self.sha256}{config}"


def locate_lora(ref: str, options: StorageOptions | None = None) -> tuple[str, str | None, str | None]:
    """``(weights URL, registry, version)`` that ``ref`` names now (``latest`` is read once);
    registry and version are None unless ``ref`` names a registry. :class:`LoRARefError` when
    ``ref`` names nothing."""
    base, version = split_ref(ref)
    base = normalize_url(base)  # absolute: replicas do not share this process's working directory
    if version is not None:
        if not is_published(base, version, options):
            raise LoRARefError(ref, f"version {version!r} is not published in registry {base}")
        return join_url(base, version, WEIGHTS), base, version
    if base.endswith(".safetensors"):
        return base, None, None
    if exists(join_url(base, LATEST), options):
        version = latest_version(base, options)
        return join_url(base, version, WEIGHTS), base, version
    for name in (WEIGHTS, PEFT_WEIGHTS):
        if exists(join_url(base, name), options):
            return join_url(base, name), None, None
    fs, path = get_fs(base, options)
    if fs.isfile(path):  # a LoRA file under another name
        return base, None, None
    raise LoRARefError(
        ref, f"neither a registry (no {LATEST}), a folder with {WEIGHTS} or {PEFT_WEIGHTS}, nor a file"
    )


def resolve_lora(ref: str, options: StorageOptions | None = None, cache_dir: str | None = None) -> str:
    """A local path to the LoRA file that ``ref`` names.

    ``ref`` is ``REGISTRY`` (its ``latest`` version), ``REGISTRY:VERSION``, or a LoRA file / a
    folder holding ``pytorch_lora_weights.safetensors`` or peft's two files (local or remote; for
    a peft folder the path is a folder). Remote files are downloaded into ``$SD3_RAY_LORA_CACHE``
    (default ``~/.cache/sd3-ray/loras``), keyed by their URL and content hash, so every actor on a
    node reads the same verified copy. A registry version whose weights do not match its
    ``adapter.json`` sha256 is refused (ValueError).
    """
    return fetch_lora(pin_lora(ref, options, cache_dir), options, cache_dir)


def pin_lora(ref: str, options: StorageOptions | None = None, cache_dir: str | None = None) -> PinnedLoRA:
    """Resolve ``ref`` once to the adapter it names now, with the sha256 of its bytes.

    A remote file is downloaded into the cache on the way (so :func:`fetch_lora` on this node
    reads it from there); a registry version's ``adapter.json`` must agree on the sha256."""
    url, registry, version = locate_lora(ref, options)
    scheme, path = split_url(url)
    try:
        if scheme == "":
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            digest, size = _sha256_file(path), os.path.getsize(path)
        else:
            data = read_bytes(url, options)
            digest, size = hashlib.sha256(data).hexdigest(), len(data)
            _store_in_cache(url, data, digest, cache_dir)
    except FileNotFoundError:
        raise LoRARefError(ref, f"{url} does not exist") from None
    if registry is not None:
        recorded = json.loads(read_bytes(join_url(registry, version, INFO), options)).get("sha256")
        if recorded is not None and recorded != digest:
            raise ValueError(
                f"LoRA {ref}: {url} has sha256 {digest}, but its {INFO} says {recorded} (a damaged publish?)"
            )
    config = config_sha256 = None
    if url == join_url(normalize_url(split_ref(ref)[0]), PEFT_WEIGHTS):  # ref named a peft folder
        try:
            config = read_bytes(join_url(url.rpartition("/")[0], PEFT_CONFIG), options).decode()
        except FileNotFoundError:
            pass  # no config: alpha = rank, as the pipeline loads such a folder
        else:
            config_sha256 = hashlib.sha256(config.encode()).hexdigest()
    return PinnedLoRA(ref=ref, url=url, sha256=digest, size=size, registry=registry, version=version,
                      peft_config=config, peft_config_sha256=config_sha256)  # fmt: skip


def fetch_lora(
    pinned: PinnedLoRA, options: StorageOptions | None = None, cache_dir: str | None = None
) -> str:
    """A local path to exactly the bytes ``pinned`` names (downloaded once per node into the
    cache); ValueError if the file no longer has the pinned sha256. For a peft adapter, a folder
    holding its weights and the pinned ``adapter_config.json``."""
    scheme, path = split_url(pinned.url)
    if scheme != "":
        path = _cache_path(pinned.url, pinned.sha256, cache_dir)
        if not os.path.isfile(path):
            data = read_bytes(pinned.url, options)
            _check_digest(pinned, hashlib.sha256(data).hexdigest())
            path = _store_in_cache(pinned.url, data, pinned.sha256, cache_dir)
        else:
            _check_digest(pinned, _sha256_file(path))
    else:
        _check_digest(pinned, _sha256_file(path))
    if pinned.peft_config is None:
        return path
    return _peft_folder(pinned, path, cache_dir)


def _peft_folder(pinned: PinnedLoRA, weights: str, cache_dir: str | None) -> str:
    """A local folder with the verified ``weights`` and the pinned PEFT_CONFIG: a local peft folder
    itself (ValueError if its config changed since pinning), else one made once in the cache."""
    if split_url(pinned.url)[0] == "":
        folder = os.path.dirname(weights)
        config = os.path.join(folder, PEFT_CONFIG)
        if not os.path.isfile(config) or _sha256_file(config) != pinned.peft_config_sha256:
            raise ValueError(
                f"LoRA {pinned.pinned_ref}: {config} is not the {PEFT_CONFIG} the job resolved "
                f"(sha256 {pinned.peft_config_sha256}); it was replaced or removed"
            )
        return folder
    dest = os.path.join(os.path.dirname(weights), f"peft-{pinned.peft_config_sha256[:16]}")
    if not os.path.isdir(dest):
        staging = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(staging)
        shutil.copyfile(weights, os.path.join(staging, PEFT_WEIGHTS))
        with open(os.path.join(staging, PEFT_CONFIG), "w", encoding="utf-8", newline="") as f:
            f.write(pinned.peft_config)
        try:
            os.replace(staging, dest)
        except OSError:  # another actor on this node made it first
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _check_digest(pinned: PinnedLoRA, digest: str) -> None:
    if digest != pinned.sha256:
        raise ValueError(
            f"LoRA {pinned.pinned_ref}: {pinned.url} now has sha256 {digest}, not {pinned.sha256} "
            "as when the job resolved it (the file was replaced)"
        )


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_path(url: str, digest: str, cache_dir: str | None) -> str:
    root = (
        cache_dir
        or os.environ.get(CACHE_ENV)
        or os.path.join(os.path.expanduser("~"), ".cache", "sd3-ray", "loras")
    )
    return os.path.join(root, hashlib.sha256(url.encode()).hexdigest()[:16], digest[:16], WEIGHTS)


def _store_in_cache(url: str, data: bytes, digest: str, cache_dir: str | None) -> str:
    """The cache's copy of ``url`` (content ``data`` with sha256 ``digest``), written if absent."""
    dest = _cache_path(url, digest, cache_dir)
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    return dest
