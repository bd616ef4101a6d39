"""Attention math for MM-DiT: projections, per-head RMSNorm, and scaled dot-product attention.

Tensors passed between these helpers are one sample's token-major ``[L, H*Dh]`` so image
and text streams concatenate along the sequence without transposes; heads are split only
inside :func:`attention`. A tensor-parallel runner shards heads by slicing the q/k/v/out Linear
weights and the ``heads`` count; nothing here assumes the full head count.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import paddle
import paddle.nn.functional as F

from sd3_core import runtime
from sd3_core.layers import Linear, PartialSumLinear

__all__ = ["Attention", "RMSNorm", "attention", "split_heads_norm"]


class RMSNorm(paddle.nn.Layer):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (diffusers' RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([dim], default_initializer=paddle.nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # Normalise in float32 and round once to the compute dtype, as diffusers does.
        x32 = x if x.dtype == paddle.float32 else x.astype("float32")
        y = x32 * paddle.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        if y.dtype != x.dtype:
            y = y.astype(x.dtype)
        return y * (self.weight if self.weight.dtype == y.dtype else self.weight.astype(y.dtype))


def split_heads_norm(x: paddle.Tensor, heads: int, norm: RMSNorm | None) -> paddle.Tensor:
    """Apply a per-head norm to ``[..., L, H*Dh]`` (no-op without one); stays token-major."""
    if norm is None:
        return x
    shape = x.shape
    return norm(x.reshape([*shape[:-1], heads, shape[-1] // heads])).reshape(shape)


def _use_fused_sdpa() -> bool:
    # Paddle's fused kernel is the fast path on accelerators; on CPU we keep the explicit
    # float32 formulation below (same numerics, and no dependence on CPU kernel coverage).
    return not paddle.get_device().startswith("cpu")


_SOFTMAX_POOL: ThreadPoolExecutor | None = None
#: Below this many scores per head a thread hand-off costs more than the softmax it moves.
POOL_MIN_SCORES = 64 * 1024


def _softmax_pool(scores: int) -> ThreadPoolExecutor | None:
    """Threads for per-head softmaxes of ``scores`` elements each, or None (one CPU thread, small
    scores, or autograd is recording).

    Paddle's CPU softmax kernel is single-threaded (profiled: 0.57 s of a 1.0 s step on 2 cores,
    the same at 1 and 2 threads) while its GEMMs use every core; it releases the GIL, so the
    softmaxes of a group of heads run side by side. Not while recording gradients: the autograd
    tape is built on the calling thread only."""
    global _SOFTMAX_POOL
    threads = runtime.cpu_threads()
    if threads < 2 or scores < POOL_MIN_SCORES or paddle.is_grad_enabled():
        return None
    if _SOFTMAX_POOL is None or _SOFTMAX_POOL._max_workers != threads:
        _SOFTMAX_POOL = ThreadPoolExecutor(threads, thread_name_prefix="sd3-softmax")
    return _SOFTMAX_POOL


def _softmax_last(x: paddle.Tensor) -> paddle.Tensor:
    return F.softmax(x, axis=-1)


def attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, heads: int) -> paddle.Tensor:
    """``softmax(q k^T / sqrt(Dh)) v`` per head for one sample: q ``[Lq, H*Dh]``, k/v ``[Lk, H*Dh]``.

    Returns ``[Lq, H*Dh]``; 3-D ``[B, L, H*Dh]`` inputs are handled sample by sample. Queries
    may be a subset of the key rows (the last SD3 block only needs image queries).
    """
    if q.ndim == 3:
        return paddle.stack([attention(q[i], k[i], v[i], heads) for i in range(q.shape[0])])
    lq, d = q.shape
    lk = k.shape[0]
    dh = d // heads
    if _use_fused_sdpa():
        out = F.scaled_dot_product_attention(
            q.reshape([1, lq, heads, dh]), k.reshape([1, lk, heads, dh]), v.reshape([1, lk, heads, dh])
        )
        return out.reshape([lq, d])
    # One 2-D matmul pair per head on column slices of the token-major tensors: Paddle's CPU
    # batched matmul is about half as fast, the [H, L, Dh] transpose copies cost more than the
    # slices, and one head's [Lq, Lk] scores stay in cache for the softmax. (Running heads in
    # Python threads measured no faster: the GEMMs already use every core.)
    q = q * (dh**-0.5)  # on q (Lq*Dh multiplies) rather than the scores (Lq*Lk); same in float32
    qs, ks, vs = (paddle.split(t, heads, axis=-1) for t in (q, k, v))
    pool = _softmax_pool(lq * lk)
    group = pool._max_workers if pool is not None else 1  # heads whose scores are alive at once
    per_head = []
    for start in range(0, heads, group):
        idx = range(start, min(start + group, heads))
        scores = [paddle.matmul(qs[h], ks[h], transpose_y=True) for h in idx]
        probs = (
            list(pool.map(_softmax_last, scores))
            if pool is not None and len(idx) > 1
            else [_softmax_last(s) for s in scores]
        )
        per_head.extend(paddle.matmul(p, vs[h]) for p, h in zip(probs, idx, strict=True))
    return paddle.concat(per_head, axis=-1)


class Attention(paddle.nn.Layer):
    """The projections of one joint-attention layer, named as in diffusers' ``Attention``.

    Image stream: ``to_q/to_k/to_v``, ``norm_q/norm_k``, ``to_out.0``. Context stream (only
    when ``context_dim`` is given): ``add_q_proj/add_k_proj/add_v_proj``,
    ``norm_added_q/norm_added_k``, and ``to_add_out`` unless ``context_pre_only``.

    With ``partial_out`` the layer is a tensor-parallel shard: ``heads`` are this rank's heads,
    and the out projections return partial sums (see :class:`PartialSumLinear`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        qk_norm: str | None = None,
        context_dim: int | None = None,
        context_pre_only: bool = False,
        eps: float = 1e-6,
        partial_out: bool = False,
    ):
        super().__init__()
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={qk_norm!r} is not supported; SD3 uses None and SD3.5 'rms_norm'")
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        out_linear = PartialSumLinear if partial_out else Linear
        self.to_q = Linear(dim, inner)
        self.to_k = Linear(dim, inner)
        self.to_v = Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim, eps) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps) if qk_norm else None
        self.to_out = paddle.nn.LayerList([out_linear(inner, dim)])  # diffusers' to_out.1 is a no-op Dropout
        self.has_context = context_dim is not None
        if self.has_context:
            self.add_q_proj = Linear(context_dim, inner)
            self.add_k_proj = Linear(context_dim, inner)
            self.add_v_proj = Linear(context_dim, inner)
            self.norm_added_q = RMSNorm(head_dim, eps) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim, eps) if qk_norm else None
            self.to_add_out = None if context_pre_only else out_linear(inner, dim)

    def qkv(self, x: paddle.Tensor, context: bool = False, need_q: bool = True):
        """q (or None), k, v of one stream, each ``[L, H*Dh]`` with the qk-norm applied."""
        if context:
            lq, lk, lv, nq, nk = (
                self.add_q_proj,
                self.add_k_proj,
                self.add_v_proj,
                self.norm_added_q,
                self.norm_added_k,
            )
        else:
            lq, lk, lv, nq, nk = self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k
        q = split_heads_norm(lq(x), self.heads, nq) if need_q else None
        return q, split_heads_norm(lk(x), self.heads, nk), lv(x)

    def self_attention(self, x: paddle.Tensor) -> paddle.Tensor:
        """Image-only attention (SD3.5's ``attn2``)."""
        q, k, v = self.qkv(x)
        return self.to_out[0](attention(q, k, v, self.heads))
