"""Config handling and PyTorch-checkpoint loading/saving for Paddle layers.

Checkpoints keep diffusers/transformers state-dict names and PyTorch layout. The only layout
difference that matters is ``nn.Linear``: PyTorch stores ``[out, in]``, Paddle ``[in, out]``.
Which tensors to transpose is decided by the module that owns them (a weight of a Linear
sublayer), never by shape, so square matrices and 2-D embedding tables are handled correctly.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import paddle
import paddle.nn.functional as F

from sd3_core.hub import LoadOptions, model_folder, weights_patterns
from sd3_core.safetensors_io import FLOAT8_DTYPES, WeightsIndex, open_weights, write_safetensors

__all__ = [
    "Config",
    "Conv2D",
    "Linear",
    "ModelMixin",
    "PartialSumLinear",
    "WeightLoadError",
    "compute_dtype",
    "dtype_argument",
    "load_torch_state",
    "register_linear_type",
    "resolve_dtype",
    "torch_state_from",
]

# The diffusers release whose numerics and file layout we verified against.
DIFFUSERS_VERSION = "0.42.1"

_DTYPES = {
    "float32": paddle.float32,
    "float16": paddle.float16,
    "bfloat16": paddle.bfloat16,
}
_NUMPY_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def read_json_object(file: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from `file`; a missing file, bad JSON or a non-object names the file."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model (missing/unexpected keys, shapes, dtypes)."""


class Config(dict):
    """A dict whose keys are also attributes (``model.config.joint_attention_dim``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


# ---------------------------------------------------------------------------------------------
# dtypes


def resolve_dtype(dtype: str | paddle.dtype | Any, argument: str = "dtype") -> str:
    """The name (``"float32" | "float16" | "bfloat16"``) of a paddle dtype, a torch dtype (by its
    name; torch is never imported) or a string such as ``"float16"``, ``"paddle.float16"`` or
    ``"torch.float16"``. ``argument`` names the keyword in the error."""
    if isinstance(dtype, paddle.dtype):
        for name, pd in _DTYPES.items():
            if dtype == pd:
                return name
    elif isinstance(dtype, str) or type(dtype).__module__.split(".")[0] == "torch":
        name = str(dtype).removeprefix("torch.").removeprefix("paddle.")
        if name in _DTYPES:
            return name
    raise ValueError(f"{argument}={dtype!r} is not supported; use 'float32', 'float16' or 'bfloat16'")


def dtype_argument(
    dtype: str | paddle.dtype | Any = None, paddle_dtype: Any = None, torch_dtype: Any = None
) -> str:
    """The dtype name meant by ``dtype=`` or its PPDiffusers / diffusers spellings ``paddle_dtype=`` /
    ``torch_dtype=`` (float32 when none is given; two that disagree are an error)."""
    given = {
        argument: resolve_dtype(value, argument)
        for argument, value in (
            ("dtype", dtype),
            ("paddle_dtype", paddle_dtype),
            ("torch_dtype", torch_dtype),
        )
        if value is not None
    }
    if len(set(given.values())) > 1:
        said = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"conflicting dtypes {said}: pass one of dtype=, paddle_dtype=, torch_dtype=")
    return next(iter(given.values()), "float32")


def _device_has_half_kernels() -> bool:
    # Paddle's CPU build registers no float16/bfloat16 matmul, layer_norm or softmax kernels.
    return not paddle.get_device().startswith("cpu")


def compute_dtype(weight_dtype: paddle.dtype) -> paddle.dtype:
    """The dtype to run math in for weights stored as ``weight_dtype`` on the current device."""
    if weight_dtype in (paddle.float16, paddle.bfloat16) and not _device_has_half_kernels():
        return paddle.float32
    return weight_dtype


def _as(t: paddle.Tensor | None, dtype: paddle.dtype) -> paddle.Tensor | None:
    return t if t is None or t.dtype == dtype else t.astype(dtype)


def _addmm_grad_would_crash(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor) -> bool:
    # Paddle 3.3's CPU addmm backward segfaults when the bias stops gradient but x or the weight
    # needs one (a frozen Linear inside a LoRA-trained model, or downstream of one).
    return bias.stop_gradient and paddle.is_grad_enabled() and not (x.stop_gradient and weight.stop_gradient)


class Linear(paddle.nn.Linear):
    """``nn.Linear`` that runs half-precision weights in the input's dtype when they differ.

    On CPU, float16/bfloat16 checkpoints are kept in that dtype (memory) and upcast per call.
    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        weight, bias = _as(self.weight, x.dtype), _as(self.bias, x.dtype)
        if bias is None or _device_has_half_kernels() or _addmm_grad_would_crash(x, weight, bias):
            return F.linear(x, weight, bias)
        # On CPU F.linear is a GEMM plus a separate bias pass over the output; addmm lets the
        # GEMM accumulate onto the bias (beta=1), which is ~20% cheaper for SD3's shapes.
        out = paddle.addmm(bias, x.reshape([-1, x.shape[-1]]), weight)
        return out.reshape([*x.shape[:-1], weight.shape[1]])


