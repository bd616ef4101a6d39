"""The three weight dtypes: their names in Paddle, NumPy, torch and user arguments; the compute dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np
import paddle

__all__ = [
    "NUMPY_DTYPES",
    "PADDLE_DTYPES",
    "cast",
    "cast_layer",
    "compute_dtype",
    "default_dtype",
    "device_has_half_kernels",
    "dtype_argument",
    "looks_like_dtype",
    "resolve_dtype",
]

PADDLE_DTYPES = {
    "float32": paddle.float32,
    "float16": paddle.float16,
    "bfloat16": paddle.bfloat16,
}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def resolve_dtype(dtype: str | paddle.dtype | Any, argument: str = "dtype") -> str:
    """The name (``"float32" | "float16" | "bfloat16"``) of a paddle dtype, a torch dtype (by its
    name; torch is never imported) or a string such as ``"float16"``, ``"paddle.float16"`` or
    ``"torch.float16"``. ``argument`` names the keyword in the error."""
    if isinstance(dtype, paddle.dtype):
        for name, pd in PADDLE_DTYPES.items():
            if dtype == pd:
                return name
    elif isinstance(dtype, str) or type(dtype).__module__.split(".")[0] == "torch":
        name = str(dtype).removeprefix("torch.").removeprefix("paddle.")
        if name in PADDLE_DTYPES:
            return name
    raise ValueError(f"{argument}={dtype!r} is not supported; use 'float32', 'float16' or 'bfloat16'")


def looks_like_dtype(value: Any) -> bool:
    """Whether ``value`` names a dtype (a paddle or torch dtype, or a name such as "float16" or
    "torch.int8") rather than a device: how ``pipe.to(value)`` tells the two apart."""
    if isinstance(value, paddle.dtype) or (
        type(value).__module__.split(".")[0] == "torch" and type(value).__name__ == "dtype"
    ):
        return True
    name = str(value).removeprefix("torch.").removeprefix("paddle.") if isinstance(value, str) else ""
    return name.startswith(("float", "bfloat", "int", "uint", "complex", "bool"))


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


def device_has_half_kernels() -> bool:
    """Whether the current device has float16/bfloat16 kernels."""
    # Paddle's CPU build registers no float16/bfloat16 matmul, layer_norm or softmax kernels.
    return not paddle.get_device().startswith("cpu")


def compute_dtype(weight_dtype: paddle.dtype) -> paddle.dtype:
    """The dtype to run math in for weights stored as ``weight_dtype`` on the current device."""
    if weight_dtype in (paddle.float16, paddle.bfloat16) and not device_has_half_kernels():
        return paddle.float32
    return weight_dtype


def cast(t: paddle.Tensor | None, dtype: paddle.dtype) -> paddle.Tensor | None:
    """``t`` in ``dtype`` (None stays None; no copy when it already is)."""
    return t if t is None or t.dtype == dtype else t.astype(dtype)


@contextlib.contextmanager
def default_dtype(dtype: str) -> Iterator[None]:
    """Paddle's default dtype set to ``dtype`` inside the block."""
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


def cast_layer(
    layer: paddle.nn.Layer, dtype: str, keeps_float32: Callable[[str], bool] = lambda name: False
) -> None:
    """Cast ``layer``'s floating parameters and buffers to ``dtype`` (integer buffers stay), those
    of the sublayers ``keeps_float32(name)`` names to float32; each tensor is cast once."""
    for name, sub in layer.named_sublayers(include_self=True):
        target = "float32" if keeps_float32(name) else dtype
        sub._to_impl(dtype=target, include_sublayers=False, floating_only=True)
