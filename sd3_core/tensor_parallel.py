"""Tensor-parallel SD3 transformer: each rank of an mp group holds one shard of every block.

A shard has ``num_attention_heads / mp`` heads of every attention (q/k/v of both streams,
SD3.5's ``attn2``; the per-head RMS qk-norms are replicated), ``1/mp`` of every feed-forward's
hidden units (``net.0`` column-parallel, ``net.2`` row-parallel) and ``1/mp`` of the output
features of every adaLN modulation layer. Embeddings, ``context_embedder`` and ``proj_out`` are
replicated: together they are a few percent of the parameters.

Collectives per forward, for ``L`` blocks: one all-gather of all adaLN slices (``temb`` is the
same for every block, so the modulations of the whole stack are computed up front) and per block
two all-reduces, each carrying the partial sums of both streams and all samples (the last block
has no context output, so it sends only image partials). With mp=1 it is the plain model.

Each rank reads only its own slices of the checkpoint (memory-mapped safetensors), so no rank
ever holds the whole transformer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from sd3_core.collectives import Collectives, SingleRank
from sd3_core.dtypes import default_dtype, resolve_dtype
from sd3_core.lora_file import LoRAFile
from sd3_core.safetensors_io import WeightsIndex, open_weights
from sd3_core.torch_state import load_torch_state
from sd3_core.transformer import SD3Transformer2DModel

__all__ = [
    "TensorParallelSD3Transformer",
    "check_tensor_parallel",
    "load_transformer_shard",
    "parameter_bytes",
    "shard_slice",
]

# Checkpoint keys (PyTorch layout, Linear weights are [out, in]) split along their first axis:
# column-parallel weights and their biases, and the adaLN linears' output features.
_SPLIT_OUT = re.compile(
    r"(\.norm1|\.norm1_context|^norm_out)\.linear\.(weight|bias)$"
    r"|\.attn2?\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.(weight|bias)$"
    r"|\.ff(_context)?\.net\.0\.proj\.(weight|bias)$"
)
# Row-parallel weights, split along their input features; their biases stay whole.
_SPLIT_IN = re.compile(r"\.attn2?\.(to_out\.0|to_add_out)\.weight$|\.ff(_context)?\.net\.2\.weight$")


def check_tensor_parallel(config: Mapping[str, Any], mp: int) -> None:
    """Raise ValueError unless a transformer ``config`` splits into ``mp`` tensor-parallel shards.

    Cheap and free of side effects, so a launcher can call it before starting any process.
    """
    heads = int(config["num_attention_heads"])
    if not isinstance(mp, int) or mp < 1:
        raise ValueError(f"mp={mp!r} must be a positive integer")
    if heads % mp:
        ok = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"num_attention_heads={heads} is not divisible by mp={mp}: every tensor-parallel rank "
            f"needs whole attention heads; choose mp from {ok}"
        )


def shard_slice(key: str, shape: tuple[int, ...], rank: int, mp: int) -> tuple[slice, ...] | None:
    """The index of rank ``rank``'s part of checkpoint tensor ``key`` (None: the whole tensor)."""
    if mp == 1:
        return None
    if _SPLIT_OUT.search(key):
        axis = 0
    elif _SPLIT_IN.search(key):
        axis = 1
    else:
        return None
    n = shape[axis] // mp
    index = [slice(None)] * len(shape)
    index[axis] = slice(rank * n, (rank + 1) * n)
    return tuple(index)


class _ShardView:
    """The checkpoint as one rank sees it: split tensors have their shard's shape and data."""

    def __init__(self, index: WeightsIndex, rank: int, mp: int):
        self.index, self.rank, self.mp = index, rank, mp

    def _slice(self, key: str) -> tuple[slice, ...] | None:
        return shard_slice(key, self.index.shape(key), self.rank, self.mp)

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def shape(self, key: str) -> tuple[int, ...]:
        shape = self.index.shape(key)
        index = self._slice(key)
        if index is None:
            return shape
        return tuple(len(range(*s.indices(d))) for s, d in zip(index, shape, strict=True))

    def dtype(self, key: str) -> np.dtype:
        return self.index.dtype(key)

    def file_of(self, key: str) -> Path:
        return self.index.file_of(key)

    def get(self, key: str) -> np.ndarray:
        index = self._slice(key)
        return self.index.get(key) if index is None else self.index.get_slice(key, index)


