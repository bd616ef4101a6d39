"""The SD3 / SD3.5 MM-DiT (diffusers' ``SD3Transformer2DModel``) on Paddle.

Layout follows sd3-ref: each joint block has a ``pre_attention`` and ``post_attention`` per
modality (image, context) and :func:`joint_attention` mixes the two streams in between.
Config keys, defaults and state-dict names are diffusers'.

Samples are independent in an MM-DiT, so the model runs each one through the blocks as 2-D
``[tokens, D]`` tensors with ``[D]`` modulation vectors. On Paddle's CPU kernels this is much
faster than batched 3-D tensors: broadcasting a ``[B, 1, D]`` vector over ``[B, L, D]`` costs
about ten times a ``[D]`` vector over ``[L, D]``, and with per-sample vectors the adaLN
modulation fuses into LayerNorm's affine step (one pass instead of three).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import paddle
import paddle.nn.functional as F

from sd3_core import (
    single_file,
)
from sd3_core.attention import Attention, attention
from sd3_core.dtypes import compute_dtype
from sd3_core.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from sd3_core.layers import Linear, PartialSumLinear
from sd3_core.model_config import register_to_config
from sd3_core.modeling import ModelMixin

__all__ = [
    "FeedForward",
    "JointTransformerBlock",
    "Modulation",
    "SD3Transformer2DModel",
    "joint_attention",
    "modulate",
    "modulated_norm",
]


# ---- helpers ----------------------------------------------------------------------------------


def modulate(x: paddle.Tensor, shift: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    """adaLN on a normalised ``[L, D]`` tensor: ``x * (1 + scale) + shift`` with ``[D]`` vectors."""
    return x * (1 + scale) + shift


def modulated_norm(x: paddle.Tensor, shift: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    """``modulate(LayerNorm(x), shift, scale)`` for ``[L, D]`` x in one kernel.

    SD3's norms have no affine parameters (eps 1e-6), so LayerNorm's own weight/bias slots take
    ``1 + scale`` and ``shift``; the result is bit-identical to the three-step form.
    """
    return F.layer_norm(x, x.shape[-1:], weight=1 + scale, bias=shift, epsilon=1e-6)


class Modulation(NamedTuple):
    """One stream's adaLN vectors, in diffusers' names. AdaLayerNormZero gives the first six,
    SD35AdaLayerNormZeroX all nine (``*_msa2`` drive the image-only ``attn2``), and
    AdaLayerNormContinuous (the last block's context, the output norm) only a shift and scale."""

    shift_msa: paddle.Tensor
    scale_msa: paddle.Tensor
    gate_msa: paddle.Tensor | None = None
    shift_mlp: paddle.Tensor | None = None
    scale_mlp: paddle.Tensor | None = None
    gate_mlp: paddle.Tensor | None = None
    shift_msa2: paddle.Tensor | None = None
    scale_msa2: paddle.Tensor | None = None
    gate_msa2: paddle.Tensor | None = None

    @classmethod
    def of(cls, chunks: Sequence[paddle.Tensor]) -> Modulation:
        """From an adaLN layer's output chunks (2, 6 or 9)."""
        if len(chunks) == 2:  # AdaLayerNormContinuous orders them (scale, shift)
            return cls(shift_msa=chunks[1], scale_msa=chunks[0])
        if len(chunks) not in (6, 9):
            raise ValueError(f"an adaLN modulation has 2, 6 or 9 chunks, got {len(chunks)}")
        return cls(*chunks)


class AdaLNModulation(paddle.nn.Layer):
    """``Linear(SiLU(temb))`` producing ``chunks`` modulation vectors of width D per sample.

    Stands in for diffusers' AdaLayerNormZero (6 chunks), SD35AdaLayerNormZeroX (9) and
    AdaLayerNormContinuous (2, ordered scale, shift); all three hold only ``linear``. The model
    runs every such layer on ``SiLU(temb)`` once per forward (:meth:`SD3Transformer2DModel.modulations`).
    In a tensor-parallel shard (``shards > 1``) the layer holds a contiguous ``1/shards`` of the
    output features, and the model gathers all layers' slices in one collective.
    """

    def __init__(self, dim: int, chunks: int, shards: int = 1):
        super().__init__()
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim // shards)

    def per_sample(self, modulation: paddle.Tensor) -> list[Modulation]:
        """``[B, chunks*D]`` full modulation -> per sample, its ``[D]`` vectors by name."""
        return [Modulation.of(paddle.chunk(modulation[i], self.chunks)) for i in range(modulation.shape[0])]


class _GELUProj(paddle.nn.Layer):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.gelu(self.proj(x), approximate=True)


class FeedForward(paddle.nn.Layer):
    """D -> 4D (tanh-GELU) -> D; keys ``net.0.proj`` and ``net.2`` as in diffusers.

    A tensor-parallel shard (``shards > 1``) holds ``4D/shards`` hidden features: ``net.0`` is
    column-parallel, ``net.2`` row-parallel and returns a partial sum.
    """

    def __init__(self, dim: int, mult: int = 4, shards: int = 1):
        super().__init__()
        hidden = dim * mult // shards
        out = PartialSumLinear if shards > 1 else Linear
        # net.1 is diffusers' Dropout(0): no parameters, kept so the indices line up.
        self.net = paddle.nn.LayerList([_GELUProj(dim, hidden), paddle.nn.Identity(), out(hidden, dim)])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.net[2](self.net[0](x))


# ---- joint block ------------------------------------------------------------------------------

#: Turns per-layer partial sums into full outputs (sum over tensor-parallel ranks, plus bias);
#: ``None`` when the out projections are already whole (one device).
ReducePartialSums = Callable[[list[paddle.nn.Layer], list[paddle.Tensor]], list[paddle.Tensor]]


def _full_outputs(
    reduce: ReducePartialSums | None, layers: list[paddle.nn.Layer], per_sample: list[list[paddle.Tensor]]
) -> list[list[paddle.Tensor]]:
    """Full outputs of ``layers`` for every sample, reduced in one call for the whole batch."""
    if reduce is None:
        return per_sample
    flat = reduce(layers * len(per_sample), [t for outs in per_sample for t in outs])
    k = len(layers)
    return [flat[i * k : (i + 1) * k] for i in range(len(per_sample))]


class JointTransformerBlock(paddle.nn.Layer):
    """One MM-DiT block: image and context streams sharing one attention.

    ``context_pre_only`` (the last block) only contributes context keys/values: its context
    modulation is AdaLayerNormContinuous and it has no ``to_add_out``/``ff_context``.
    ``use_dual_attention`` (SD3.5) adds an image-only self-attention ``attn2``.
    ``shards > 1`` builds one tensor-parallel shard: ``num_attention_heads / shards`` heads, a
    ``1/shards`` slice of the feed-forward hidden units and of the adaLN outputs.

    The block runs a batch as lists of per-sample 2-D tensors in three phases: attention and
    its out projections; gated residuals and the feed-forwards; gated residuals. Between the
    phases the out projections of all samples and both streams are reduced together, so a
    tensor-parallel shard makes at most two collectives per block.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        context_pre_only: bool = False,
        qk_norm: str | None = None,
        use_dual_attention: bool = False,
        shards: int = 1,
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        heads = num_attention_heads // shards
        partial = shards > 1
        self.norm1 = AdaLNModulation(dim, 9 if use_dual_attention else 6, shards)
        self.norm1_context = AdaLNModulation(dim, 2 if context_pre_only else 6, shards)
        self.attn = Attention(
            dim,
            heads,
            attention_head_dim,
            qk_norm,
            context_dim=dim,
            context_pre_only=context_pre_only,
            partial_out=partial,
        )
        self.attn2 = (
            Attention(dim, heads, attention_head_dim, qk_norm, partial_out=partial)
            if use_dual_attention
            else None
        )
        self.ff = FeedForward(dim, shards=shards)
        self.ff_context = None if context_pre_only else FeedForward(dim, shards=shards)

    # The projections whose outputs phases 1 and 2 produce, in the order they are returned
    # (looked up each time: LoRA may wrap these layers after construction).
    @property
    def attention_out_layers(self) -> list[paddle.nn.Layer]:
        layers = [self.attn.to_out[0]]
        if self.use_dual_attention:
            layers.append(self.attn2.to_out[0])
        if not self.context_pre_only:
            layers.append(self.attn.to_add_out)
        return layers

    @property
    def mlp_out_layers(self) -> list[paddle.nn.Layer]:
        return [self.ff.net[2]] + ([] if self.context_pre_only else [self.ff_context.net[2]])

    # -- image stream
    def pre_attention_image(self, x: paddle.Tensor, m: Modulation):
        """``x`` ``[L, D]`` -> ``(q, k, v)`` and the input of ``attn2`` (None without one)."""
        qkv = self.attn.qkv(modulated_norm(x, m.shift_msa, m.scale_msa))
        x2 = modulated_norm(x, m.shift_msa2, m.scale_msa2) if self.use_dual_attention else None
        return qkv, x2

    def post_attention_image(self, outs: list[paddle.Tensor], x: paddle.Tensor, m: Modulation):
        """Gated attention residual(s); returns the new ``x`` and its feed-forward output."""
        x = x + m.gate_msa * outs[0]
        if self.use_dual_attention:
            x = x + m.gate_msa2 * outs[1]
        return x, self.ff(modulated_norm(x, m.shift_mlp, m.scale_mlp))

    # -- context stream
    def pre_attention_context(self, c: paddle.Tensor, m: Modulation):
        """``c`` ``[Lc, D]`` -> ``(q, k, v)``; q is None in the last block."""
        c_in = modulated_norm(c, m.shift_msa, m.scale_msa)
        # The last block's context queries would only produce outputs it discards.
        return self.attn.qkv(c_in, context=True, need_q=not self.context_pre_only)

    def post_attention_context(self, out: paddle.Tensor, c: paddle.Tensor, m: Modulation):
        c = c + m.gate_msa * out
        return c, self.ff_context(modulated_norm(c, m.shift_mlp, m.scale_mlp))

    # -- the block
    def forward(
        self,
        xs: list[paddle.Tensor],
        cs: list[paddle.Tensor],
        modulation: paddle.Tensor,
        context_modulation: paddle.Tensor,
        reduce: ReducePartialSums | None = None,
    ) -> tuple[list[paddle.Tensor], list[paddle.Tensor] | None]:
        """Per-sample ``xs`` ``[L, D]`` and ``cs`` ``[Lc, D]``; full ``[B, chunks*D]`` modulations.

        Returns the new ``(xs, cs)``; ``cs`` is None after the last (context_pre_only) block.
        """
        img_mods = self.norm1.per_sample(modulation)
        ctx_mods = self.norm1_context.per_sample(context_modulation)
        samples = range(len(xs))
        # Phase 1: attention; its out projections (all samples, both streams) reduce together.
        attn = [joint_attention(self, xs[i], cs[i], img_mods[i], ctx_mods[i]) for i in samples]
        attn = _full_outputs(reduce, self.attention_out_layers, attn)
        # Phase 2: gated attention residuals and the feed-forwards, again reduced together.
        xs, ff = list(xs), []
        for i in samples:
            xs[i], ff_x = self.post_attention_image(attn[i], xs[i], img_mods[i])
            ff.append([ff_x])
        if not self.context_pre_only:
            cs = list(cs)
            for i in samples:
                cs[i], ff_c = self.post_attention_context(attn[i][-1], cs[i], ctx_mods[i])
                ff[i].append(ff_c)
        ff = _full_outputs(reduce, self.mlp_out_layers, ff)
        # Phase 3: gated feed-forward residuals.
        xs = [xs[i] + img_mods[i].gate_mlp * ff[i][0] for i in samples]
        if self.context_pre_only:
            return xs, None
        return xs, [cs[i] + ctx_mods[i].gate_mlp * ff[i][1] for i in samples]


def joint_attention(
    block: JointTransformerBlock,
    x: paddle.Tensor,
    c: paddle.Tensor,
    img_mods: Modulation,
    ctx_mods: Modulation,
) -> list[paddle.Tensor]:
    """One sample's pre-attention of both streams, one attention over ``[image, context]``, split.

    Returns the out projections in ``block.attention_out_layers`` order (image, SD3.5's
    image-only ``attn2``, context); in a tensor-parallel shard they are partial sums of this
    rank's heads, which the block reduces for all samples at once.
    """
    (q_x, k_x, v_x), x2 = block.pre_attention_image(x, img_mods)
    _, k_c, v_c = qkv_c = block.pre_attention_context(c, ctx_mods)
    k = paddle.concat([k_x, k_c])
    v = paddle.concat([v_x, v_c])
    heads = block.attn.heads
    if block.context_pre_only:
        out_x, out_c = attention(q_x, k, v, heads), None
    else:
        out = attention(paddle.concat([q_x, qkv_c[0]]), k, v, heads)
        out_x, out_c = out[: x.shape[0]], out[x.shape[0] :]
    outs = [block.attn.to_out[0](out_x)]
    if block.use_dual_attention:
        outs.append(block.attn2.self_attention(x2))
    if out_c is not None:
        outs.append(block.attn.to_add_out(out_c))
    return outs


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
    ) -> paddle.Tensor:
        """Velocity ``[B, out_channels, H, W]`` in ``hidden_states``' dtype.

        ``timestep`` is ``sigma * 1000`` (float, ``[B]`` or a scalar). Math runs in the weights'
        dtype, or float32 when the device has no half-precision kernels (CPU).
        """
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
        for j, block in enumerate(self.transformer_blocks):
            if j not in skip:
                xs, cs = block(xs, cs, modulations[2 * j], modulations[2 * j + 1], self.reduce_partial_sums)
        tokens = [
            self.proj_out(modulated_norm(x_i, m.shift_msa, m.scale_msa))
            for x_i, m in zip(xs, self.norm_out.per_sample(modulations[-1]), strict=True)
        ]
        x = paddle.stack(tokens)
        # unpatchify: [B, h*w, p*p*C] -> [B, C, h*p, w*p]
        x = x.reshape([b, h // p, w // p, p, p, self.out_channels]).transpose([0, 5, 1, 3, 2, 4])
        x = x.reshape([b, self.out_channels, h, w])
        return x if x.dtype == out_dtype else x.astype(out_dtype)
