"""The SD3 VAE: diffusers' ``AutoencoderKL`` (KL autoencoder, 16 latent channels, factor 8).

Config keys, defaults and state-dict names are diffusers' (``encoder.down_blocks.N.resnets.M``,
``...downsamplers.0.conv``, ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``,
``decoder.up_blocks.N.upsamplers.0.conv``, ``quant_conv``/``post_quant_conv`` when enabled), so
checkpoints load with only the Linear transpose. Numerics follow diffusers' ``Encoder``,
``Decoder``, ``ResnetBlock2D``, ``Downsample2D`` (asymmetric (0, 1, 0, 1) pad), ``Upsample2D``
(nearest x2) and the mid-block ``Attention`` (one head of width C, residual).

Tiling and slicing (``enable_tiling`` / ``enable_slicing``) have diffusers' attributes and tile
grid; tiles share the whole image's GroupNorm statistics and the latent-resolution part runs
whole (``sd3_core.vae_tiling``), so at the default tile size a tiled output equals the untiled one
(diffusers' tiles each differ, and it blends their seams).

Math runs in ``compute_dtype`` of the weights: their own dtype on GPU, float32 on CPU for
float16/bfloat16 weights (Paddle's CPU build lacks half kernels); outputs are in that dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from numbers import Integral, Real

import numpy as np
import paddle
import paddle.nn.functional as F

from sd3_core import (
    modeling,
    single_file,
    vae_tiling,
)
from sd3_core.group_norm import GroupNorm
from sd3_core.modeling import Linear, ModelMixin, compute_dtype

__all__ = ["AutoencoderKL", "DiagonalGaussian", "GroupNorm"]

_ACTIVATIONS: dict[str, Callable[[paddle.Tensor], paddle.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "gelu": F.gelu,
    "relu": F.relu,
}

# Paddle's CPU convolution builds an im2col buffer of C_in * k * k * H_out * W_out values (9x
# the input for a 3x3 conv): at 1024x1024 one 128-channel conv would need 4.5 GiB. Row bands
# cap that buffer at this many values (128 MiB in float32).
_IM2COL_ELEMENTS = 1 << 25
# Attention scores are computed for this many (query x key) pairs at a time: at 1024x1024 the
# 128x128 latent gives 16384 tokens, whose full score matrix would be 1 GiB per image.
_ATTENTION_CHUNK_ELEMENTS = 1 << 25


def _cast(t: paddle.Tensor | None, dtype: paddle.dtype) -> paddle.Tensor | None:
    return t if t is None or t.dtype == dtype else t.astype(dtype)


# ---- building blocks --------------------------------------------------------------------------


class Conv2D(modeling.Conv2D):
    """``modeling.Conv2D`` that on CPU convolves large inputs one band of output rows at a time.

    Every output row still sees exactly the inputs (and zero padding) it would see in one call,
    so results are unchanged; only the im2col buffer shrinks to ``_IM2COL_ELEMENTS``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | Sequence[int] = 0,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self._band_k, self._band_stride = kernel_size, stride
        # [top, bottom, left, right], the order paddle's conv2d takes a 4-element padding in
        self._band_pads = [padding] * 4 if isinstance(padding, int) else list(padding)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        k, s = self._band_k, self._band_stride
        top, bottom, left, right = self._band_pads
        b, c, h, w = x.shape
        h_out = (h + top + bottom - k) // s + 1
        w_out = (w + left + right - k) // s + 1
        rows = max(1, _IM2COL_ELEMENTS // (c * k * k * w_out))
        if (k == 1 and s == 1) or rows >= h_out or not x.place.is_cpu_place():
            return super().forward(x)
        weight, bias = _cast(self.weight, x.dtype), _cast(self.bias, x.dtype)
        out = paddle.empty([b, self._out_channels, h_out, w_out], dtype=x.dtype)
        for r0 in range(0, h_out, rows):
            r1 = min(r0 + rows, h_out)
            first, end = r0 * s - top, (r1 - 1) * s - top + k  # input rows the band reads
            band = x[:, :, max(first, 0) : min(end, h)]
            pads = [max(-first, 0), max(end - h, 0), left, right]
            out[:, :, r0:r1] = F.conv2d(band, weight, bias, stride=s, padding=pads)
        return out


class ResnetBlock2D(paddle.nn.Layer):
    """GroupNorm-act-conv twice plus a (1x1-conv when channels change) shortcut; no time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act: str, eps: float = 1e-6):
        super().__init__()
        self.act = _ACTIVATIONS[act]
        self.norm1 = GroupNorm(groups, in_channels, epsilon=eps)
        self.conv1 = Conv2D(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, epsilon=eps)
        self.conv2 = Conv2D(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2D(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # Rebinding h lets each full-resolution intermediate be freed as soon as it is used.
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(paddle.nn.Layer):
    """Stride-2 3x3 conv after zero-padding one row/column at the bottom/right (diffusers' (0,1,0,1))."""

    def __init__(self, channels: int):
        super().__init__()
        # The asymmetric pad is the conv's own padding [top, bottom, left, right]: no padded copy.
        self.conv = Conv2D(channels, channels, 3, stride=2, padding=[0, 1, 0, 1])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.conv(x)


class Upsample2D(paddle.nn.Layer):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2D(channels, channels, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def chunked_attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, N, d] tensors, a block of queries at a time.

    Each query row's softmax still sees every key, so the result equals full attention; only
    the peak memory (one block of scores instead of N x N) changes.
    """
    n_q, n_k, d = q.shape[1], k.shape[1], q.shape[2]
    q = q * (float(d) ** -0.5)
    block = max(1, _ATTENTION_CHUNK_ELEMENTS // max(n_k, 1))
    if block >= n_q:
        return paddle.matmul(F.softmax(paddle.matmul(q, k, transpose_y=True), axis=-1), v)
    parts = []
    for start in range(0, n_q, block):
        scores = paddle.matmul(q[:, start : start + block], k, transpose_y=True)
        parts.append(paddle.matmul(F.softmax(scores, axis=-1), v))
        del scores
    return paddle.concat(parts, axis=1)


class Attention(paddle.nn.Layer):
    """diffusers' VAE mid-block self-attention: GroupNorm, one head of width C, residual add."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, epsilon=eps)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = paddle.nn.LayerList([Linear(channels, channels)])  # "to_out.0" (1 is dropout)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape([b, c, h * w]).transpose([0, 2, 1])
        attn = chunked_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))
        del tokens
        out = self.to_out[0](attn).transpose([0, 2, 1]).reshape([b, c, h, w])
        return out + x


