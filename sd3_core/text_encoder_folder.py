"""A text encoder's folder as transformers writes it: ``config.json`` + ``model.safetensors``
(single or sharded, PyTorch tensor layout); reading it, the dtype it runs in, writing it back."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import paddle

from sd3_core.dtypes import cast_layer, compute_dtype, resolve_dtype
from sd3_core.hub import weights_patterns
from sd3_core.model_config import read_json_object
from sd3_core.safetensors_io import WeightsIndex, open_weights, write_safetensors

__all__ = [
    "CONFIG_NAME",
    "ENCODER_FILES",
    "WEIGHTS_NAME",
    "existing_folder",
    "load_encoder_folder",
    "run_dtype",
    "save_encoder_folder",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: What the encoder loaders read from a text-encoder folder (patterns, as Hub downloads take them).
ENCODER_FILES = (CONFIG_NAME, *weights_patterns(WEIGHTS_NAME))

_Encoder = TypeVar("_Encoder")


def existing_folder(folder: str | os.PathLike, what: str) -> Path:
    """``folder`` as a Path; FileNotFoundError naming ``what`` if it is not a directory."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} folder not found")
    return path


def load_encoder_folder(
    folder: str | os.PathLike,
    what: str,
    from_weights: Callable[[dict[str, Any], WeightsIndex, str | paddle.dtype, str], _Encoder],
    dtype: str | paddle.dtype,
) -> _Encoder:
    """``from_weights(config, weights, dtype, source)`` on the folder's config.json and weights."""
    path = existing_folder(folder, what)
    config = read_json_object(path / CONFIG_NAME)
    index = open_weights(path, WEIGHTS_NAME)
    try:
        return from_weights(config, index, dtype, str(path))
    finally:
        index.close()


def run_dtype(dtype: str | paddle.dtype) -> str:
    """The dtype weights are held and run in: the request, or float32 where the device lacks
    half-precision kernels (Paddle's CPU build; see dtypes.compute_dtype)."""
    name = resolve_dtype(dtype)
    return resolve_dtype(compute_dtype(getattr(paddle, name)))


def float16_keeps_float32(model: paddle.nn.Layer, name: str) -> bool:
    """Whether sublayer ``name`` of a text encoder stays float32 when it is held in float16 (its
    class's ``FLOAT16_KEEPS_FLOAT32`` name suffixes: transformers' ``_keep_in_fp32_modules``)."""
    kept = getattr(model, "FLOAT16_KEEPS_FLOAT32", ())
    return bool(kept) and name.endswith(kept)


def cast_encoder(model: paddle.nn.Layer, dtype: str | paddle.dtype) -> None:
    """Hold a text encoder's weights as loading it in ``dtype`` holds them (:func:`run_dtype`)."""
    run = run_dtype(dtype)
    cast_layer(model, run, lambda name: run == "float16" and float16_keeps_float32(model, name))


def save_encoder_folder(
    folder: str | os.PathLike, hf_config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> None:
    """Write ``tensors`` (transformers' names and layout) and ``hf_config`` into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_NAME, tensors, {"format": "pt"})
    tmp = out / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / CONFIG_NAME)
