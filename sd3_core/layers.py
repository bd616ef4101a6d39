"""Paddle layers that run half-precision weights in the input's dtype (and their row-parallel shard)."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

from sd3_core.dtypes import cast, device_has_half_kernels

__all__ = ["Conv2D", "Linear", "PartialSumLinear"]


def _addmm_grad_would_crash(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor) -> bool:
    # Paddle 3.3's CPU addmm backward segfaults when the bias stops gradient but x or the weight
    # needs one (a frozen Linear inside a LoRA-trained model, or downstream of one).
    return bias.stop_gradient and paddle.is_grad_enabled() and not (x.stop_gradient and weight.stop_gradient)


class Linear(paddle.nn.Linear):
    """``nn.Linear`` that runs half-precision weights in the input's dtype when they differ.

    On CPU, float16/bfloat16 checkpoints are kept in that dtype (memory) and upcast per call.
    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        weight, bias = cast(self.weight, x.dtype), cast(self.bias, x.dtype)
        if bias is None or device_has_half_kernels() or _addmm_grad_would_crash(x, weight, bias):
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
        return paddle.matmul(x, cast(self.weight, x.dtype))


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
            cast(self.weight, x.dtype),
            cast(self.bias, x.dtype),
            stride=self._stride,
            padding=padding,
            dilation=self._dilation,
            groups=self._groups,
            data_format=self._data_format,
        )
