"""Model names as diffusers and PPDiffusers users write them: a local folder or a Hugging Face Hub id.

:func:`model_folder` is the one resolver every ``from_pretrained`` uses. A string naming an existing
local path is that path; ``org/name`` that is not a local path is a Hub id, fetched by
``huggingface_hub.snapshot_download`` with only the files we load (safetensors weights, configs,
tokenizer files: no .bin/.ckpt/.onnx/.msgpack, no single-file checkpoints). huggingface_hub itself
honours its cache (``~/.cache/huggingface/hub``, ``HF_HOME``, ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1``
and ``HF_TOKEN``; without network a cached snapshot is used as is.

:class:`LoadOptions` takes the other ``from_pretrained`` keywords of the two ecosystems: the Hub
ones are passed on, those that describe what we do anyway are accepted, the rest are refused by
name with what to write instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LoadOptions", "hub_commit", "is_hub_id", "model_folder", "weights_patterns"]

_COMMIT = re.compile(r"^[0-9a-f]{40}$")

# Keyword -> (value(s) that mean what we do anyway, what to write instead otherwise).
_ACCEPTED_IF = {
    "use_safetensors": ((True, None), "only safetensors weights are loaded; drop use_safetensors=False"),
    # Models are always built without init, then filled; weights are read tensor by tensor.
    "low_cpu_mem_usage": ((True, False, None), "pass True or False"),
    "from_diffusers": ((True, None), "only diffusers-format safetensors folders are loaded"),
    "from_hf_hub": ((True, None), "models come from a local folder or the Hugging Face Hub only"),
    "use_flashpack": ((False, None), "flashpack checkpoints are not supported"),
    "disable_mmap": ((True, False, None), "pass True or False"),
}
_REFUSED = {
    "variant": "only the default weights files are loaded; for half precision pass dtype='float16' "
    "(or paddle_dtype= / torch_dtype=)",
    "device_map": "the model loads onto paddle's current device: call paddle.set_device('gpu') first "
    "(for several devices use ParallelStableDiffusion3Pipeline or `sd3 generate --mp`)",
    "max_memory": "the model loads whole onto paddle's current device (see device_map)",
    "offload_folder": "offloading is not supported",
    "offload_state_dict": "offloading is not supported",
    "quantization_config": "quantized loading is not supported; use dtype='bfloat16' or 'float16'",
    "custom_pipeline": "only StableDiffusion3Pipeline is provided",
    "custom_revision": "only StableDiffusion3Pipeline is provided (custom_pipeline is not supported)",
    "trust_remote_code": "remote code is never run",
    "use_onnx": "ONNX weights are not supported; the safetensors weights are loaded",
    "provider": "ONNX runtimes are not supported",
    "sess_options": "ONNX runtimes are not supported",
    "provider_options": "ONNX runtimes are not supported",
    "from_flax": "Flax weights are not supported; the safetensors weights are loaded",
    "dduf_file": "DDUF archives are not supported; pass the repository id or a diffusers folder",
    "load_connected_pipeline": "connected pipelines are not supported",
    "output_loading_info": "loading fails with a message naming every missing or unexpected key instead",
    "ignore_mismatched_sizes": "a checkpoint must fit the model's config exactly",
    "proxies": "set HTTPS_PROXY in the environment (huggingface_hub honours it)",
    "from_aistudio": "models come from a local folder or the Hugging Face Hub only",
    "from_bos": "models come from a local folder or the Hugging Face Hub only",
}


@dataclass(frozen=True)
class LoadOptions:
    """The Hub keywords of ``from_pretrained`` (as diffusers names them), passed to huggingface_hub."""

    revision: str | None = None
    cache_dir: str | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    force_download: bool = False

    @classmethod
    def take(cls, kwargs: dict[str, Any], where: str) -> LoadOptions:
        """Pop the Hub keywords and the accepted no-op ones from ``kwargs``; refuse the unsupported
        ones by name (``where`` names the caller). What is left is the caller's own business."""
        for name, (fine, advice) in _ACCEPTED_IF.items():
            if name in kwargs:
                value = kwargs.pop(name)
                if value not in fine:
                    raise ValueError(f"{where}: {name}={value!r} is not supported: {advice}")
        refused = sorted(set(kwargs) & set(_REFUSED))
        if refused:
            name = refused[0]
            raise ValueError(f"{where}: {name}= is not supported: {_REFUSED[name]}")
        options = {f: kwargs.pop(f) for f in ("revision", "cache_dir", "token") if f in kwargs}
        for flag in ("local_files_only", "force_download"):
            if flag in kwargs:
                options[flag] = bool(kwargs.pop(flag))
        if options.get("revision") is not None and not isinstance(options["revision"], str):
            raise TypeError(
                f"{where}: revision must be a str (branch, tag or commit), got {options['revision']!r}"
            )
        if options.get("cache_dir") is not None:
            options["cache_dir"] = os.fspath(options["cache_dir"])
        return cls(**options)


