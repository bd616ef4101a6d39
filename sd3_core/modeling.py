"""``ModelMixin``: models built from a diffusers config and loaded from / saved to diffusers folders.

Folders hold ``config.json`` and single or sharded safetensors in PyTorch layout
(``sd3_core.torch_state`` converts); configs are recorded by ``@register_to_config``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from sd3_core import runtime
from sd3_core.devices import layer_device
from sd3_core.dtypes import default_dtype, dtype_argument, resolve_dtype
from sd3_core.hub import LoadOptions, model_folder, weights_patterns
from sd3_core.model_config import Config, json_ready, missing_config, read_json_object
from sd3_core.safetensors_io import WeightsIndex, open_weights, write_safetensors
from sd3_core.torch_state import load_torch_state, torch_state_from

__all__ = ["DIFFUSERS_VERSION", "ModelMixin"]

# The diffusers release whose numerics and file layout we verified against.
DIFFUSERS_VERSION = "0.42.1"


class ModelMixin(paddle.nn.Layer):
    """Base for models built from a diffusers config and loaded from diffusers checkpoints.

    Subclasses define ``__init__`` with keyword arguments named exactly like the diffusers
    config keys and decorate it with ``@register_to_config``: the bound arguments (defaults filled
    in) become ``self.config``.
    """

    config_name = "config.json"
    weights_name = "diffusion_pytorch_model.safetensors"
    #: class name written to config.json; defaults to the Python class name.
    diffusers_class_name: str | None = None
    #: checkpoint keys tolerated on load (regular expressions).
    ignore_unexpected_keys: tuple[str, ...] = ()

    @property
    def config(self) -> Config:
        try:
            return self.__dict__["_config"]
        except KeyError:
            raise AttributeError(missing_config(type(self))) from None

    @property
    def dtype(self) -> paddle.dtype:
        for p in self.parameters():
            return p.dtype
        return paddle.float32

    @property
    def device(self) -> str:
        """Where the weights are: ``"cpu"``, ``"gpu:N"`` or ``"npu:N"`` (diffusers' ``model.device``)."""
        return layer_device(self)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """How many parameter values the model has (diffusers' method): only trainable ones
        (``stop_gradient`` False) and without ``paddle.nn.Embedding`` weights when asked."""
        embeddings = (
            {id(layer.weight) for layer in self.sublayers() if isinstance(layer, paddle.nn.Embedding)}
            if exclude_embeddings
            else set()
        )
        return sum(
            math.prod(p.shape)
            for p in self.parameters()
            if id(p) not in embeddings and not (only_trainable and p.stop_gradient)
        )

    @classmethod
    def _init_keys(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters
        return [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any):
        """Build a model from a diffusers config dict (``_``-prefixed keys are ignored)."""
        config = {**config, **overrides}
        known = set(cls._init_keys())
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown config keys {unknown}", UserWarning, stacklevel=2
            )
        return cls(**{k: v for k, v in config.items() if k in known})

    @classmethod
    def load_config(cls, path: str | os.PathLike, subfolder: str | None = None) -> dict[str, Any]:
        folder = Path(path) / subfolder if subfolder else Path(path)
        return read_json_object(folder / cls.config_name)

    @classmethod
    def hub_files(cls) -> list[str]:
        """The files of a model folder that loading reads (patterns, as Hub downloads take them)."""
        return [cls.config_name, *weights_patterns(cls.weights_name)]

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        dtype: str | paddle.dtype | None = None,
        *,
        paddle_dtype: Any = None,
        torch_dtype: Any = None,
        **kwargs: Any,
    ):
        """Load a diffusers model folder (config + single or sharded safetensors): a local path or a
        Hub id (``sd3_core.hub``; ``revision=`` and the other Hub keywords of diffusers apply).
        ``paddle_dtype=`` / ``torch_dtype=`` are ``dtype=`` (default float32)."""
        where = f"{cls.__name__}.from_pretrained"
        name = dtype_argument(dtype, paddle_dtype, torch_dtype)
        options = LoadOptions.take(kwargs, where)
        if kwargs:
            raise TypeError(f"{where} got unexpected keyword argument(s) {sorted(kwargs)}")
        folder = Path(model_folder(pretrained_model_name_or_path, subfolder, options, cls.hub_files()))
        config = cls.load_config(folder)
        index = open_weights(folder, cls.weights_name)
        try:
            return cls.from_weights(config, index, name, str(folder))
        finally:
            index.close()

    @classmethod
    def from_weights(
        cls, config: Mapping[str, Any], weights: WeightsIndex, dtype: str | paddle.dtype, source: str
    ):
        """Build from a diffusers config and assign diffusers-named PyTorch-layout ``weights``.

        ``weights`` is anything with WeightsIndex's read interface; ``source`` names it in errors.
        """
        runtime.configure()  # loading a model is where a script starts computing with it
        name = resolve_dtype(dtype)
        # Build without random init, directly in the target dtype: the checkpoint overwrites
        # everything, and a 2B-parameter init would cost seconds and a float32 copy in memory.
        with default_dtype(name), paddle.LazyGuard():
            model = cls.from_config(config)
        load_torch_state(model, weights, name, source, ignore_unexpected=cls.ignore_unexpected_keys)
        model.eval()
        return model

    def save_pretrained(
        self,
        path: str | os.PathLike,
        dtype: str | paddle.dtype | None = None,
        max_shard_size: int | None = None,
    ) -> None:
        """Write config.json and the weights in diffusers' layout (PyTorch tensor layout).

        ``max_shard_size`` (bytes) splits the weights into diffusers-named shards plus an
        ``.index.json`` once they exceed it.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "_class_name": self.diffusers_class_name or type(self).__name__,
            "_diffusers_version": DIFFUSERS_VERSION,
        }
        config.update(json_ready(dict(self.config)))
        tensors = torch_state_from(self, dtype)
        total = sum(a.nbytes for a in tensors.values())
        metadata = {"format": "pt"}
        if max_shard_size is None or total <= max_shard_size:
            write_safetensors(folder / self.weights_name, tensors, metadata)
        else:
            self._write_shards(folder, tensors, max_shard_size, metadata)
        tmp = folder / f".{self.config_name}.tmp"
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, folder / self.config_name)

    def _write_shards(self, folder: Path, tensors: dict[str, np.ndarray], max_bytes: int, metadata) -> None:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for key in sorted(tensors):
            nbytes = tensors[key].nbytes
            if shards[-1] and size + nbytes > max_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = tensors[key]
            size += nbytes
        stem = self.weights_name.removesuffix(".safetensors")
        weight_map = {}
        n = len(shards)
        width = max(5, int(math.log10(n)) + 1)
        for i, shard in enumerate(shards, start=1):
            fname = f"{stem}-{i:0{width}d}-of-{n:0{width}d}.safetensors"
            write_safetensors(folder / fname, shard, metadata)
            weight_map.update(dict.fromkeys(shard, fname))
        index = {
            "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
            "weight_map": weight_map,
        }
        tmp = folder / f".{self.weights_name}.index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, folder / f"{self.weights_name}.index.json")
