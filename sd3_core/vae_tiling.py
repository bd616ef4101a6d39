"""Tiled VAE passes that compute the untiled result: whole-image GroupNorm statistics, no seams.

The tile grid is diffusers' (``tile_sample_min_size``, ``tile_latent_min_size``,
``tile_overlap_factor``), but diffusers normalises every tile with its own GroupNorm statistics
and runs the mid-block attention per tile, so its tiled image differs from the untiled one
everywhere, and it blends the overlaps to hide the seams that makes. Here only the
high-resolution part of the network runs in tiles (the latent-resolution part, attention
included, runs whole: 1/64 of the pixels), its GroupNorms use the whole image's statistics,
and each tile contributes only the cells it owns: a partition of the image whose borders lie half
an overlap inside the tiles. Where half the overlap exceeds the tiled part's reach (the SD3
decoder's: 50 px, against 128 px at the default 1024 px tiles) every owned cell is computed
exactly as untiled, so the stitched output equals the untiled one, with no seams to blend.

The statistics are gathered tile by tile over the owned cells (Chan's parallel formula). A pass
normalises with what the previous one gathered (the first, with each tile's own), so pass ``p``
gathers exact statistics for the first ``p`` GroupNorms. Every pass after the first also stitches
an output; the first whose pass found the statistics settled (``TOLERANCE``) is returned, at the
latest that of pass ``1 + number of GroupNorms``, exact by construction. A smooth (trained)
decoder settles in a few passes; a random one amplifies small differences and needs them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import paddle

from sd3_core.group_norm import group_moments

#: Statistics have settled when no group's mean moves by more than this many of its standard
#: deviations, nor its variance by more than this fraction, from one pass to the next. Measured on
#: the embedded default model's trained VAE (512 px image, 256 px tiles): 1e-3 stops after 10 of
#: at most 14 passes, 0.03/255 from untiled; 1e-2 after 7, 0.46/255; 1e-5 after 12, 0.001/255.
#: Zero runs every pass (exact). A VAE's own setting: ``AutoencoderKL.tile_tolerance``.
TOLERANCE = 1e-3


class TilePlan(NamedTuple):
    """Tiles of ``tile`` input cells every ``step``; ``unit`` input cells per latent cell."""

    tile: int
    step: int
    unit: int


def tile_plan(sample: int, latent: int, overlap: float, scale: int, decode: bool) -> TilePlan:
    """diffusers' grid for ``tile_sample_min_size=sample`` (``tile_latent_min_size=latent``) and
    ``tile_overlap_factor=overlap``: decode tiles of ``latent`` cells, encode tiles of ``sample``
    pixels, a new one every ``(1 - overlap)`` of a tile (in whole latent cells)."""
    step = max(1, int(latent * (1 - overlap)))
    return TilePlan(latent, step, 1) if decode else TilePlan(sample, step * scale, scale)


def _owned(length: int, plan: TilePlan) -> list[tuple[int, int]]:
    """Per tile along one axis: the span of coarse cells it owns (global coordinates)."""
    cells, step, tile = math.ceil(length / plan.unit), plan.step // plan.unit, plan.tile // plan.unit
    starts = list(range(0, cells, step))
    half = (tile - step) // 2
    spans = []
    for t, start in enumerate(starts):
        lo = 0 if t == 0 else min(cells, start + half)
        hi = cells if t == len(starts) - 1 else min(cells, starts[t + 1] + half)
        spans.append((lo, max(lo, hi)))
    return spans


class _Window:
    """The tile being run: its origin and owned span in coarse cells, and its input size."""

    def __init__(self, plan: TilePlan):
        self.plan = plan
        self.origin = (0, 0)
        self.rows = self.cols = (0, 0)
        self.size = (1, 1)

    def local(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The owned cells of an activation of ``height x width`` inside this tile."""
        (r0, r1), (c0, c1), (oy, ox) = self.rows, self.cols, self.origin
        ry = self.plan.unit * 2.0 ** round(math.log2(height / self.size[0]))  # layer cells per coarse cell
        rx = self.plan.unit * 2.0 ** round(math.log2(width / self.size[1]))

        def clip(v: float, n: int) -> int:
            return min(n, max(0, int(round(v))))

        return (clip((r0 - oy) * ry, height), clip((r1 - oy) * ry, height),
                clip((c0 - ox) * rx, width), clip((c1 - ox) * rx, width))  # fmt: skip


