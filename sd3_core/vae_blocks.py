"""The SD3 VAE's building blocks, as diffusers names and computes them: ``Encoder``, ``Decoder``,
``ResnetBlock2D``, ``Downsample2D`` (asymmetric (0, 1, 0, 1) pad), ``Upsample2D`` (nearest x2),
the mid-block ``Attention`` (one head of width C, residual), and a CPU-memory-bounded ``Conv2D``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import paddle
import paddle.nn.functional as F

from sd3_core import layers
from sd3_core.dtypes import cast
from sd3_core.group_norm import GroupNorm
from sd3_core.layers import Linear

ACTIVATIONS: dict[str, Callable[[paddle.Tensor], paddle.Tensor]] = {
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


# ---- building blocks --------------------------------------------------------------------------


class Conv2D(layers.Conv2D):
    """``layers.Conv2D`` that on CPU convolves large inputs one band of output rows at a time.

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
        weight, bias = cast(self.weight, x.dtype), cast(self.bias, x.dtype)
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
        self.act = ACTIVATIONS[act]
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