class UNetMidBlock2D(paddle.nn.Layer):
    """resnet, (attention, resnet) - the bottleneck of both encoder and decoder."""

    def __init__(self, channels: int, groups: int, act: str, add_attention: bool):
        super().__init__()
        self.resnets = paddle.nn.LayerList([ResnetBlock2D(channels, channels, groups, act) for _ in range(2)])
        self.attentions = paddle.nn.LayerList([Attention(channels, groups)] if add_attention else [])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class _ResnetStack(paddle.nn.Layer):
    """``num_layers`` resnets, then an optional resampler stored under diffusers' key name."""

    resampler_key = ""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, act: str, resampler
    ):
        super().__init__()
        self.resnets = paddle.nn.LayerList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act)
                for i in range(num_layers)
            ]
        )
        setattr(self, self.resampler_key, paddle.nn.LayerList([resampler]) if resampler else None)

    @property
    def resampler(self) -> paddle.nn.Layer | None:
        resamplers = getattr(self, self.resampler_key)
        return None if resamplers is None else resamplers[0]

    def run_resnets(self, x: paddle.Tensor) -> paddle.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.run_resnets(x)
        return x if self.resampler is None else self.resampler(x)


class DownEncoderBlock2D(_ResnetStack):
    resampler_key = "downsamplers"

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, act: str, downsample: bool
    ):
        sampler = Downsample2D(out_channels) if downsample else None
        super().__init__(in_channels, out_channels, num_layers, groups, act, sampler)


