"""The SD3 / SD3.5 MM-DiT (diffusers' ``SD3Transformer2DModel``) on Paddle.

Embeddings, the joint blocks (:mod:`sd3_core.transformer_blocks`) and the final adaLN and
un-patchify. Config keys, defaults and state-dict names are diffusers'.

Samples are independent in an MM-DiT, so the model runs each one through the blocks as 2-D
``[tokens, D]`` tensors with ``[D]`` modulation vectors. On Paddle's CPU kernels this is much
faster than batched 3-D tensors: broadcasting a ``[B, 1, D]`` vector over ``[B, L, D]`` costs
about ten times a ``[D]`` vector over ``[L, D]``, and with per-sample vectors the adaLN
modulation fuses into LayerNorm's affine step (one pass instead of three).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import paddle
import paddle.nn.functional as F

from sd3_core import single_file
from sd3_core.dtypes import compute_dtype
from sd3_core.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from sd3_core.layers import Linear
from sd3_core.lora import joint_attention_scale, scaled_adapters
from sd3_core.model_config import register_to_config
from sd3_core.modeling import ModelMixin
from sd3_core.outputs import Transformer2DModelOutput, component_return
from sd3_core.transformer_blocks import (
    AdaLNModulation,
    JointTransformerBlock,
    ReducePartialSums,
    modulated_norm,
)

__all__ = ["SD3Transformer2DModel"]


# ---- model ------------------------------------------------------------------------------------


class SD3Transformer2DModel(ModelMixin):
    """MM-DiT denoiser; ``forward(latents, text tokens, pooled text, timestep) -> velocity``."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: Sequence[int] = (),
        qk_norm: str | None = None,
    ):
        super().__init__()
        self.inner_dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels if out_channels is not None else in_channels
        if caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim={caption_projection_dim} must equal num_attention_heads * "
                f"attention_head_dim = {self.inner_dim} (the context stream shares the block width)"
            )
        bad = [i for i in dual_attention_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"dual_attention_layers {bad} are outside 0..{num_layers - 1} (num_layers={num_layers})"
            )
        shards = self.tensor_parallel_shards()
        self.pos_embed = PatchEmbed(sample_size, patch_size, in_channels, self.inner_dim, pos_embed_max_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(self.inner_dim, pooled_projection_dim)
        self.context_embedder = Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = paddle.nn.LayerList(
            [
                JointTransformerBlock(
                    self.inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    context_pre_only=i == num_layers - 1,
                    qk_norm=qk_norm,
                    use_dual_attention=i in dual_attention_layers,
                    shards=shards,
                )
                for i in range(num_layers)
            ]
        )
        self.norm_out = AdaLNModulation(self.inner_dim, 2, shards)  # AdaLayerNormContinuous: (scale, shift)
        self.proj_out = Linear(self.inner_dim, patch_size * patch_size * self.out_channels)
        self.gradient_checkpointing = False  # diffusers' attribute; see enable_gradient_checkpointing

    @classmethod
    def from_single_file(
        cls,
        path_or_url: str | os.PathLike,
        config: str | os.PathLike | None = None,
        subfolder: str | None = None,
        dtype: str | paddle.dtype = "float32",
    ) -> SD3Transformer2DModel:
        """Load the MM-DiT of an original-layout single file (``model.diffusion_model.joint_blocks...``).

        The config is read from the keys (SD3 / SD3.5, qk-norm, dual attention); ``config`` (a
        diffusers pipeline or transformer folder, ``subfolder`` inside it) supplies what keys lack.
        """
        return single_file.load_model(cls, single_file.TRANSFORMER, path_or_url, config, subfolder, dtype)

    # ---- diffusers' switches
    def enable_gradient_checkpointing(self) -> None:
        """Recompute each joint block's activations in backward instead of keeping them
        (diffusers' method; used while gradients are recorded, so inference is unchanged)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        """Keep the blocks' activations for backward again."""
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    def fuse_qkv_projections(self) -> None:
        """No effect here; warns. The optimised path already runs q, k and v as one GEMM per stream."""
        _no_effect("fuse_qkv_projections")

    def unfuse_qkv_projections(self) -> None:
        """No effect here (see ``fuse_qkv_projections``); warns."""
        _no_effect("unfuse_qkv_projections")

    def set_attn_processor(self, processor: Any) -> None:
        """Refused: torch attention processors do not apply to this model."""
        raise NotImplementedError(
            "set_attn_processor is not supported: attention here is Paddle's, fused on accelerators; "
            "for the fused CPU/GPU programs load with inference_optimize=True"
        )

    #: How a tensor-parallel subclass sums its out projections' partial outputs (None: whole).
    reduce_partial_sums: ReducePartialSums | None = None

    def tensor_parallel_shards(self) -> int:
        """How many ranks share each block's heads (1: this is the whole model)."""
        return 1

    def adaln_layers(self) -> list[AdaLNModulation]:
        """Every adaLN modulation layer: ``norm1, norm1_context`` of each block, then ``norm_out``."""
        layers = [n for block in self.transformer_blocks for n in (block.norm1, block.norm1_context)]
        return [*layers, self.norm_out]

    def modulations(self, temb_act: paddle.Tensor) -> list[paddle.Tensor]:
        """``[B, chunks*D]`` modulation of every :meth:`adaln_layers` layer; all depend only on temb."""
        return [layer.linear(temb_act) for layer in self.adaln_layers()]

    def _check_inputs(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep
    ) -> paddle.Tensor:
        cfg = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be [B, {cfg.in_channels}, H, W], got {list(hidden_states.shape)}"
            )
        b, _, h, w = hidden_states.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size={p}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be [B, L, {cfg.joint_attention_dim}], "
                f"got {list(encoder_hidden_states.shape)}"
            )
        if list(pooled_projections.shape) != [b, cfg.pooled_projection_dim]:
            raise ValueError(
                f"pooled_projections must be [{b}, {cfg.pooled_projection_dim}], got {list(pooled_projections.shape)}"
            )
        if encoder_hidden_states.shape[0] != b:
            raise ValueError(
                f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} != latents batch {b}"
            )
        if not isinstance(timestep, paddle.Tensor):
            timestep = paddle.to_tensor(timestep, dtype="float32")
        timestep = timestep.reshape([-1])
        if timestep.shape[0] == 1 and b > 1:
            timestep = timestep.expand([b])
        if timestep.shape[0] != b:
            raise ValueError(
                f"timestep must have one value per sample ({b}), got shape {list(timestep.shape)}"
            )
        return timestep

    def forward(
        self,
        hidden_states: paddle.Tensor,
        encoder_hidden_states: paddle.Tensor,
        pooled_projections: paddle.Tensor,
        timestep: paddle.Tensor | float,
        skip_layers: Sequence[int] | None = None,
        *,
        joint_attention_kwargs: dict | None = None,
        block_controlnet_hidden_states: Any = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple:
        """Velocity ``[B, out_channels, H, W]`` in ``hidden_states``' dtype, as ``.sample``.

        ``timestep`` is ``sigma * 1000`` (float, ``[B]`` or a scalar). Math runs in the weights'
        dtype, or float32 when the device has no half-precision kernels (CPU).
        diffusers' keywords: ``joint_attention_kwargs={"scale": s}`` scales the LoRA adapters for
        this call; ``return_dict`` as in ``sd3_core.outputs``.
        """
        if block_controlnet_hidden_states is not None:
            raise ValueError("block_controlnet_hidden_states: SD3 ControlNets are not supported")
        with scaled_adapters(self, joint_attention_scale(joint_attention_kwargs)):
            velocity = self._velocity(
                hidden_states, encoder_hidden_states, pooled_projections, timestep, skip_layers
            )
        return component_return(Transformer2DModelOutput(velocity), return_dict)

    def _velocity(
        self,
        hidden_states: paddle.Tensor,
        encoder_hidden_states: paddle.Tensor,
        pooled_projections: paddle.Tensor,
        timestep: paddle.Tensor | float,
        skip_layers: Sequence[int] | None,
    ) -> paddle.Tensor:
        timestep = self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        out_dtype = hidden_states.dtype
        dtype = compute_dtype(self.dtype)
        b, _, h, w = hidden_states.shape
        p = self.config.patch_size

        x = self.pos_embed(hidden_states.astype(dtype))
        temb = self.time_text_embed(timestep, pooled_projections.astype(dtype))
        temb_act = F.silu(temb)  # every adaLN linear takes SiLU(temb)
        c = self.context_embedder(encoder_hidden_states.astype(dtype))
        modulations = self.modulations(temb_act)
        skip = set(skip_layers or ())
        xs, cs = [x[i] for i in range(b)], [c[i] for i in range(b)]  # see the module docstring
        recompute = _recompute() if self.gradient_checkpointing and paddle.is_grad_enabled() else None
        for j, block in enumerate(self.transformer_blocks):
            if j in skip:
                continue
            args = (xs, cs, modulations[2 * j], modulations[2 * j + 1], self.reduce_partial_sums)
            xs, cs = block(*args) if recompute is None else recompute(block, *args, use_reentrant=False)
        tokens = [
            self.proj_out(modulated_norm(x_i, m.shift_msa, m.scale_msa))
            for x_i, m in zip(xs, self.norm_out.per_sample(modulations[-1]), strict=True)
        ]
        x = paddle.stack(tokens)
        # unpatchify: [B, h*w, p*p*C] -> [B, C, h*p, w*p]
        x = x.reshape([b, h // p, w // p, p, p, self.out_channels]).transpose([0, 5, 1, 3, 2, 4])
        x = x.reshape([b, self.out_channels, h, w])
        return x if x.dtype == out_dtype else x.astype(out_dtype)


def _recompute() -> Callable:
    """Paddle's non-reentrant activation recompute (imported only when asked for: it loads
    paddle.distributed). It takes the blocks' list arguments as they are."""
    from paddle.distributed.fleet.utils import recompute

    return recompute


def _no_effect(method: str) -> None:
    warnings.warn(
        f"{method}() has no effect here: the eager forward keeps q, k and v apart; the optimised "
        "path (inference_optimize=True) already runs them as one GEMM per stream",
        UserWarning,
        stacklevel=3,
    )