class PartialSumLinear(Linear):
    """A row-parallel shard of a Linear: ``forward`` is this rank's partial product, no bias.

    The weight holds this rank's rows of the input features; the partial products of all ranks
    sum to the full ``x @ W``, and the (replicated) bias is added once, after that sum.
    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(x, _as(self.weight, x.dtype))


class Conv2D(paddle.nn.Conv2D):
    """``nn.Conv2D`` with the same per-call upcast as :class:`Linear`."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.weight.dtype == x.dtype:
            return super().forward(x)
        padding = self._padding
        if self._padding_mode != "zeros":
            x = F.pad(
                x,
                self._reversed_padding_repeated_twice,
                mode=self._padding_mode,
                data_format=self._data_format,
            )
            padding = 0
        return F.conv2d(
            x,
            _as(self.weight, x.dtype),
            _as(self.bias, x.dtype),
            stride=self._stride,
            padding=padding,
            dilation=self._dilation,
            groups=self._groups,
            data_format=self._data_format,
        )


# ---------------------------------------------------------------------------------------------
# state-dict conversion

_LINEAR_TYPES: list[type] = [paddle.nn.Linear]


def register_linear_type(cls: type) -> None:
    """Treat ``cls.weight`` as a Linear weight (``[in, out]`` in Paddle) when converting."""
    if cls not in _LINEAR_TYPES:
        _LINEAR_TYPES.append(cls)


def _linear_weight_keys(layer: paddle.nn.Layer) -> set[str]:
    keys = set()
    types = tuple(_LINEAR_TYPES)
    for name, sub in layer.named_sublayers(include_self=True):
        if isinstance(sub, types):
            keys.add(f"{name}.weight" if name else "weight")
    return keys


def _tensor_to_numpy(t: paddle.Tensor) -> np.ndarray:
    arr = t.numpy()
    if t.dtype == paddle.bfloat16:  # paddle hands bfloat16 out as raw uint16 bits
        arr = arr.view(ml_dtypes.bfloat16)
    return arr


def _numpy_to_tensor(arr: np.ndarray, dtype: paddle.dtype) -> paddle.Tensor:
    if arr.dtype in FLOAT8_DTYPES:  # fp8 checkpoints (e.g. an fp8 T5) are upcast at load
        arr = arr.astype(np.float32)
    if arr.dtype == ml_dtypes.bfloat16:
        t = paddle.to_tensor(np.ascontiguousarray(arr).view(np.uint16)).view(paddle.bfloat16)
    else:
        t = paddle.to_tensor(np.ascontiguousarray(arr))
    return t if t.dtype == dtype else t.astype(dtype)


def torch_state_from(
    layer: paddle.nn.Layer, dtype: str | paddle.dtype | None = None
) -> dict[str, np.ndarray]:
    """The layer's persistent state in PyTorch layout (Linear weights transposed) as numpy."""
    linear_keys = _linear_weight_keys(layer)
    target = None if dtype is None else _NUMPY_DTYPE[resolve_dtype(dtype)]
    out = {}
    for key, t in layer.state_dict().items():
        arr = _tensor_to_numpy(t)
        if key in linear_keys and arr.ndim == 2:
            arr = arr.T
        if target is not None and _is_float(arr.dtype):
            arr = arr.astype(target)
        out[key] = np.ascontiguousarray(arr)
    return out


