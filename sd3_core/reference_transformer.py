"""The SD3 / SD3.5 MM-DiT forward of one sample, written as the math reads.

This is the specification the optimised forwards are tested equal to: the eager per-sample loop
of :class:`~sd3_core.transformer.SD3Transformer2DModel` and the batched
:class:`~sd3_core.batched_transformer.BatchedSD3Transformer`. It follows sd3-ref's
``MMDiT.forward`` and ``joint_block`` top to bottom, reads the model's parameters and computes
in float32 with plain Paddle ops: no fused kernels, caches, batching, tensor parallelism or LoRA
branches (a LoRA layer is read as the weight it computes with).
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

from sd3_core.embeddings import MLPEmbedder, timestep_sinusoid
from sd3_core.lora import LoRALinear
from sd3_core.transformer import SD3Transformer2DModel
from sd3_core.transformer_blocks import FeedForward, JointTransformerBlock

__all__ = ["reference_forward", "reference_joint_block"]

EPS = 1e-6  # every LayerNorm and RMSNorm of SD3


# ---- helpers ----------------------------------------------------------------------------------


def _f32(t: paddle.Tensor) -> paddle.Tensor:
    return t.astype("float32")


def linear(layer: paddle.nn.Linear, x: paddle.Tensor) -> paddle.Tensor:
    """``x @ W + b`` (Paddle's ``[in, out]`` layout); a LoRA layer by its effective weight."""
    weight = layer.effective_weight() if isinstance(layer, LoRALinear) else layer.weight
    out = paddle.matmul(x, _f32(weight))
    return out if layer.bias is None else out + _f32(layer.bias)


def layer_norm(x: paddle.Tensor) -> paddle.Tensor:
    """LayerNorm over features without affine parameters."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / paddle.sqrt(var + EPS)


def modulate(x: paddle.Tensor, shift: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    return x * (1 + scale) + shift


def mlp_embed(embedder: MLPEmbedder, x: paddle.Tensor) -> paddle.Tensor:
    return linear(embedder.linear_2, F.silu(linear(embedder.linear_1, x)))


def feed_forward(ff: FeedForward, x: paddle.Tensor) -> paddle.Tensor:
    """D -> 4D -> D with tanh-approximated GELU."""
    return linear(ff.net[2], F.gelu(linear(ff.net[0].proj, x), approximate=True))


def split_heads(x: paddle.Tensor, heads: int) -> paddle.Tensor:
    """``[L, H*Dh]`` -> ``[H, L, Dh]``."""
    return x.reshape([x.shape[0], heads, -1]).transpose([1, 0, 2])


def rms_norm(x: paddle.Tensor, norm: paddle.nn.Layer | None) -> paddle.Tensor:
    """Per-head RMSNorm of ``[H, L, Dh]`` (SD3.5's qk-norm); identity without one."""
    if norm is None:
        return x
    return x * paddle.rsqrt(x.square().mean(-1, keepdim=True) + EPS) * _f32(norm.weight)


def qkv(attn: paddle.nn.Layer, x: paddle.Tensor, context: bool = False) -> list[paddle.Tensor]:
    """q, k, v of one stream as ``[H, L, Dh]``, q and k RMS-normalised where the model has it."""
    if context:
        projections = attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
        norms = attn.norm_added_q, attn.norm_added_k, None
    else:
        projections = attn.to_q, attn.to_k, attn.to_v
        norms = attn.norm_q, attn.norm_k, None
    heads = [split_heads(linear(p, x), attn.heads) for p in projections]
    return [rms_norm(h, n) for h, n in zip(heads, norms, strict=True)]


def attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
    """``softmax(q k^T / sqrt(Dh)) v`` per head on ``[H, L, Dh]``; ``[L, H*Dh]`` out."""
    scores = paddle.matmul(q, k, transpose_y=True) / q.shape[-1] ** 0.5
    out = paddle.matmul(F.softmax(scores, axis=-1), v)
    return out.transpose([1, 0, 2]).reshape([q.shape[1], -1])


# ---- joint block ------------------------------------------------------------------------------


def reference_joint_block(
    block: JointTransformerBlock, x: paddle.Tensor, c: paddle.Tensor, temb_act: paddle.Tensor
) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """One joint block on one sample: image ``x`` ``[L, D]``, context ``c`` ``[Lc, D]``, ``SiLU(temb)``.

    Returns the new ``(x, c)``; ``c`` is None after the last (context_pre_only) block.
    """
    attn = block.attn
    # adaLN modulation of each stream from the conditioning vector.
    x_mod = linear(block.norm1.linear, temb_act).chunk(9 if block.use_dual_attention else 6)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = x_mod[:6]
    c_mod = linear(block.norm1_context.linear, temb_act)
    if block.context_pre_only:  # AdaLayerNormContinuous: (scale, shift), no gates
        c_scale_msa, c_shift_msa = c_mod.chunk(2)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod.chunk(6)

    # pre_attention: modulated LayerNorm, then q/k/v of each stream.
    x_norm = layer_norm(x)
    q_x, k_x, v_x = qkv(attn, modulate(x_norm, shift_msa, scale_msa))
    q_c, k_c, v_c = qkv(attn, modulate(layer_norm(c), c_shift_msa, c_scale_msa), context=True)

    # Joint attention over [context, image] tokens (sd3-ref's order; diffusers' [image, context]
    # is the same attention with the rows permuted), split back into the two streams.
    out = attention(paddle.concat([q_c, q_x], 1), paddle.concat([k_c, k_x], 1), paddle.concat([v_c, v_x], 1))
    out_c, out_x = out[: c.shape[0]], out[c.shape[0] :]

    # post_attention, image: gated attention residual(s), then the gated MLP residual.
    x = x + gate_msa * linear(attn.to_out[0], out_x)
    if block.use_dual_attention:  # SD3.5: image-only self-attention of the block's input
        shift_msa2, scale_msa2, gate_msa2 = x_mod[6:]
        out2 = attention(*qkv(block.attn2, modulate(x_norm, shift_msa2, scale_msa2)))
        x = x + gate_msa2 * linear(block.attn2.to_out[0], out2)
    x = x + gate_mlp * feed_forward(block.ff, modulate(layer_norm(x), shift_mlp, scale_mlp))

    # post_attention, context; the last block only lent its keys and values.
    if block.context_pre_only:
        return x, None
    c = c + c_gate_msa * linear(attn.to_add_out, out_c)
    c = c + c_gate_mlp * feed_forward(block.ff_context, modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
    return x, c


# ---- model ------------------------------------------------------------------------------------


def reference_forward(
    model: SD3Transformer2DModel,
    hidden_states: paddle.Tensor,
    encoder_hidden_states: paddle.Tensor,
    pooled_projections: paddle.Tensor,
    timestep: float | paddle.Tensor,
) -> paddle.Tensor:
    """Velocity ``[C_out, H, W]`` (float32) of one sample.

    Latents ``[C, H, W]``, text tokens ``[Lc, joint_attention_dim]``, pooled text
    ``[pooled_projection_dim]``, ``timestep`` = sigma * 1000 (a number or one-element tensor).
    """
    if model.tensor_parallel_shards() != 1:
        raise ValueError("reference_forward takes a whole model, not a tensor-parallel shard")
    cfg = model.config
    p, d, grid = cfg.patch_size, model.inner_dim, cfg.pos_embed_max_size
    channels, height, width = hidden_states.shape
    gh, gw = height // p, width // p
    if grid is None or gh > grid or gw > grid:
        raise ValueError(
            f"reference_forward needs a {gh}x{gw} patch grid inside the model's pos_embed_max_size "
            f"grid, got pos_embed_max_size={grid}"
        )

    # Patch embedding: each p x p patch (channel-major) times the conv kernel, tokens row-major.
    patches = _f32(hidden_states).reshape([channels, gh, p, gw, p]).transpose([1, 3, 0, 2, 4])
    kernel = _f32(model.pos_embed.proj.weight).reshape([d, channels * p * p])
    x = paddle.matmul(patches.reshape([gh * gw, -1]), kernel, transpose_y=True)
    x = x + _f32(model.pos_embed.proj.bias)
    # + 2-D sin-cos positions, centre-cropped from the pos_embed_max_size^2 table.
    top, left = (grid - gh) // 2, (grid - gw) // 2
    table = _f32(model.pos_embed.pos_embed).reshape([grid, grid, d])
    x = x + table[top : top + gh, left : left + gw].reshape([gh * gw, d])

    # Conditioning: timestep sinusoid and pooled text, each through a SiLU MLP, summed.
    t = paddle.full([1], float(timestep), dtype="float32")
    embed = model.time_text_embed
    temb = mlp_embed(embed.timestep_embedder, timestep_sinusoid(t)[0])
    temb = temb + mlp_embed(embed.text_embedder, _f32(pooled_projections))
    temb_act = F.silu(temb)  # every adaLN Linear reads SiLU(temb)

    # Context embedder, then the joint blocks.
    c = linear(model.context_embedder, _f32(encoder_hidden_states))
    for block in model.transformer_blocks:
        x, c = reference_joint_block(block, x, c, temb_act)

    # Final adaLN (AdaLayerNormContinuous: scale, shift), projection to patches, unpatchify.
    scale, shift = linear(model.norm_out.linear, temb_act).chunk(2)
    x = linear(model.proj_out, modulate(layer_norm(x), shift, scale))  # [gh*gw, p*p*C_out]
    c_out = model.out_channels
    return x.reshape([gh, gw, p, p, c_out]).transpose([4, 0, 2, 1, 3]).reshape([c_out, height, width])
