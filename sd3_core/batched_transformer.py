"""The MM-DiT forward on whole batches: ``[B, L, D]`` tensors, one QKV GEMM per stream.

:class:`~sd3_core.transformer.SD3Transformer2DModel` runs samples one by one as 2-D tensors,
the fastest form for Paddle's CPU eager kernels. Accelerators and static programs
(:mod:`sd3_core.inference_program`) want the opposite: few, large, batched ops. A
:class:`BatchedSD3Transformer` is built from a loaded model and computes the same function with
fused weights: q/k/v of each stream concatenated into one ``[D, 3*inner]`` GEMM and every adaLN
modulation of the model in one ``[D, sum(chunks*D)]`` GEMM. LoRA adapters that are active and
not fused are folded into the weights it takes (``LoRALinear.effective_weight``); the eager
model's own parameters are shared, not copied, wherever no fusion or cast is needed.

It is a snapshot: weights changed on the eager model afterwards are not seen; build a new one.
"""

from __future__ import annotations

from collections.abc import Sequence

import paddle
import paddle.nn.functional as F

from sd3_core.dtypes import compute_dtype
from sd3_core.embeddings import timestep_sinusoid
from sd3_core.lora import LoRALinear
from sd3_core.transformer import SD3Transformer2DModel
from sd3_core.transformer_blocks import Modulation

__all__ = ["ATTENTION_LAYOUTS", "BatchedSD3Transformer"]


def _weight(layer: paddle.nn.Layer) -> paddle.Tensor:
    return layer.effective_weight() if isinstance(layer, LoRALinear) else layer.weight