def weights_patterns(weights_name: str) -> list[str]:
    """File names of ``weights_name``: the single file, or its shards and their index."""
    stem = weights_name.removesuffix(".safetensors")
    return [weights_name, f"{weights_name}.index.json", f"{stem}-*-of-*.safetensors"]


def is_hub_id(name: str | os.PathLike) -> bool:
    """True when ``name`` is ``org/name`` in the Hub's spelling and no local path of that name exists."""
    if not isinstance(name, str) or name.count("/") != 1 or os.path.exists(name):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_commit(folder: str | os.PathLike) -> str | None:
    """The commit of a folder inside a Hub cache snapshot (``.../snapshots/<commit>[/sub]``), else None."""
    parts = os.path.abspath(os.fspath(folder)).split(os.sep)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "snapshots" and _COMMIT.match(parts[i + 1]):
            return parts[i + 1]
    return None


def model_folder(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    options: LoadOptions | None = None,
    allow_patterns: Iterable[str] | None = None,
) -> str:
    """The local folder of ``name_or_path`` (``/subfolder`` when given).

    A Hub id is fetched with ``allow_patterns`` (relative to the repository root; None: every file).
    FileNotFoundError / ValueError with one line naming the id (and cache, revision) otherwise."""
    options = options or LoadOptions()
    path = os.fspath(name_or_path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"model name {name_or_path!r} must be a local folder or a Hub id (org/name)")
    if subfolder is not None and (os.path.isabs(subfolder) or ".." in subfolder.split("/")):
        raise ValueError(f"subfolder={subfolder!r} must be a folder name inside the model")
    if os.path.exists(path):
        if options.revision is not None:
            raise ValueError(
                f"revision={options.revision!r} applies to Hub ids, but {path!r} is a local folder"
            )
        return os.path.join(path, subfolder) if subfolder else path
    if not is_hub_id(path):
        raise FileNotFoundError(f"{path!r}: no such local folder, and not a Hugging Face Hub id (org/name)")
    patterns = list(allow_patterns) if allow_patterns is not None else None
    if patterns is not None and subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns]
    root = _snapshot(path, options, patterns)
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Hub model {path!r} ({root}) has no subfolder {subfolder!r}")
    return folder


def _snapshot(repo_id: str, options: LoadOptions, patterns: Sequence[str] | None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = options.revision or constants.DEFAULT_REVISION
    cache = options.cache_dir or constants.HF_HUB_CACHE
    what = f"Hub model {repo_id!r}" + (
        "" if revision == constants.DEFAULT_REVISION else f" at revision {revision!r}"
    )
    try:
        return snapshot_download(
            repo_id,
            revision=options.revision,
            cache_dir=options.cache_dir,
            token=options.token,
            local_files_only=options.local_files_only,
            force_download=options.force_download,
            allow_patterns=patterns,
        )
    except LocalEntryNotFoundError:
        cached = _cached_revisions(cache, repo_id)
        have = f" (cached there: {', '.join(cached)})" if cached else ""
        if options.local_files_only or constants.HF_HUB_OFFLINE:
            why = (
                "and downloads are off (local_files_only)"
                if options.local_files_only
                else "and HF_HUB_OFFLINE is set"
            )
        else:
            why = "and the Hub cannot be reached"
        raise FileNotFoundError(
            f"{what} is not in the Hugging Face cache {cache}{have} {why}; fetch it where there is network "
            f"(the same call without HF_HUB_OFFLINE, or `hf download {repo_id}`) into that cache (HF_HUB_CACHE)"
        ) from None
    except GatedRepoError:
        raise PermissionError(
            f"{what} is gated: accept its licence on the Hub, then set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{what}: the Hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{what}: no such repository on the Hub (or it is private: set HF_TOKEN)"
        ) from None


def _cached_revisions(cache: str, repo_id: str) -> list[str]:
    from huggingface_hub.file_download import repo_folder_name

    storage = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    refs = os.path.join(storage, "refs")
    names = sorted(os.listdir(refs)) if os.path.isdir(refs) else []
    snapshots = os.path.join(storage, "snapshots")
    commits = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    return names + [c[:12] for c in commits]
