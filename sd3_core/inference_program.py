"""The transformer as static Paddle Inference programs (``inference_optimize``), cached on disk.

:class:`TransformerProgram` is called like the eager model. For each input shape (and
skip-layer set) it exports :class:`~sd3_core.batched_transformer.BatchedSD3Transformer` with
``paddle.jit.to_static`` / ``paddle.jit.save`` once and runs it with a Paddle Inference
predictor: on CPU with oneDNN, in bfloat16 where the processor has native bfloat16
(``avx512_bf16`` or ``amx_bf16``, read from ``/proc/cpuinfo``); on GPU with Paddle Inference's
GPU passes in the model's dtype, attention through the fused kernel.

Programs are cached in ``$SD3_RAY_PROGRAM_CACHE`` (else ``~/.cache/sd3-ray/programs``), keyed
by the weights' sha256, config, shapes, skip layers, program dtype, device kind, Paddle version
and this file's format version, so a replica pays the export once per node. An entry appears
whole (written in a temporary folder, then renamed) and carries the sha256 of its files; a
corrupt or partial entry is rebuilt, never trusted.

The program is a snapshot of the weights. LoRA changes made through the LoRA API (load, set,
fuse, unfuse, delete, unload, enable/disable) are noticed and select another program; other
in-place edits of the weights need :meth:`TransformerProgram.invalidate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
from filelock import FileLock
from paddle import inference
from paddle.static import InputSpec

from sd3_core import runtime
from sd3_core.batched_transformer import BatchedSD3Transformer
from sd3_core.dtypes import compute_dtype, resolve_dtype
from sd3_core.embeddings import timestep_sinusoid
from sd3_core.lora import lora_layers
from sd3_core.outputs import Transformer2DModelOutput, component_return
from sd3_core.torch_state import tensor_to_numpy
from sd3_core.transformer import SD3Transformer2DModel

__all__ = [
    "PROGRAM_CACHE_ENV",
    "TransformerProgram",
    "cpu_has_native_bfloat16",
    "default_program_cache",
    "program_precision",
]

PROGRAM_CACHE_ENV = "SD3_RAY_PROGRAM_CACHE"
FORMAT_VERSION = 3  # bump when the exported function or the entry layout changes
_FILES = ("model.json", "model.pdiparams")
_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep_features")


def default_program_cache() -> str:
    """``$SD3_RAY_PROGRAM_CACHE``, else ``~/.cache/sd3-ray/programs``."""
    return os.environ.get(PROGRAM_CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "sd3-ray", "programs"
    )


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX-BF16)."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _on_cpu() -> bool:
    return paddle.get_device().startswith("cpu")


def program_precision(dtype: str | paddle.dtype) -> str:
    """The math precision the optimised path uses for a pipeline loaded as ``dtype``.

    On CPU: ``bfloat16`` when asked for and the processor has it, else ``float32`` (with a
    warning that says so when half precision was asked for). On GPU: ``dtype`` itself.
    """
    name = resolve_dtype(dtype)
    if not _on_cpu() or name == "float32":
        return name
    if name == "bfloat16" and cpu_has_native_bfloat16():
        return "bfloat16"
    why = (
        "this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16 flag)"
        if name == "bfloat16"
        else "oneDNN has no float16 path on CPU; use dtype='bfloat16' on a CPU with avx512_bf16/amx_bf16"
    )
    warnings.warn(f"inference_optimize with dtype={name!r} runs in float32: {why}", stacklevel=2)
    return "float32"


class _Denoise(paddle.nn.Layer):
    """The exported function: :meth:`BatchedSD3Transformer.denoise`."""

    def __init__(self, batched: BatchedSD3Transformer):
        super().__init__()
        self.batched = batched

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep_features):
        return self.batched.denoise(
            hidden_states, encoder_hidden_states, pooled_projections, timestep_features
        )


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Shape:
    hidden: tuple[int, ...]
    context: tuple[int, ...]
    pooled: tuple[int, ...]
    skip: tuple[int, ...]


class TransformerProgram:
    """Runs ``model``'s forward through cached static programs; call it like the model.

    ``precision`` is ``"float32"`` or ``"bfloat16"`` on CPU (see :func:`program_precision`), the
    model's dtype on GPU.
    """

    def __init__(
        self,
        model: SD3Transformer2DModel,
        precision: str = "float32",
        cache_dir: str | None = None,
        threads: int | None = None,
    ):
        if model.tensor_parallel_shards() != 1:
            raise ValueError(
                "inference_optimize runs whole models; a tensor-parallel shard (mp > 1) runs eagerly"
            )
        device = paddle.get_device()
        if not (device.startswith("cpu") or device.startswith("gpu")):
            raise ValueError(f"inference_optimize runs on CPU and GPU, not on {device!r}; run it eagerly")
        self.model = model
        self.precision = resolve_dtype(precision)
        if _on_cpu() and self.precision == "float16":
            raise ValueError("inference_optimize has no float16 path on CPU; use 'float32' or 'bfloat16'")
        if _on_cpu() and self.precision == "bfloat16" and not cpu_has_native_bfloat16():
            raise ValueError("this CPU has no native bfloat16 (avx512_bf16 / amx_bf16); use 'float32'")
        self.cache_dir = cache_dir or default_program_cache()
        self.threads = threads or runtime.cpu_threads()
        self.attention_layout = "cpu_fused" if _on_cpu() else "batched"  # see ATTENTION_LAYOUTS
        self._predictors: dict[tuple, Any] = {}
        self._weights: tuple[Any, str] | None = None  # (LoRA state token, weights sha256)
        self.exports = 0  # programs this object exported (the rest came from the cache)

    # -- what the program depends on
    def _lora_token(self) -> tuple:
        state = []
        for name, layer in lora_layers(self.model):
            state.append(
                (
                    name,
                    id(layer),
                    layer.enabled,
                    tuple(layer.active),
                    tuple(sorted(layer.adapter_weight.items())),
                    tuple(sorted(layer.fused.items())),
                    tuple(id(layer.lora_B[n].weight) for n in layer.lora_B),
                )
            )
        linears = tuple(id(sub) for sub in self.model.sublayers() if isinstance(sub, paddle.nn.Linear))
        return tuple(state), linears

    def invalidate(self) -> None:
        """Forget the programs in memory: the model's weights were changed in place."""
        self._predictors.clear()
        self._weights = None

    def _weights_sha256(self, batched: BatchedSD3Transformer) -> str:
        digest = hashlib.sha256(json.dumps(dict(self.model.config), sort_keys=True).encode())
        for name, param in sorted(batched.state_dict().items()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(tensor_to_numpy(param)).tobytes())
        return digest.hexdigest()

    def _entry_key(self, weights: str, shape: _Shape) -> tuple[str, dict]:
        material = {
            "format": FORMAT_VERSION,
            "paddle": paddle.__version__,
            "device": "cpu" if _on_cpu() else "gpu",
            "program_dtype": str(compute_dtype(self.model.dtype)).replace("paddle.", ""),
            "weights_sha256": weights,
            "hidden_states": list(shape.hidden),
            "encoder_hidden_states": list(shape.context),
            "pooled_projections": list(shape.pooled),
            "skip_layers": list(shape.skip),
            "attention_layout": self.attention_layout,
        }
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]
        return key, material

    # -- the cache
    def _valid_entry(self, folder: str) -> bool:
        try:
            with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
                meta = json.load(f)
            return all(_sha256_file(os.path.join(folder, name)) == meta["files"][name] for name in _FILES)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _export(self, batched: BatchedSD3Transformer, shape: _Shape, folder: str, material: dict) -> None:
        dtype = str(batched.compute).replace("paddle.", "")
        b = shape.hidden[0]
        specs = [
            InputSpec(list(shape.hidden), "float32", name=_INPUTS[0]),
            InputSpec(list(shape.context), dtype, name=_INPUTS[1]),
            InputSpec(list(shape.pooled), dtype, name=_INPUTS[2]),
            InputSpec([b, 256], "float32", name=_INPUTS[3]),
        ]
        parent = os.path.dirname(folder)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
        try:
            layer = _Denoise(batched)
            layer.eval()
            paddle.jit.save(paddle.jit.to_static(layer, full_graph=True), os.path.join(staging, "model"),
                            input_spec=specs)  # fmt: skip
            meta = {"key": material, "files": {n: _sha256_file(os.path.join(staging, n)) for n in _FILES}}
            with open(os.path.join(staging, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1, sort_keys=True)
            if os.path.exists(folder):
                shutil.rmtree(folder)  # an invalid entry (checked by the caller under the lock)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.exports += 1

    def _predictor(self, folder: str) -> Any:
        config = inference.Config(os.path.join(folder, "model.json"), os.path.join(folder, "model.pdiparams"))
        config.disable_glog_info()
        if _on_cpu():
            config.disable_gpu()
            config.enable_onednn()
            config.set_cpu_math_library_num_threads(self.threads)
            if self.precision == "bfloat16":
                config.enable_onednn_bfloat16()
        else:
            # The program already computes in the model's dtype (traced so); Float32 here means
            # "as traced", where Half would add Paddle's auto-mixed-precision rewrite on top.
            device_id = int(paddle.get_device().split(":")[-1] or 0)
            config.enable_use_gpu(256, device_id, inference.PrecisionType.Float32)
        return inference.create_predictor(config)

    def _load(self, shape: _Shape) -> Any:
        token = self._lora_token()
        batched = None
        if self._weights is None or self._weights[0] != token:
            self._predictors.clear()
            batched = BatchedSD3Transformer(self.model, shape.skip, self.attention_layout)
            self._weights = (token, self._weights_sha256(batched))
        key, material = self._entry_key(self._weights[1], shape)
        predictor = self._predictors.get(key)
        if predictor is not None:
            return predictor
        folder = os.path.join(self.cache_dir, key)
        os.makedirs(self.cache_dir, exist_ok=True)
        with FileLock(folder + ".lock"):
            if not self._valid_entry(folder):
                if batched is None or batched.skip != frozenset(shape.skip):
                    batched = BatchedSD3Transformer(self.model, shape.skip, self.attention_layout)
                self._export(batched, shape, folder, material)
            predictor = self._predictor(folder)
        self._predictors[key] = predictor
        return predictor

    # -- the call
    def __call__(
        self,
        hidden_states: paddle.Tensor,
        encoder_hidden_states: paddle.Tensor,
        pooled_projections: paddle.Tensor,
        timestep: paddle.Tensor | float,
        skip_layers: Sequence[int] | None = None,
        *,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple:
        """Velocity ``[B, C, H, W]`` in ``hidden_states``' dtype, returned as
        ``SD3Transformer2DModel`` returns it."""
        timestep = self.model._check_inputs(
            hidden_states, encoder_hidden_states, pooled_projections, timestep
        )
        dtype = compute_dtype(self.model.dtype)
        shape = _Shape(
            tuple(hidden_states.shape),
            tuple(encoder_hidden_states.shape),
            tuple(pooled_projections.shape),
            tuple(sorted({int(i) for i in skip_layers or ()})),
        )
        predictor = self._load(shape)
        inputs = [
            hidden_states.astype("float32"),
            encoder_hidden_states.astype(dtype),
            pooled_projections.astype(dtype),
            timestep_sinusoid(timestep),
        ]
        (out,) = predictor.run(inputs)
        out = out if out.dtype == hidden_states.dtype else out.astype(hidden_states.dtype)
        return component_return(Transformer2DModelOutput(out), return_dict)