class GroupStatistics:
    """One GroupNorm's per-sample, per-group mean and variance over the whole image."""

    def __init__(self, window: _Window):
        self.window = window
        self.known: tuple[paddle.Tensor, paddle.Tensor] | None = None
        self._count, self._mean, self._m2 = 0.0, None, None

    def moments(self, x: paddle.Tensor, groups: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Gather the statistics of this tile's owned cells; return the whole image's (from the
        previous pass), or on the first pass the tile's own."""
        y0, y1, x0, x1 = self.window.local(x.shape[2], x.shape[3])
        if y1 > y0 and x1 > x0:
            part = x[:, :, y0:y1, x0:x1]
            n = float(part.shape[1] // groups * part.shape[2] * part.shape[3])
            mean, var = group_moments(part, groups)
            if self._mean is None:
                self._count, self._mean, self._m2 = n, mean, var * n
            else:  # Chan et al.'s pairwise update
                total = self._count + n
                delta = mean - self._mean
                self._mean = self._mean + delta * (n / total)
                self._m2 = self._m2 + var * n + delta * delta * (self._count * n / total)
                self._count = total
        return group_moments(x, groups) if self.known is None else self.known

    def next_pass(self) -> float:
        """Normalise with what this pass gathered from now on; gather afresh. Returns how far the
        statistics moved (``inf`` after the first pass)."""
        mean, var = self._mean, self._m2 / self._count
        moved = float("inf")
        if self.known is not None:
            old_mean, old_var = self.known
            scale = var + 1e-12
            moved = max(
                float(((mean - old_mean).abs() / scale.sqrt()).max()),
                float(((var - old_var).abs() / scale).max()),
            )
        self.known = (mean, var)
        self._count, self._mean, self._m2 = 0.0, None, None
        return moved


def tiled(
    x: paddle.Tensor,
    run: Callable[[paddle.Tensor], paddle.Tensor],
    plan: TilePlan,
    norms: Sequence[paddle.nn.Layer],
    tolerance: float = TOLERANCE,
) -> paddle.Tensor:
    """``run`` over overlapping tiles of ``x``, stitched; the GroupNorms ``norms`` (those ``run``
    applies; each with a ``statistics`` slot) use whole-image statistics meanwhile. The output of
    the first pass whose statistics moved less than ``tolerance`` is returned (see the module
    docstring; ``inf``: the first stitched pass, ``0``: the exact last one)."""
    window = _Window(plan)
    height, width = x.shape[2], x.shape[3]
    row_spans, col_spans = _owned(height, plan), _owned(width, plan)

    def tile(ti: int, tj: int) -> paddle.Tensor:
        i, j = ti * plan.step, tj * plan.step
        part = x[:, :, i : i + plan.tile, j : j + plan.tile]
        window.origin = (i // plan.unit, j // plan.unit)
        window.rows, window.cols, window.size = row_spans[ti], col_spans[tj], (part.shape[2], part.shape[3])
        return run(part)

    stats = [GroupStatistics(window) for _ in norms]
    for norm, s in zip(norms, stats, strict=True):
        norm.statistics = s

    def stitched() -> paddle.Tensor:
        rows = []
        for ti in range(len(row_spans)):
            row = []
            for tj in range(len(col_spans)):
                out = tile(ti, tj)
                y0, y1, x0, x1 = window.local(out.shape[2], out.shape[3])
                row.append(out[:, :, y0:y1, x0:x1])
            rows.append(paddle.concat(row, axis=3))
        return paddle.concat(rows, axis=2)

    try:
        if not norms:
            return stitched()
        for ti in range(len(row_spans)):  # the first pass only gathers
            for tj in range(len(col_spans)):
                tile(ti, tj)
        for s in stats:
            s.next_pass()
        for p in range(len(norms)):  # the last of these uses exact statistics
            out = stitched()
            if max(s.next_pass() for s in stats) < tolerance or p == len(norms) - 1:
                return out
            del out
    finally:
        for norm in norms:
            norm.statistics = None
