"""GroupNorm computed like torch's, with a slot for statistics shared across tiles.

Untiled, Paddle's GroupNorm kernel runs on data centred first: it takes E[x^2] - E[x]^2, which
loses all precision when a group's mean is large relative to its spread (an offset of 100
already costs 1e-2); the result is shift-invariant. Shared statistics (``sd3_core.vae_tiling``)
are summed per row in float32 (a few thousand values), then over rows in float64: Paddle's
``sum`` adds float32 values one after another, 0.4% off in the variance over 4 Mi values.
"""

from __future__ import annotations

from typing import Protocol

import paddle
import paddle.nn.functional as F


def group_moments(x: paddle.Tensor, groups: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Per-sample, per-group mean and (biased) variance of ``x [B, C, H, W]``, as float64 ``[B, G]``."""
    b, c, h, w = x.shape
    rows = x.reshape([b, groups, (c // groups) * h, w])
    n = float((c // groups) * h * w)
    mean = rows.sum(axis=-1, dtype="float32").astype("float64").sum(axis=-1) / n
    centred = rows - mean.astype(x.dtype).reshape([b, groups, 1, 1])
    var = (centred * centred).sum(axis=-1, dtype="float32").astype("float64").sum(axis=-1) / n
    return mean, var


class SharedStatistics(Protocol):
    def moments(self, x: paddle.Tensor, groups: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """The mean and variance ``[B, G]`` (float64) to normalise this ``x`` with."""


class GroupNorm(paddle.nn.GroupNorm):
    """``nn.GroupNorm`` (affine), accurate for offset activations (see the module docstring).

    ``statistics`` set (by a tiled pass, ``sd3_core.vae_tiling``) supplies the whole image's.
    """

    statistics: SharedStatistics | None = None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        g = self._num_groups
        weight = None if self.weight is None else self.weight.astype(x.dtype)
        bias = None if self.bias is None else self.bias.astype(x.dtype)
        if self.statistics is None:
            grouped = x.reshape([x.shape[0], g, -1])
            centred = (grouped - grouped.mean(axis=-1, keepdim=True)).reshape(x.shape)
            del grouped
            return F.group_norm(centred, g, self._epsilon, weight, bias)
        b, c = x.shape[0], x.shape[1]
        mean, var = self.statistics.moments(x, g)
        inv = paddle.rsqrt(var + self._epsilon).astype(x.dtype)
        scale = inv.reshape([b, g, 1]).expand([b, g, c // g]).reshape([b, c])
        shift = -mean.astype(x.dtype).reshape([b, g, 1]).expand([b, g, c // g]).reshape([b, c]) * scale
        if weight is not None:
            scale, shift = scale * weight, shift * weight
        if bias is not None:
            shift = shift + bias
        return x * scale.reshape([b, c, 1, 1]) + shift.reshape([b, c, 1, 1])
