"""State dicts in PyTorch layout: reading a checkpoint into a Paddle layer, and writing one out.

The only layout difference that matters is ``nn.Linear``: PyTorch stores ``[out, in]``, Paddle
``[in, out]``. Which tensors to transpose is decided by the module that owns them (a weight of a
Linear sublayer), never by shape, so square matrices and 2-D embedding tables are handled correctly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
import paddle

from sd3_core.dtypes import NUMPY_DTYPES, PADDLE_DTYPES, resolve_dtype
from sd3_core.safetensors_io import FLOAT8_DTYPES, WeightsIndex

__all__ = ["WeightLoadError", "load_torch_state", "numpy_to_tensor", "tensor_to_numpy", "torch_state_from"]


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model (missing/unexpected keys, shapes, dtypes)."""


def _linear_weight_keys(layer: paddle.nn.Layer) -> set[str]:
    keys = set()
    for name, sub in layer.named_sublayers(include_self=True):
        if isinstance(sub, paddle.nn.Linear):
            keys.add(f"{name}.weight" if name else "weight")
    return keys


def tensor_to_numpy(t: paddle.Tensor) -> np.ndarray:
    """``t`` as NumPy (bfloat16 as ml_dtypes.bfloat16)."""
    arr = t.numpy()
    if t.dtype == paddle.bfloat16:  # paddle hands bfloat16 out as raw uint16 bits
        arr = arr.view(ml_dtypes.bfloat16)
    return arr


def numpy_to_tensor(arr: np.ndarray, dtype: paddle.dtype) -> paddle.Tensor:
    """``arr`` as a Paddle tensor of ``dtype`` (float8 and bfloat16 arrays included)."""
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
    target = None if dtype is None else NUMPY_DTYPES[resolve_dtype(dtype)]
    out = {}
    for key, t in layer.state_dict().items():
        arr = tensor_to_numpy(t)
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
    target = None if dtype is None else PADDLE_DTYPES[resolve_dtype(dtype)]
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
            t.set_value(numpy_to_tensor(arr, want))
        except Exception as e:  # paddle raises bare ValueError/RuntimeError with no file context
            raise WeightLoadError(f"{source}: cannot assign {ck} from {index.file_of(ck)}: {e}") from e
    for t in layer.parameters():
        if hasattr(t, "_is_initialized") and not t._is_initialized():
            t.initialize()
