"""MM-DiT input embeddings: patches + 2-D sin-cos positions, timestep and pooled-text vectors.

Numerics follow diffusers' ``PatchEmbed`` and ``CombinedTimestepTextProjEmbeddings``; the
state-dict names (``proj``, ``pos_embed``, ``linear_1``, ``linear_2``) are theirs.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.nn.initializer.lazy_init import lazy_init_helper

from sd3_core.layers import Conv2D, Linear

__all__ = [
    "CombinedTimestepTextProjEmbeddings",
    "MLPEmbedder",
    "PatchEmbed",
    "sincos_pos_embed_2d",
    "timestep_sinusoid",
]


# ---- sinusoids --------------------------------------------------------------------------------


def _timestep_frequencies(half: int, max_period: float) -> np.ndarray:
    # The exponent is formed in float32 exactly as diffusers does (IEEE mul/div agree across
    # libraries); exp is taken in float64 and rounded once so no library's float32 exp
    # rounding shows up in phases of up to ~1000 radians.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_sinusoid(t: paddle.Tensor, dim: int = 256, max_period: float = 10000.0) -> paddle.Tensor:
    """``[cos(t*f), sin(t*f)]`` with ``f = max_period^(-i/half)`` in float32 (flip_sin_to_cos, shift 0)."""
    if t.ndim != 1:
        raise ValueError(f"timestep must be 1-D [batch], got shape {list(t.shape)}")
    half = dim // 2
    args = t.astype("float32")[:, None] * paddle.to_tensor(_timestep_frequencies(half, max_period))[None, :]
    emb = paddle.concat([paddle.cos(args), paddle.sin(args)], axis=-1)
    if dim % 2:
        emb = paddle.concat([emb, paddle.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    # float64 frequencies, as diffusers computes them; positions are float32 values.
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(
    embed_dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0
) -> np.ndarray:
    """The ``[grid_size^2, embed_dim]`` float32 table; row ``i*grid+j`` is ``[E(col j), E(row i)]``.

    Positions are ``arange(grid) / (grid / base_size) / interpolation_scale``. The first half
    encodes the column, as in diffusers/MAE (their meshgrid puts w first).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by 4 for 2-D sin-cos positions")
    pos = (
        np.arange(grid_size, dtype=np.float32)
        / np.float32(grid_size / base_size)
        / np.float32(interpolation_scale)
    )
    axis = _sincos_1d(embed_dim // 2, pos).astype(np.float32)  # [grid, D/2]
    table = np.empty((grid_size, grid_size, embed_dim), dtype=np.float32)
    table[:, :, : embed_dim // 2] = axis[None, :, :]  # column j
    table[:, :, embed_dim // 2 :] = axis[:, None, :]  # row i
    return table.reshape(grid_size * grid_size, embed_dim)


# ---- patch embedding --------------------------------------------------------------------------


class PatchEmbed(paddle.nn.Layer):
    """Conv patchify + a 2-D sin-cos table centre-cropped from a ``pos_embed_max_size`` grid."""

    def __init__(
        self,
        sample_size: int,
        patch_size: int,
        in_channels: int,
        embed_dim: int,
        pos_embed_max_size: int | None,
        interpolation_scale: float = 1.0,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.pos_embed_max_size = pos_embed_max_size
        self.base_size = sample_size // patch_size
        self.interpolation_scale = interpolation_scale
        self.proj = Conv2D(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        grid = pos_embed_max_size or self.base_size
        if lazy_init_helper().state:
            # Being built for a checkpoint load, which overwrites the table: skip computing it.
            table = paddle.zeros([1, grid * grid, embed_dim], dtype=paddle.get_default_dtype())
        else:
            table = paddle.to_tensor(
                sincos_pos_embed_2d(embed_dim, grid, self.base_size, interpolation_scale)[None]
            )
            table = table.astype(paddle.get_default_dtype())
        # Only the SD3 (max-size) table is part of diffusers' state dict.
        self.register_buffer("pos_embed", table, persistable=pos_embed_max_size is not None)

    def cropped_pos_embed(self, height: int, width: int) -> paddle.Tensor:
        """Positions for a ``height x width`` patch grid: ``[1, height*width, D]``."""
        max_size = self.pos_embed_max_size
        if max_size is None:
            if (height, width) == (self.base_size, self.base_size):
                return self.pos_embed
            # Mirrors diffusers: a different size gets a freshly computed (uncropped) table.
            table = _sincos_rect(self.embed_dim, height, width, self.base_size, self.interpolation_scale)
            return paddle.to_tensor(table[None])
        if height > max_size or width > max_size:
            raise ValueError(
                f"latent patch grid {height}x{width} exceeds pos_embed_max_size={max_size} "
                f"(latent {height * self.patch_size}x{width * self.patch_size}); use a smaller image"
            )
        top = (max_size - height) // 2
        left = (max_size - width) // 2
        table = self.pos_embed.reshape([max_size, max_size, self.embed_dim])
        return table[top : top + height, left : left + width, :].reshape([1, height * width, self.embed_dim])

    def forward(self, latent: paddle.Tensor) -> paddle.Tensor:
        """``[B, C, H, W]`` latents -> ``[B, (H/p)*(W/p), D]`` tokens with positions added."""
        height, width = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        x = self.proj(latent).flatten(2).transpose([0, 2, 1])
        pos = self.cropped_pos_embed(height, width)
        return x + (pos if pos.dtype == x.dtype else pos.astype(x.dtype))


def _sincos_rect(embed_dim: int, height: int, width: int, base_size: int, scale: float) -> np.ndarray:
    pos_h = np.arange(height, dtype=np.float32) / np.float32(height / base_size) / np.float32(scale)
    pos_w = np.arange(width, dtype=np.float32) / np.float32(width / base_size) / np.float32(scale)
    e_h = _sincos_1d(embed_dim // 2, pos_h).astype(np.float32)
    e_w = _sincos_1d(embed_dim // 2, pos_w).astype(np.float32)
    table = np.empty((height, width, embed_dim), dtype=np.float32)
    table[:, :, : embed_dim // 2] = e_w[None, :, :]
    table[:, :, embed_dim // 2 :] = e_h[:, None, :]
    return table.reshape(height * width, embed_dim)


# ---- conditioning vectors ---------------------------------------------------------------------


class MLPEmbedder(paddle.nn.Layer):
    """Linear -> SiLU -> Linear (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, hidden_dim)
        self.linear_2 = Linear(hidden_dim, hidden_dim)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(paddle.nn.Layer):
    """``temb = timestep_embedder(sinusoid_256(t)) + text_embedder(pooled)``."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, embedding_dim)
        self.text_embedder = MLPEmbedder(pooled_projection_dim, embedding_dim)

    def forward(self, timestep: paddle.Tensor, pooled: paddle.Tensor) -> paddle.Tensor:
        t_emb = self.timestep_embedder(timestep_sinusoid(timestep).astype(pooled.dtype))
        return t_emb + self.text_embedder(pooled)
