"""The MM-DiT joint block and its parts: adaLN modulation, feed-forward, joint attention.

Layout follows sd3-ref: each :class:`JointTransformerBlock` has a ``pre_attention`` and
``post_attention`` per modality (image, context), and :func:`joint_attention` mixes the two streams
in between. Samples run as 2-D ``[tokens, D]`` tensors with ``[D]`` modulation vectors (why: see
:mod:`sd3_core.transformer`). State-dict names are diffusers'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import paddle
import paddle.nn.functional as F

from sd3_core.attention import Attention, attention
from sd3_core.layers import Linear, PartialSumLinear

__all__ = [
    "AdaLNModulation",
    "FeedForward",
    "JointTransformerBlock",
    "Modulation",
    "ReducePartialSums",
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