class TensorParallelSD3Transformer(SD3Transformer2DModel):
    """One tensor-parallel shard of :class:`SD3Transformer2DModel`; same call, same outputs.

    Build with :func:`load_transformer_shard`. Every rank of the mp group runs the same forward
    on the same inputs; the collectives inside make every rank's output the full velocity.
    """

    comm: Collectives  # set before __init__ (see _build): the constructor sizes the shard by it

    @classmethod
    def _build(cls, config: Mapping[str, Any], comm: Collectives) -> TensorParallelSD3Transformer:
        known = set(cls._init_keys())
        model = cls.__new__(cls)
        object.__setattr__(model, "comm", comm)
        model.__init__(**{k: v for k, v in config.items() if k in known})
        return model

    def tensor_parallel_shards(self) -> int:
        return self.comm.world_size

    def save_pretrained(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "a tensor-parallel shard holds only part of the transformer; save the checkpoint it was loaded from"
        )

    def local_lora(self, lora_file: LoRAFile) -> LoRAFile:
        """This shard's part of a LoRA file (``sd3_core.lora_file.load_lora`` calls this).

        ``delta = B @ A`` is split like the layer it adapts: a column-parallel layer (split output
        features) keeps its rows of ``B`` and all of ``A``; a row-parallel one (split input
        features, partial sums) keeps its columns of ``A`` and all of ``B``, so its LoRA output
        is a partial sum too and travels in the layer's all-reduce."""
        rank, mp = self.comm.rank, self.comm.world_size
        modules = {}
        for name, m in lora_file.modules.items():
            index = shard_slice(f"{name}.weight", (m.b.shape[0], m.a.shape[1]), rank, mp)
            if index is None:
                modules[name] = m
                continue
            rows, cols = index
            modules[name] = replace(
                m, a=np.ascontiguousarray(m.a[:, cols]), b=np.ascontiguousarray(m.b[rows])
            )
        return replace(lora_file, modules=modules)

    def reduce_partial_sums(self, layers: list[paddle.nn.Layer], partials: list[paddle.Tensor]):
        """Sum the row-parallel partial outputs over the mp group (one collective), add biases."""
        full = self.comm.all_reduce_sum(partials)
        return [
            out + (layer.bias if layer.bias.dtype == out.dtype else layer.bias.astype(out.dtype))
            for layer, out in zip(layers, full, strict=True)
        ]

    def modulations(self, temb_act: paddle.Tensor) -> list[paddle.Tensor]:
        """This rank's slice of every adaLN layer, then ONE all-gather for the whole stack."""
        local = super().modulations(temb_act)
        widths = [t.shape[-1] for t in local]
        gathered = self.comm.all_gather(paddle.concat(local, axis=-1))
        per_rank = [paddle.split(g, widths, axis=-1) for g in gathered]
        return [paddle.concat([parts[j] for parts in per_rank], axis=-1) for j in range(len(local))]


def load_transformer_shard(
    path: str | os.PathLike,
    comm: Collectives | None = None,
    subfolder: str | None = None,
    dtype: str | paddle.dtype = "float32",
) -> SD3Transformer2DModel:
    """This rank's shard of the transformer in ``path`` (the plain model for a group of one).

    Reads only this rank's slices of the split tensors from the (memory-mapped) safetensors.
    """
    comm = comm or SingleRank()
    folder = Path(path) / subfolder if subfolder else Path(path)
    config = SD3Transformer2DModel.load_config(folder)
    check_tensor_parallel(config, comm.world_size)
    if comm.world_size == 1:
        return SD3Transformer2DModel.from_pretrained(folder, dtype=dtype)
    name = resolve_dtype(dtype)
    index = open_weights(folder, SD3Transformer2DModel.weights_name)
    with default_dtype(name), paddle.LazyGuard():
        model = TensorParallelSD3Transformer._build(config, comm)
    try:
        load_torch_state(
            model,
            _ShardView(index, comm.rank, comm.world_size),
            name,
            f"{folder} (tensor-parallel shard {comm.rank} of {comm.world_size})",
        )
    finally:
        index.close()
    model.eval()
    return model


def parameter_bytes(model: paddle.nn.Layer) -> int:
    """Bytes of the model's state (parameters and persistent buffers), as held in this process."""
    return sum(int(np.prod(t.shape)) * t.element_size() for t in model.state_dict().values())
