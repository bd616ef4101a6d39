"""diffusers' LoRA methods for the SD3 pipeline (``SD3LoraLoaderMixin``), on the transformer.

Files are diffusers/peft ``pytorch_lora_weights.safetensors``; see :mod:`sd3_core.lora`.
Text-encoder LoRA is not supported (a file holding it is rejected, not half-applied).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sd3_core import lora, lora_file
from sd3_core.hub import LoadOptions, is_hub_id, model_folder
from sd3_core.lora_registry import resolve_lora

LORA_COMPONENTS = ("transformer",)  # the components that carry LoRA here


class SD3LoraLoaderMixin:
    """Mixed into :class:`StableDiffusion3Pipeline`; needs ``self.transformer``."""

    transformer: object

    def load_lora_weights(
        self,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str | None = None,
        scale: float = 1.0,
        weight_name: str | None = None,
        subfolder: str | None = None,
        **hub_options: Any,
    ) -> str:
        """Load a LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``, peft's
        adapter files, or one ``.safetensors`` file) as adapter ``adapter_name`` (default
        ``default_<n>``) with weight ``scale``. As in diffusers, the new adapter becomes the only
        active one; combine several with :meth:`set_adapters`. Returns its name.

        ``pretrained_model_name_or_path`` may also be a Hugging Face Hub id (``org/name``, with
        diffusers' ``subfolder``, ``revision``, ``cache_dir``, ``token``, ``local_files_only``...;
        only safetensors and adapter configs are fetched), a URL (``s3://...``: a file, a folder,
        or a LoRA registry) or a registry reference ``REGISTRY[:VERSION]`` (sd3_core/lora_registry.py)."""
        path = os.fspath(pretrained_model_name_or_path)
        options = LoadOptions.take(hub_options, "load_lora_weights")
        if hub_options:
            raise TypeError(f"load_lora_weights got unexpected keyword argument(s) {sorted(hub_options)}")
        if is_hub_id(path):
            files = [weight_name] if weight_name else ["*.safetensors", "adapter_config.json"]
            path = model_folder(path, subfolder, options, files)
        elif subfolder is not None:
            path = os.path.join(path, subfolder)
        elif weight_name is None and _is_remote_or_registry(path):
            path = resolve_lora(path)
        return lora_file.load_lora(self.transformer, path, adapter_name, scale, weight_name)

    def set_adapters(
        self,
        adapter_names: str | Sequence[str],
        adapter_weights: float | Sequence[float | None] | None = None,
    ) -> None:
        """Activate exactly ``adapter_names`` with ``adapter_weights`` (one, or one per adapter)."""
        lora.set_adapters(self.transformer, adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return lora.active_adapters(self.transformer)

    def get_list_adapters(self) -> dict[str, list[str]]:
        names = lora.adapter_names(self.transformer)
        return {"transformer": names} if names else {}

    def enable_lora(self) -> None:
        lora.enable_lora(self.transformer, True)

    def disable_lora(self) -> None:
        lora.enable_lora(self.transformer, False)

    def fuse_lora(
        self,
        components: Sequence[str] = LORA_COMPONENTS,
        lora_scale: float = 1.0,
        adapter_names: Sequence[str] | None = None,
    ) -> None:
        """Merge the (given or active) adapters into the transformer weights, times ``lora_scale``.

        Unlike diffusers, the adapters' own weights are not left multiplied by ``lora_scale``
        after an unfuse."""
        _check_components(components)
        lora.fuse_lora(self.transformer, lora_scale, adapter_names)

    def unfuse_lora(self, components: Sequence[str] = LORA_COMPONENTS) -> None:
        """Restore the exact pre-fuse transformer weights."""
        _check_components(components)
        lora.unfuse_lora(self.transformer)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            lora.delete_adapter(self.transformer, name)

    def unload_lora_weights(self) -> None:
        """Remove all adapters; adapters fused before this stay baked into the weights."""
        lora.unload_lora(self.transformer)

    def save_lora_weights(
        self, save_directory: str | os.PathLike, adapter_name: str = "default", dtype: str = "float32"
    ) -> str:
        """Write one adapter as a diffusers-readable ``pytorch_lora_weights.safetensors``."""
        return str(lora_file.save_lora_weights(save_directory, self.transformer, adapter_name, dtype=dtype))


def _is_remote_or_registry(path: str) -> bool:
    if "://" in path:
        return True
    head, sep, tail = path.rpartition(":")
    registry = head if sep and tail and "/" not in tail and len(head) > 1 else path
    return os.path.isfile(os.path.join(registry, "latest"))


def _check_components(components: Sequence[str]) -> None:
    extra = [c for c in components if c not in LORA_COMPONENTS]
    if extra:
        raise ValueError(
            f"LoRA components {extra} are not supported; only {list(LORA_COMPONENTS)} carries LoRA here"
        )


# The LoRA methods a replica group runs on every rank (rank 0's result is returned): all but saving,
# which needs a whole adapter.
LORA_METHODS = tuple(
    name
    for name, value in vars(SD3LoraLoaderMixin).items()
    if callable(value) and not name.startswith("_") and name != "save_lora_weights"
)