def _summarise(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16 or dtype in FLOAT8_DTYPES


def load_torch_state(
    layer: paddle.nn.Layer,
    index: WeightsIndex,
    dtype: str | paddle.dtype | None,
    source: str,
    ignore_unexpected: Iterable[str] = (),
    key_map: Mapping[str, str] | Callable[[str], str] | None = None,
    ignore_missing: Iterable[str] = (),
) -> None:
    """Assign a PyTorch-layout checkpoint to ``layer`` in place.

    ``key_map`` maps the layer's state-dict names to checkpoint names (dict or function;
    unmapped names are used as is). ``ignore_unexpected`` / ``ignore_missing`` are regular
    expressions (``re.search``) for checkpoint keys that may be left over / layer keys that may
    be absent. Floating tensors are cast to ``dtype`` (``None`` keeps each tensor's dtype).
    Raises :class:`WeightLoadError` naming ``source`` and the offending keys.
    """
    target = None if dtype is None else _DTYPES[resolve_dtype(dtype)]
    if callable(key_map):
        to_ckpt = key_map
    else:
        mapping = dict(key_map or {})

        def to_ckpt(k: str) -> str:
            return mapping.get(k, k)

    unexpected_res = [re.compile(p) for p in ignore_unexpected]
    missing_res = [re.compile(p) for p in ignore_missing]
    state = layer.state_dict()
    linear_keys = _linear_weight_keys(layer)

    missing, shape_errors, dtype_errors = [], [], []
    plan: list[tuple[str, str, bool]] = []
    claimed = set()
    for key, t in state.items():
        ck = to_ckpt(key)
        if ck not in index:
            if not any(r.search(key) for r in missing_res):
                missing.append(ck)
            continue
        claimed.add(ck)
        transpose = key in linear_keys and len(t.shape) == 2
        file_shape = tuple(index.shape(ck))
        expected = tuple(t.shape)[::-1] if transpose else tuple(t.shape)
        if file_shape != expected:
            where = index.file_of(ck).name
            shape_errors.append(f"{ck} in {where}: checkpoint {list(file_shape)} vs model {list(expected)}")
        elif _is_float(index.dtype(ck)) != paddle.is_floating_point(t):
            where = index.file_of(ck).name
            dtype_errors.append(f"{ck} in {where}: checkpoint {index.dtype(ck)} vs model {t.dtype}")
        plan.append((key, ck, transpose))
    unexpected = [k for k in index if k not in claimed and not any(r.search(k) for r in unexpected_res)]

    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_summarise(unexpected)}")
    if shape_errors:
        problems.append(f"shape mismatch ({len(shape_errors)}): {_summarise(shape_errors)}")
    if dtype_errors:
        problems.append(f"dtype mismatch ({len(dtype_errors)}): {_summarise(dtype_errors)}")
    if problems:
        raise WeightLoadError(
            f"{source}: checkpoint does not match {type(layer).__name__}: " + "; ".join(problems)
        )

    # Parameters created under paddle.LazyGuard are not materialised; set_value does it.
    needs_cast = target is not None and any(
        paddle.is_floating_point(t) and t.dtype != target and getattr(t, "_is_initialized", lambda: True)()
        for t in state.values()
    )
    if needs_cast:
        layer.to(dtype=target)
        state = layer.state_dict()
    for key, ck, transpose in plan:
        t = state[key]
        arr = index.get(ck)
        if transpose:
            arr = arr.T
        want = t.dtype if target is None or not paddle.is_floating_point(t) else target
        try:
            t.set_value(_numpy_to_tensor(arr, want))
        except Exception as e:  # paddle raises bare ValueError/RuntimeError with no file context
            raise WeightLoadError(f"{source}: cannot assign {ck} from {index.file_of(ck)}: {e}") from e
    for t in layer.parameters():
        if hasattr(t, "_is_initialized") and not t._is_initialized():
            t.initialize()


# ---------------------------------------------------------------------------------------------
# models


@contextlib.contextmanager
def _default_dtype(dtype: str):
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


def _json_ready(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


class ModelMixin(paddle.nn.Layer):
    """Base for models built from a diffusers config and loaded from diffusers checkpoints.

    Subclasses define ``__init__`` with keyword arguments named exactly like the diffusers
    config keys; the bound arguments (defaults filled in) become ``self.config``.
    """

    config_name = "config.json"
    weights_name = "diffusion_pytorch_model.safetensors"
    #: class name written to config.json; defaults to the Python class name.
    diffusers_class_name: str | None = None
    #: checkpoint keys tolerated on load (regular expressions).
    ignore_unexpected_keys: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        def recording_init(self, *args, **kw):
            # Only the outermost __init__ (the concrete class) records the config.
            outermost = "_config_recording" not in self.__dict__
            if outermost:
                object.__setattr__(self, "_config_recording", True)
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                config = {k: v for k, v in bound.arguments.items() if k != "self"}
            init(self, *args, **kw)
            if outermost:
                object.__setattr__(self, "_config", Config(config))

        recording_init.__signature__ = signature
        recording_init.__doc__ = init.__doc__
        cls.__init__ = recording_init

    @property
    def config(self) -> Config:
        return self._config

    @property
    def dtype(self) -> paddle.dtype:
        for p in self.parameters():
            return p.dtype
        return paddle.float32

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
        name = resolve_dtype(dtype)
        # Build without random init, directly in the target dtype: the checkpoint overwrites
        # everything, and a 2B-parameter init would cost seconds and a float32 copy in memory.
        with _default_dtype(name), paddle.LazyGuard():
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
        config.update(_json_ready(dict(self.config)))
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
