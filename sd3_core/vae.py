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

from sd3_core import single_file, vae_tiling
from sd3_core.dtypes import cast, compute_dtype
from sd3_core.group_norm import GroupNorm
from sd3_core.model_config import register_to_config
from sd3_core.modeling import ModelMixin
from sd3_core.outputs import AutoencoderKLOutput, DecoderOutput, component_return
from sd3_core.vae_blocks import ACTIVATIONS, Conv2D, Decoder, Encoder

__all__ = ["AutoencoderKL", "DiagonalGaussian", "GroupNorm"]


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

    @register_to_config
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
        self._tile_tolerance = vae_tiling.TOLERANCE

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
        return cast(x, compute_dtype(self.dtype))

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

    @property
    def tile_tolerance(self) -> float:
        """How settled the whole-image GroupNorm statistics must be before a tiled pass's output is
        returned (``sd3_core.vae_tiling``). ``0`` runs every pass (exact); ``float("inf")`` returns
        the first stitched pass (two passes over the tiles: fastest, not exact)."""
        return self._tile_tolerance

    @tile_tolerance.setter
    def tile_tolerance(self, value: float) -> None:
        if not isinstance(value, Real) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"AutoencoderKL.tile_tolerance={value!r} must be a number >= 0 (inf allowed)")
        self._tile_tolerance = float(value)

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
        return vae_tiling.tiled(x, coder.high_res, plan, norms, self.tile_tolerance)

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

    # ``return_dict`` as in diffusers (sd3_core.outputs): ``.latent_dist`` / ``.sample`` by default.
    def encode(self, x: paddle.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images in [-1, 1], ``[B, in_channels, H, W]`` -> posterior over ``[B, latent, H/8, W/8]``."""
        posterior = DiagonalGaussian(
            self._rows(self._input(x, self.config.in_channels, "encode"), self._encode)
        )
        return component_return(AutoencoderKLOutput(posterior), return_dict)

    def decode(self, z: paddle.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Latents (already ``/ scaling_factor + shift_factor``) -> images ``[B, out, 8h, 8w]``, ~[-1, 1]."""
        images = self._rows(self._input(z, self.config.latent_channels, "decode"), self._decode)
        return component_return(DecoderOutput(images), return_dict)

    def tiled_encode(self, x: paddle.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """``encode`` in tiles whatever ``use_tiling`` and the image size say (diffusers' method name)."""
        posterior = DiagonalGaussian(
            self._encode(self._input(x, self.config.in_channels, "tiled_encode"), True)
        )
        return component_return(AutoencoderKLOutput(posterior), return_dict)

    def tiled_decode(self, z: paddle.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """``decode`` in tiles whatever ``use_tiling`` and the latent size say (diffusers' method name)."""
        images = self._decode(self._input(z, self.config.latent_channels, "tiled_decode"), True)
        return component_return(DecoderOutput(images), return_dict)

    def forward(
        self,
        sample: paddle.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: np.random.Generator | None = None,
    ) -> DecoderOutput | tuple:
        """Reconstruct: encode, take the posterior mode (or a sample), decode (diffusers' order of
        arguments)."""
        posterior = self.encode(sample, return_dict=False)[0]
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)


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
    if act_fn not in ACTIVATIONS:
        raise ValueError(f"AutoencoderKL config: act_fn={act_fn!r} not supported ({sorted(ACTIVATIONS)})")
    if layers_per_block < 1 or latent_channels < 1:
        raise ValueError(
            f"AutoencoderKL config: layers_per_block={layers_per_block} and latent_channels={latent_channels} "
            "must be >= 1"
        )