def _modulate(x: paddle.Tensor, shift: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    """adaLN on ``[B, L, D]``: ``LayerNorm(x) * (1 + scale) + shift`` with ``[B, 1, D]`` vectors."""
    return F.layer_norm(x, x.shape[-1:], epsilon=1e-6) * (1 + scale) + shift


def _head_norm(x: paddle.Tensor, heads: int, norm) -> paddle.Tensor:
    """SD3.5's per-head RMSNorm on ``[B, L, H*Dh]`` (identity without one), in float32 as diffusers.

    ``x * x`` rather than ``square(x)``: oneDNN (Paddle 3.3) runs a unary op in place over an input
    that is read again, which corrupts ``x * rsqrt(mean(square(x)))`` in a program.
    """
    if norm is None:
        return x
    b, n, d = x.shape
    x32 = x.reshape([b, n, heads, d // heads]).astype("float32")
    y = (x32 * paddle.rsqrt((x32 * x32).mean(-1, keepdim=True) + norm.eps)).astype(x.dtype)
    return (y * norm.weight.astype(x.dtype)).reshape([b, n, d])


#: How attention is laid out: "batched" runs all samples and heads as one ``[B, H, L, L]``
#: matmul/softmax (the fused flash kernel on GPU in half precision); "cpu_fused" is Paddle's fused
#: CPU kernel ``self_dp_attention`` (blocked online softmax, float32 accumulation), which exists
#: only in static programs, so eagerly it computes "batched"'s math. On the small config of
#: benchmarks/step_time.py (AMD EPYC, 2 threads) cpu_fused took the float32 program from 0.99 s
#: (2-D matmuls per head) to 0.82 s a step, and the bfloat16 one from 0.75 s (batched) to 0.57 s.
ATTENTION_LAYOUTS = ("batched", "cpu_fused")


def _attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, heads: int) -> paddle.Tensor:
    """Softmax attention of ``[B, Lq, H*Dh]`` queries over ``[B, Lk, H*Dh]`` keys/values."""
    b, lq, d = q.shape
    lk = k.shape[1]
    dh = d // heads
    q4 = q.reshape([b, lq, heads, dh])
    k4 = k.reshape([b, lk, heads, dh])
    v4 = v.reshape([b, lk, heads, dh])
    if not paddle.get_device().startswith("cpu") and q.dtype != paddle.float32:
        out = F.scaled_dot_product_attention(q4, k4, v4)  # the fused (flash) kernel
    else:
        scores = paddle.matmul((q4 * (dh**-0.5)).transpose([0, 2, 1, 3]), k4.transpose([0, 2, 3, 1]))
        out = paddle.matmul(F.softmax(scores, axis=-1), v4.transpose([0, 2, 1, 3])).transpose([0, 2, 1, 3])
    return out.reshape([b, lq, d])


def _self_attention(qkv: paddle.Tensor, heads: int, layout: str) -> paddle.Tensor:
    """Self-attention of ``[B, L, 3*H*Dh]`` tokens laid out ``[q | k | v]``; ``[B, L, H*Dh]`` out."""
    b, n, d3 = qkv.shape
    d = d3 // 3
    if layout == "cpu_fused" and not paddle.in_dynamic_mode():
        dh = d // heads  # the kernel reads [B, L, 3, H, Dh]: this tensor, reshaped without a copy
        out = paddle._C_ops.self_dp_attention(qkv.reshape([b, n, 3, heads, dh]), dh**-0.5, heads)
        return out.reshape([b, n, d])
    q, k, v = paddle.split(qkv, 3, axis=-1)
    return _attention(q, k, v, heads)


class _Projections(paddle.nn.Layer):
    """Named ``[in, out]`` weights and biases taken from eager Linear layers, ``fused`` on output."""

    def __init__(self, dtype: paddle.dtype):
        super().__init__()
        self._compute = dtype

    def take(self, name: str, layers: Sequence[paddle.nn.Layer]) -> None:
        weights = [_weight(layer) for layer in layers]
        biases = [layer.bias for layer in layers]
        self._store(f"{name}_w", weights)
        if all(b is not None for b in biases):
            self._store(f"{name}_b", biases)
        elif any(b is not None for b in biases):
            raise ValueError(f"{name}: fused layers must all have a bias or none")

    def _store(self, key: str, tensors: list[paddle.Tensor]) -> None:
        if len(tensors) == 1 and isinstance(tensors[0], paddle.base.framework.EagerParamBase):
            if tensors[0].dtype == self._compute:
                self.add_parameter(key, tensors[0])  # shared with the eager model, no copy
                return
        value = paddle.concat([t.astype(self._compute) for t in tensors], axis=-1)
        param = self.create_parameter(value.shape, dtype=self._compute)
        param.set_value(value)
        param.stop_gradient = True
        self.add_parameter(key, param)

    def linear(self, name: str, x: paddle.Tensor) -> paddle.Tensor:
        return F.linear(x, getattr(self, f"{name}_w"), getattr(self, f"{name}_b", None))


class _BatchedBlock(paddle.nn.Layer):
    """One joint block on ``[B, L, D]`` image and ``[B, Lc, D]`` context tokens."""

    def __init__(self, block, dtype: paddle.dtype, layout: str):
        super().__init__()
        self.layout = layout
        attn = block.attn
        self.heads = attn.heads
        self.context_pre_only = block.context_pre_only
        self.dual = block.use_dual_attention
        self.img_chunks, self.ctx_chunks = block.norm1.chunks, block.norm1_context.chunks
        self.p = _Projections(dtype)
        self.p.take("qkv", [attn.to_q, attn.to_k, attn.to_v])
        self.p.take("out", [attn.to_out[0]])
        # The last block's context queries only feed discarded outputs; the fused CPU kernel is
        # self-attention, so there they are computed anyway.
        self.ctx_queries = not self.context_pre_only or layout == "cpu_fused"
        if not self.ctx_queries:
            self.p.take("ctx_kv", [attn.add_k_proj, attn.add_v_proj])
        else:
            self.p.take("ctx_qkv", [attn.add_q_proj, attn.add_k_proj, attn.add_v_proj])
        if not self.context_pre_only:
            self.p.take("ctx_out", [attn.to_add_out])
            self.p.take("ctx_ff1", [block.ff_context.net[0].proj])
            self.p.take("ctx_ff2", [block.ff_context.net[2]])
        self.p.take("ff1", [block.ff.net[0].proj])
        self.p.take("ff2", [block.ff.net[2]])
        # Per-head RMSNorms (SD3.5; None in SD3), registered as sublayers so exports keep them.
        self.norm_q, self.norm_k = attn.norm_q, attn.norm_k
        self.norm_cq, self.norm_ck = attn.norm_added_q, attn.norm_added_k
        if self.dual:
            self.p.take("qkv2", [block.attn2.to_q, block.attn2.to_k, block.attn2.to_v])
            self.p.take("out2", [block.attn2.to_out[0]])
            self.norm_q2, self.norm_k2 = block.attn2.norm_q, block.attn2.norm_k

    def _qkv(self, name: str, x: paddle.Tensor, norm_q, norm_k) -> paddle.Tensor:
        """``[B, L, 3*inner]`` = ``[q | k | v]`` of ``x``, the per-head norms applied to q and k."""
        qkv = self.p.linear(name, x)
        if norm_q is None:
            return qkv
        q, k, v = paddle.split(qkv, 3, axis=-1)
        return paddle.concat(
            [_head_norm(q, self.heads, norm_q), _head_norm(k, self.heads, norm_k), v], axis=-1
        )

    def _ff(self, prefix: str, x: paddle.Tensor) -> paddle.Tensor:
        return self.p.linear(f"{prefix}ff2", F.gelu(self.p.linear(f"{prefix}ff1", x), approximate=True))

    def forward(self, x, c, img_mod, ctx_mod):
        """``x`` ``[B, L, D]``, ``c`` ``[B, Lc, D]``, modulations ``[B, chunks*D]``; new ``(x, c)``."""
        im = Modulation.of(paddle.split(img_mod.unsqueeze(1), self.img_chunks, axis=-1))
        cm = Modulation.of(paddle.split(ctx_mod.unsqueeze(1), self.ctx_chunks, axis=-1))
        qkv = self._qkv("qkv", _modulate(x, im.shift_msa, im.scale_msa), self.norm_q, self.norm_k)
        n_img = x.shape[1]
        c_in = _modulate(c, cm.shift_msa, cm.scale_msa)
        if self.ctx_queries:
            qkv_c = self._qkv("ctx_qkv", c_in, self.norm_cq, self.norm_ck)
            out = _self_attention(paddle.concat([qkv, qkv_c], 1), self.heads, self.layout)
            out_x, out_c = out[:, :n_img], out[:, n_img:]
        else:  # image queries only, over image and context keys/values
            q, k, v = paddle.split(qkv, 3, axis=-1)
            k_c, v_c = paddle.split(self.p.linear("ctx_kv", c_in), 2, axis=-1)
            k_c = _head_norm(k_c, self.heads, self.norm_ck)
            out_x = _attention(q, paddle.concat([k, k_c], 1), paddle.concat([v, v_c], 1), self.heads)
        x2_in = _modulate(x, im.shift_msa2, im.scale_msa2) if self.dual else None
        x = x + im.gate_msa * self.p.linear("out", out_x)
        if self.dual:
            qkv2 = self._qkv("qkv2", x2_in, self.norm_q2, self.norm_k2)
            x = x + im.gate_msa2 * self.p.linear("out2", _self_attention(qkv2, self.heads, self.layout))
        x = x + im.gate_mlp * self._ff("", _modulate(x, im.shift_mlp, im.scale_mlp))
        if self.context_pre_only:
            return x, None
        c = c + cm.gate_msa * self.p.linear("ctx_out", out_c)
        c = c + cm.gate_mlp * self._ff("ctx_", _modulate(c, cm.shift_mlp, cm.scale_mlp))
        return x, c


class BatchedSD3Transformer(paddle.nn.Layer):
    """``forward(latents, text tokens, pooled text, timestep) -> velocity`` of ``model`` on batches.

    ``skip_layers`` is fixed at construction (a static program has one block list);
    ``attention_layout`` is one of :data:`ATTENTION_LAYOUTS`.
    """

    def __init__(
        self, model: SD3Transformer2DModel, skip_layers: Sequence[int] = (), attention_layout: str = "batched"
    ):
        super().__init__()
        if attention_layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention_layout={attention_layout!r} must be one of {ATTENTION_LAYOUTS}")
        if model.tensor_parallel_shards() != 1:
            raise ValueError("BatchedSD3Transformer takes a whole model, not a tensor-parallel shard")
        self.config = model.config
        self.compute = compute_dtype(model.dtype)
        self.skip = frozenset(int(i) for i in skip_layers)
        self.pos_embed = model.pos_embed
        self.p = _Projections(self.compute)
        embed = model.time_text_embed
        self.p.take("t1", [embed.timestep_embedder.linear_1])
        self.p.take("t2", [embed.timestep_embedder.linear_2])
        self.p.take("y1", [embed.text_embedder.linear_1])
        self.p.take("y2", [embed.text_embedder.linear_2])
        self.p.take("context", [model.context_embedder])
        adaln = model.adaln_layers()
        self.p.take("adaln", [layer.linear for layer in adaln])
        self.adaln_sizes = [layer.linear.weight.shape[1] for layer in adaln]
        self.p.take("proj_out", [model.proj_out])
        self.blocks = paddle.nn.LayerList(
            [_BatchedBlock(b, self.compute, attention_layout) for b in model.transformer_blocks]
        )

    def _mlp(self, name: str, x: paddle.Tensor) -> paddle.Tensor:
        return self.p.linear(f"{name}2", F.silu(self.p.linear(f"{name}1", x)))

    def forward(
        self,
        hidden_states: paddle.Tensor,
        encoder_hidden_states: paddle.Tensor,
        pooled_projections: paddle.Tensor,
        timestep: paddle.Tensor,
    ) -> paddle.Tensor:
        """Velocity ``[B, C, H, W]`` in ``hidden_states``' dtype; ``timestep`` is ``[B]``."""
        features = timestep_sinusoid(timestep)
        return self.denoise(hidden_states, encoder_hidden_states, pooled_projections, features)

    def denoise(
        self,
        hidden_states: paddle.Tensor,
        encoder_hidden_states: paddle.Tensor,
        pooled_projections: paddle.Tensor,
        timestep_features: paddle.Tensor,
    ) -> paddle.Tensor:
        """:meth:`forward` from the ``[B, 256]`` timestep sinusoid instead of the timestep.

        Static programs start here: oneDNN (Paddle 3.3) computes ``cos(a)`` and ``sin(a)`` of one
        tensor wrongly in a program (max error 1.4 on [-1, 1]; see :func:`_head_norm`), so the
        sinusoid is made eagerly.
        """
        dtype = self.compute
        b, _, h, w = hidden_states.shape
        p, out_channels = self.config.patch_size, self.config.out_channels
        x = self.pos_embed(hidden_states.astype(dtype))
        temb = self._mlp("t", timestep_features.astype(dtype))
        temb = temb + self._mlp("y", pooled_projections.astype(dtype))
        mods = paddle.split(self.p.linear("adaln", F.silu(temb)), self.adaln_sizes, axis=-1)
        c = self.p.linear("context", encoder_hidden_states.astype(dtype))
        for j, block in enumerate(self.blocks):
            if j not in self.skip:
                x, c = block(x, c, mods[2 * j], mods[2 * j + 1])
        out = Modulation.of(paddle.split(mods[-1].unsqueeze(1), 2, axis=-1))
        x = self.p.linear("proj_out", _modulate(x, out.shift_msa, out.scale_msa))
        x = x.reshape([b, h // p, w // p, p, p, out_channels]).transpose([0, 5, 1, 3, 2, 4])
        return x.reshape([b, out_channels, h, w]).astype(hidden_states.dtype)
