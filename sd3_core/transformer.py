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

from collections.abc import Sequence

import paddle
import paddle.nn.functional as F

from sd3_core import runtime  # noqa: F401  (paddle settings; sd3_core/__init__ already ran it)
from sd3_core.attention import Attention, attention
from sd3_core.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from sd3_core.modeling import Linear, ModelMixin, compute_dtype

__all__ = [
    "FeedForward",
    "JointTransformerBlock",
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


class AdaLNModulation(paddle.nn.Layer):
    """``Linear(SiLU(temb))`` of one sample split into ``chunks`` ``[D]`` vectors.

    Stands in for diffusers' AdaLayerNormZero (6 chunks), SD35AdaLayerNormZeroX (9) and
    AdaLayerNormContinuous (2, ordered scale, shift); all three hold only ``linear``.
    The caller passes ``SiLU(temb)``, computed once per forward.
    """

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim)

    def forward(self, temb_act: paddle.Tensor) -> list[paddle.Tensor]:
        """``temb_act`` is ``[1, D]`` (one sample)."""
        if temb_act.shape[0] != 1:
            raise ValueError(
                f"adaLN modulates one sample at a time; got temb of shape {list(temb_act.shape)}"
            )
        return paddle.chunk(self.linear(temb_act).reshape([-1]), self.chunks)


class _GELUProj(paddle.nn.Layer):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.gelu(self.proj(x), approximate=True)


class FeedForward(paddle.nn.Layer):
    """D -> 4D (tanh-GELU) -> D; keys ``net.0.proj`` and ``net.2`` as in diffusers."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 is diffusers' Dropout(0): no parameters, kept so the indices line up.
        self.net = paddle.nn.LayerList(
            [_GELUProj(dim, dim * mult), paddle.nn.Identity(), Linear(dim * mult, dim)]
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.net[2](self.net[0](x))


# ---- joint block ------------------------------------------------------------------------------


class JointTransformerBlock(paddle.nn.Layer):
    """One MM-DiT block: image and context streams sharing one attention.

    ``context_pre_only`` (the last block) only contributes context keys/values: its context
    modulation is AdaLayerNormContinuous and it has no ``to_add_out``/``ff_context``.
    ``use_dual_attention`` (SD3.5) adds an image-only self-attention ``attn2``.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        context_pre_only: bool = False,
        qk_norm: str | None = None,
        use_dual_attention: bool = False,
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        self.norm1 = AdaLNModulation(dim, 9 if use_dual_attention else 6)
        self.norm1_context = AdaLNModulation(dim, 2 if context_pre_only else 6)
        self.attn = Attention(
            dim,
            num_attention_heads,
            attention_head_dim,
            qk_norm,
            context_dim=dim,
            context_pre_only=context_pre_only,
        )
        self.attn2 = (
            Attention(dim, num_attention_heads, attention_head_dim, qk_norm) if use_dual_attention else None
        )
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    # -- image stream
    def pre_attention_image(self, x: paddle.Tensor, temb_act: paddle.Tensor):
        """``x`` ``[L, D]`` -> ``(q, k, v)``, intermediates for :meth:`post_attention_image`."""
        mods = self.norm1(temb_act)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        qkv = self.attn.qkv(modulated_norm(x, shift_msa, scale_msa))
        x2 = modulated_norm(x, mods[6], mods[7]) if self.use_dual_attention else None
        gate_msa2 = mods[8] if self.use_dual_attention else None
        return qkv, (gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2)

    def post_attention_image(self, attn: paddle.Tensor, x: paddle.Tensor, intermediates) -> paddle.Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2 = intermediates
        x = x + gate_msa * self.attn.to_out[0](attn)
        if self.use_dual_attention:
            x = x + gate_msa2 * self.attn2.self_attention(x2)
        return x + gate_mlp * self.ff(modulated_norm(x, shift_mlp, scale_mlp))

    # -- context stream
    def pre_attention_context(self, c: paddle.Tensor, temb_act: paddle.Tensor):
        """``c`` ``[Lc, D]`` -> ``(q, k, v)`` (q is None in the last block), intermediates."""
        if self.context_pre_only:
            scale, shift = self.norm1_context(temb_act)  # AdaLayerNormContinuous order
            # Its queries would only produce context outputs that the last block discards.
            return self.attn.qkv(modulated_norm(c, shift, scale), context=True, need_q=False), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1_context(temb_act)
        qkv = self.attn.qkv(modulated_norm(c, shift_msa, scale_msa), context=True)
        return qkv, (gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention_context(self, attn: paddle.Tensor, c: paddle.Tensor, intermediates) -> paddle.Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = intermediates
        c = c + gate_msa * self.attn.to_add_out(attn)
        return c + gate_mlp * self.ff_context(modulated_norm(c, shift_mlp, scale_mlp))

    def forward(self, x: paddle.Tensor, c: paddle.Tensor, temb_act: paddle.Tensor):
        """One sample: ``x`` ``[L, D]``, ``c`` ``[Lc, D]``, ``temb_act`` ``[1, D]`` -> ``(x, c)``.

        ``c`` is None after the last (context_pre_only) block.
        """
        return joint_attention(self, x, c, temb_act)


def joint_attention(
    block: JointTransformerBlock, x: paddle.Tensor, c: paddle.Tensor, temb_act: paddle.Tensor
):
    """Run both streams' pre-attention, one attention over ``[image, context]``, then split.

    This is where the streams meet: a tensor-parallel runner shards heads here (q/k/v are
    column-parallel) and reduces after the out projections in the post-attention steps.
    """
    (q_x, k_x, v_x), x_inter = block.pre_attention_image(x, temb_act)
    (q_c, k_c, v_c), c_inter = block.pre_attention_context(c, temb_act)
    n_x = x.shape[0]
    k = paddle.concat([k_x, k_c])
    v = paddle.concat([v_x, v_c])
    heads = block.attn.heads
    if block.context_pre_only:
        return block.post_attention_image(attention(q_x, k, v, heads), x, x_inter), None
    out = attention(paddle.concat([q_x, q_c]), k, v, heads)
    x = block.post_attention_image(out[:n_x], x, x_inter)
    c = block.post_attention_context(out[n_x:], c, c_inter)
    return x, c


# ---- model ------------------------------------------------------------------------------------


class SD3Transformer2DModel(ModelMixin):
    """MM-DiT denoiser; ``forward(latents, text tokens, pooled text, timestep) -> velocity``."""

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
                )
                for i in range(num_layers)
            ]
        )
        self.norm_out = AdaLNModulation(self.inner_dim, 2)  # AdaLayerNormContinuous: (scale, shift)
        self.proj_out = Linear(self.inner_dim, patch_size * patch_size * self.out_channels)

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
        skip = set(skip_layers or ())
        tokens = []
        for i in range(b):  # samples are independent; see the module docstring
            x_i, c_i, t_i = x[i], c[i], temb_act[i : i + 1]
            for j, block in enumerate(self.transformer_blocks):
                if j not in skip:
                    x_i, c_i = block(x_i, c_i, t_i)
            scale, shift = self.norm_out(t_i)
            tokens.append(self.proj_out(modulated_norm(x_i, shift, scale)))
        x = paddle.stack(tokens)
        # unpatchify: [B, h*w, p*p*C] -> [B, C, h*p, w*p]
        x = x.reshape([b, h // p, w // p, p, p, self.out_channels]).transpose([0, 5, 1, 3, 2, 4])
        x = x.reshape([b, self.out_channels, h, w])
        return x if x.dtype == out_dtype else x.astype(out_dtype)