class UpDecoderBlock2D(_ResnetStack):
    resampler_key = "upsamplers"

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, act: str, upsample: bool
    ):
        sampler = Upsample2D(out_channels) if upsample else None
        super().__init__(in_channels, out_channels, num_layers, groups, act, sampler)


# ---- encoder and decoder ----------------------------------------------------------------------


class Encoder(paddle.nn.Layer):
    """Image [B, in, H, W] -> moments [B, 2 * latent, H / 2^(L-1), W / 2^(L-1)] (mean, logvar)."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        groups: int,
        act: str,
        mid_attention: bool,
    ):
        super().__init__()
        self.conv_in = Conv2D(in_channels, block_out_channels[0], 3, padding=1)
        blocks, prev = [], block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            last = i == len(block_out_channels) - 1
            blocks.append(DownEncoderBlock2D(prev, ch, layers_per_block, groups, act, downsample=not last))
            prev = ch
        self.down_blocks = paddle.nn.LayerList(blocks)
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], groups, act, mid_attention)
        self.conv_norm_out = GroupNorm(groups, block_out_channels[-1], epsilon=1e-6)
        self.conv_out = Conv2D(block_out_channels[-1], 2 * latent_channels, 3, padding=1)

    def tiled_layers(self) -> list[paddle.nn.Layer]:
        """What ``high_res`` runs (the part a tiled encode runs per tile)."""
        return [self.conv_in, *self.down_blocks[:-1]]

    def high_res(self, x: paddle.Tensor) -> paddle.Tensor:
        """Image -> features at latent resolution (every level but the last)."""
        x = self.conv_in(x)
        for block in self.down_blocks[:-1]:
            x = block(x)
        return x

    def low_res(self, x: paddle.Tensor) -> paddle.Tensor:
        """Features at latent resolution -> moments: the last level, mid block and output head."""
        x = self.mid_block(self.down_blocks[-1](x))
        # diffusers hard-codes SiLU here whatever act_fn says
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.low_res(self.high_res(x))


class Decoder(paddle.nn.Layer):
    """Latent [B, latent, h, w] -> image [B, out, h * 2^(L-1), w * 2^(L-1)]."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        groups: int,
        act: str,
        mid_attention: bool,
    ):
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = Conv2D(latent_channels, reversed_channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(reversed_channels[0], groups, act, mid_attention)
        blocks, prev = [], reversed_channels[0]
        for i, ch in enumerate(reversed_channels):
            last = i == len(reversed_channels) - 1
            blocks.append(UpDecoderBlock2D(prev, ch, layers_per_block + 1, groups, act, upsample=not last))
            prev = ch
        self.up_blocks = paddle.nn.LayerList(blocks)
        self.conv_norm_out = GroupNorm(groups, block_out_channels[0], epsilon=1e-6)
        self.conv_out = Conv2D(block_out_channels[0], out_channels, 3, padding=1)

    def tiled_layers(self) -> list[paddle.nn.Layer]:
        """What ``high_res`` runs (the part a tiled decode runs per tile)."""
        first = self.up_blocks[0].resampler
        return [
            *([first] if first is not None else []),
            *self.up_blocks[1:],
            self.conv_norm_out,
            self.conv_out,
        ]

    def low_res(self, z: paddle.Tensor) -> paddle.Tensor:
        """Latent -> features at latent resolution: conv_in, mid block, the first level's resnets."""
        return self.up_blocks[0].run_resnets(self.mid_block(self.conv_in(z)))

    def high_res(self, x: paddle.Tensor) -> paddle.Tensor:
        """Features at latent resolution -> image: every upsampling level and the output head."""
        first = self.up_blocks[0].resampler
        if first is not None:
            x = first(x)
        for block in self.up_blocks[1:]:
            x = block(x)
        # diffusers hard-codes SiLU here whatever act_fn says
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forward(self, z: paddle.Tensor) -> paddle.Tensor:
        return self.high_res(self.low_res(z))


# ---- posterior --------------------------------------------------------------------------------


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), logvar clamped to [-30, 20] like diffusers."""

    def __init__(self, moments: paddle.Tensor):
        self.parameters = moments
        self.mean, logvar = paddle.chunk(moments, 2, axis=1)
        self.logvar = paddle.clip(logvar, -30.0, 20.0)
        self.std = paddle.exp(0.5 * self.logvar)
        self.var = paddle.exp(self.logvar)

    def sample(
        self,
        noise: paddle.Tensor | np.ndarray | None = None,
        generator: np.random.Generator | Sequence[np.random.Generator] | None = None,
    ) -> paddle.Tensor:
        """``mean + std * noise``; noise is given, drawn from NumPy generator(s) (one, or one per
        batch row, as the pipeline's latents are), or else from paddle's global RNG."""
        shape = list(self.mean.shape)
        if noise is not None and generator is not None:
            raise ValueError("DiagonalGaussian.sample: pass either noise or generator, not both")
        if noise is None and generator is not None:
            if isinstance(generator, np.random.Generator):
                noise = generator.standard_normal(shape, dtype=np.float32)
            else:
                if len(generator) != shape[0]:
                    raise ValueError(
                        f"DiagonalGaussian.sample: got {len(generator)} generators for a batch of {shape[0]}"
                    )
                noise = np.stack([g.standard_normal(shape[1:], dtype=np.float32) for g in generator])
        if noise is None:
            noise = paddle.randn(shape, dtype="float32")
        elif isinstance(noise, np.ndarray):
            noise = paddle.to_tensor(noise)
        if list(noise.shape) != shape:
            raise ValueError(
                f"DiagonalGaussian.sample: noise shape {list(noise.shape)} != latent shape {shape}"
            )
        return self.mean + self.std * noise.astype(self.mean.dtype)

    def mode(self) -> paddle.Tensor:
        return self.mean

    def kl(self) -> paddle.Tensor:
        """KL divergence to N(0, I), summed over channel and spatial axes (one value per row)."""
        return 0.5 * paddle.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, axis=[1, 2, 3])


# ---- the model --------------------------------------------------------------------------------


class AutoencoderKL(ModelMixin):
    """diffusers' ``AutoencoderKL``; keyword names and defaults are its config keys.

    SD3 uses ``latent_channels=16, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False``.
    """

    diffusers_class_name = "AutoencoderKL"

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | Sequence[int] = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        _check_config(
            down_block_types,
            up_block_types,
            block_out_channels,
            layers_per_block,
            act_fn,
            latent_channels,
            norm_num_groups,
        )
        channels = [int(c) for c in block_out_channels]
        self.encoder = Encoder(
            in_channels,
            latent_channels,
            channels,
            layers_per_block,
            norm_num_groups,
            act_fn,
            mid_block_add_attention,
        )
        self.decoder = Decoder(
            latent_channels,
            out_channels,
            channels,
            layers_per_block,
            norm_num_groups,
            act_fn,
            mid_block_add_attention,
        )
        self.quant_conv = Conv2D(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = Conv2D(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        #: Encode / decode one batch row at a time (``enable_slicing``).
        self.use_slicing = False
        #: Encode / decode inputs larger than one tile as overlapping tiles (``enable_tiling``).
        self.use_tiling = False
        # Tile geometry as diffusers sets it: the config's sample_size, a quarter overlap.
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self._tile_sample_min_size = int(size)
        self._tile_overlap_factor = 0.25

    @classmethod
    def from_single_file(
        cls,
        path_or_url: str | os.PathLike,
        config: str | os.PathLike | None = None,
        subfolder: str | None = None,
        dtype: str | paddle.dtype = "float32",
    ) -> AutoencoderKL:
        """Load the VAE of an original-layout single file (``first_stage_model.*``, LDM names).

        Structure is read from the keys; ``config`` (a diffusers pipeline or VAE folder,
        ``subfolder`` inside it) supplies what keys lack (group count, latent scaling).
        """
        return single_file.load_model(cls, single_file.VAE, path_or_url, config, subfolder, dtype)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for SD3)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _input(self, x: paddle.Tensor, channels: int, what: str) -> paddle.Tensor:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(
                f"AutoencoderKL.{what}: expected [B, {channels}, H, W], got shape {list(x.shape)}"
            )
        return _cast(x, compute_dtype(self.dtype))

    # ---- tiling and slicing (diffusers' names) -------------------------------------------------

    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Encode and decode inputs larger than one tile as overlapping tiles (``sd3_core.vae_tiling``).

        Memory then depends on the tile size (``tile_sample_min_size`` pixels, by default the
        config's ``sample_size``) and on the latent-resolution part, which runs whole (1/64 of the
        pixels). ``use_tiling`` is the older diffusers / PPDiffusers argument."""
        self.use_tiling = bool(use_tiling)

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode and decode a batch one row at a time (same results, less memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    @property
    def tile_sample_min_size(self) -> int:
        """Tile side in pixels; inputs up to this size are not tiled."""
        return self._tile_sample_min_size

    @tile_sample_min_size.setter
    def tile_sample_min_size(self, value: int) -> None:
        if not _is_int(value) or value <= 0 or value % self.scale_factor:
            raise ValueError(
                f"AutoencoderKL.tile_sample_min_size={value!r} must be a positive multiple of the VAE "
                f"factor {self.scale_factor} (pixels per latent cell)"
            )
        self._tile_sample_min_size = int(value)

    @property
    def tile_latent_min_size(self) -> int:
        """Tile side in latent cells: ``tile_sample_min_size / scale_factor`` (setting one sets both)."""
        return self._tile_sample_min_size // self.scale_factor

    @tile_latent_min_size.setter
    def tile_latent_min_size(self, value: int) -> None:
        if not _is_int(value) or value <= 0:
            raise ValueError(f"AutoencoderKL.tile_latent_min_size={value!r} must be a positive integer")
        self._tile_sample_min_size = int(value) * self.scale_factor

    @property
    def tile_overlap_factor(self) -> float:
        """Fraction of a tile shared with its neighbour (half of it on each side of their border)."""
        return self._tile_overlap_factor

    @tile_overlap_factor.setter
    def tile_overlap_factor(self, value: float) -> None:
        if not isinstance(value, Real) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"AutoencoderKL.tile_overlap_factor={value!r} must be a number in [0, 1)")
        self._tile_overlap_factor = float(value)

    def _tiled(self, x: paddle.Tensor, coder: Encoder | Decoder) -> paddle.Tensor:
        """``coder.high_res`` over overlapping tiles of ``x`` sharing GroupNorm statistics."""
        plan = vae_tiling.tile_plan(
            self.tile_sample_min_size,
            self.tile_latent_min_size,
            self.tile_overlap_factor,
            self.scale_factor,
            decode=coder is self.decoder,
        )
        norms = [
            m for layer in coder.tiled_layers() for m in layer.sublayers(True) if isinstance(m, GroupNorm)
        ]
        return vae_tiling.tiled(x, coder.high_res, plan, norms)

    def _rows(self, x: paddle.Tensor, run: Callable[[paddle.Tensor], paddle.Tensor]) -> paddle.Tensor:
        """``run(x)``, or one batch row at a time when slicing."""
        if self.use_slicing and x.shape[0] > 1:
            return paddle.concat([run(x[i : i + 1]) for i in range(x.shape[0])])
        return run(x)

    # ---- encode / decode --------------------------------------------------------------------------

    def _encode(self, x: paddle.Tensor, tiled: bool | None = None) -> paddle.Tensor:
        if tiled is None:
            tiled = self.use_tiling and max(x.shape[2], x.shape[3]) > self.tile_sample_min_size
        h = self._tiled(x, self.encoder) if tiled else self.encoder.high_res(x)
        moments = self.encoder.low_res(h)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _decode(self, z: paddle.Tensor, tiled: bool | None = None) -> paddle.Tensor:
        if tiled is None:
            tiled = self.use_tiling and max(z.shape[2], z.shape[3]) > self.tile_latent_min_size
        h = self.decoder.low_res(z if self.post_quant_conv is None else self.post_quant_conv(z))
        return self._tiled(h, self.decoder) if tiled else self.decoder.high_res(h)

    def encode(self, x: paddle.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1], ``[B, in_channels, H, W]`` -> posterior over ``[B, latent, H/8, W/8]``."""
        return DiagonalGaussian(self._rows(self._input(x, self.config.in_channels, "encode"), self._encode))

    def decode(self, z: paddle.Tensor) -> paddle.Tensor:
        """Latents (already ``/ scaling_factor + shift_factor``) -> images ``[B, out, 8h, 8w]``, ~[-1, 1]."""
        return self._rows(self._input(z, self.config.latent_channels, "decode"), self._decode)

    def tiled_encode(self, x: paddle.Tensor) -> DiagonalGaussian:
        """``encode`` in tiles whatever ``use_tiling`` and the image size say (diffusers' method name)."""
        return DiagonalGaussian(self._encode(self._input(x, self.config.in_channels, "tiled_encode"), True))

    def tiled_decode(self, z: paddle.Tensor) -> paddle.Tensor:
        """``decode`` in tiles whatever ``use_tiling`` and the latent size say (diffusers' method name)."""
        return self._decode(self._input(z, self.config.latent_channels, "tiled_decode"), True)

    def forward(
        self,
        sample: paddle.Tensor,
        sample_posterior: bool = False,
        generator: np.random.Generator | None = None,
    ) -> paddle.Tensor:
        """Reconstruct: encode, take the posterior mode (or a sample), decode."""
        posterior = self.encode(sample)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z)


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_config(
    down_block_types,
    up_block_types,
    block_out_channels,
    layers_per_block,
    act_fn,
    latent_channels,
    norm_num_groups,
) -> None:
    levels = len(block_out_channels)
    if levels == 0:
        raise ValueError("AutoencoderKL config: block_out_channels is empty")
    for key, types, want in (
        ("down_block_types", down_block_types, "DownEncoderBlock2D"),
        ("up_block_types", up_block_types, "UpDecoderBlock2D"),
    ):
        if len(types) != levels:
            raise ValueError(
                f"AutoencoderKL config: {key} has {len(types)} entries but block_out_channels has {levels}"
            )
        other = sorted({t for t in types if t != want})
        if other:
            raise ValueError(f"AutoencoderKL config: {key} {other} not supported (only {want!r})")
    bad = [c for c in block_out_channels if int(c) % int(norm_num_groups)]
    if bad:
        raise ValueError(
            f"AutoencoderKL config: block_out_channels {list(block_out_channels)} must be multiples of "
            f"norm_num_groups={norm_num_groups} (not {bad})"
        )
    if act_fn not in _ACTIVATIONS:
        raise ValueError(f"AutoencoderKL config: act_fn={act_fn!r} not supported ({sorted(_ACTIVATIONS)})")
    if layers_per_block < 1 or latent_channels < 1:
        raise ValueError(
            f"AutoencoderKL config: layers_per_block={layers_per_block} and latent_channels={latent_channels} "
            "must be >= 1"
        )
