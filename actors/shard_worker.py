"""One rank of a replica group: a Ray actor holding one CFG half's tensor-parallel shard.

The group (``actors/replica_group.py``) drives its ranks in lockstep: ``endpoint`` on every rank
(rank 0's address and free port is the rendezvous of the Paddle world), then ``join`` on all at
once (collectives: NCCL on GPU, the custom-device backend on NPU, gloo on CPU), ``load`` (and
``apply_lora`` for a job's adapter), any number of ``generate``, and ``leave`` on all at once
before the actors are killed (a rank that vanishes while its peers still talk to it, rank 0 also
hosting the store, makes them abort).

Memory: a rank holds only its transformer shard; with mp > 1 only mp rank 0 of each CFG half
holds the text encoders (its embeddings reach the other mp ranks in one all-reduce), and only
rank 0 holds the VAE's weights (it alone decodes).

Paddle and the model code are imported inside the methods, after the constructor's
`runtime.configure()`: the rank's process settings come first, and the warning Paddle prints on
import is hidden in every rank's log.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np

from actors.replica import ReplicaSpec, apply_lora, configure_vae
from sd3_core import runtime
from sd3_core.devices import paddle_device

__all__ = ["ShardWorker"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ShardWorker:
    """Rank ``rank`` of a ``cfg x mp`` replica (rank = cfg_rank * mp + mp_rank).

    ``compute`` is the kind of device the rank computes on; normally the kind its bundle holds,
    "cpu" when tests run GPU-kind bundles of Ray's logical GPUs on the CPU."""

    def __init__(self, rank: int, cfg: int, mp: int, compute: str, threads: int = 1) -> None:
        self.threads = runtime.configure(threads=threads)
        import paddle

        self.rank, self.cfg, self.mp = rank, cfg, mp
        # Ray exposes exactly the actor's device (CUDA/ASCEND_RT_VISIBLE_DEVICES): it is device 0 here.
        self.device = paddle_device(compute)
        paddle.set_device(self.device)
        self.groups = None
        self.pipe = None

    def endpoint(self) -> str:
        """``host:port`` this rank offers the Paddle world (rank 0's is its rendezvous store)."""
        import ray

        return f"{ray.util.get_node_ip_address()}:{_free_port()}"

    def join(self, endpoints: list[str]) -> int:
        """Join the replica's collective world; every rank calls this at the same time."""
        from sd3_core.collectives import init_device_groups, single_process_groups

        if len(endpoints) == 1:
            self.groups = single_process_groups()
        else:
            self.groups = init_device_groups(self.cfg, self.mp, self.rank, endpoints, self.device)
        return os.getpid()

    def load(self, model: str, spec: ReplicaSpec) -> dict[str, Any]:
        """Load this rank's part of ``model`` (folder or URL) as ``spec`` says (dtype, storage,
        ``inference_optimize``: the whole, mp = 1, transformer as cached static programs; tiled
        decoding on rank 0): its transformer's bytes and the model's identity
        (``sd3_core.model_cache.model_identity``)."""
        from pipelines.pipeline_loading import TEXT_COMPONENTS
        from pipelines.rank_pipeline import RankPipeline
        from pipelines.stable_diffusion_3 import StableDiffusion3Pipeline
        from sd3_core.model_cache import local_model_path, model_identity
        from sd3_core.tensor_parallel import load_transformer_shard, parameter_bytes

        self.pipe = None  # free the previous model first
        path = local_model_path(model, spec.storage)
        transformer = load_transformer_shard(
            path, self.groups.mp_group, subfolder="transformer", dtype=spec.dtype
        )
        parts: dict[str, Any] = {"transformer": transformer}
        if self.groups.mp > 1 and self.groups.mp_rank:
            parts.update(dict.fromkeys(TEXT_COMPONENTS))
        if self.rank:
            parts["vae"] = _vae_without_weights(path)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=spec.dtype, **parts)
        pipe.set_progress_bar_config(disable=True)
        configure_vae(pipe, spec)
        self.pipe = RankPipeline.of(pipe, self.groups, share_within_mp=self.groups.mp > 1)
        if spec.inference_optimize:
            self.pipe.enable_inference_optimize(threads=self.threads if self.device == "cpu" else None)
        return {"param_bytes": parameter_bytes(transformer), "model": model_identity(path, model)}

    def apply_lora(self, lora: Any, scale: float, storage: Any = None) -> str:
        """Bake a pinned adapter (``sd3_core.lora_registry.PinnedLoRA``) into this rank's shard at
        ``scale`` (see ``actors.replica.apply_lora``); its identity."""
        return apply_lora(self._loaded(), lora, scale, storage)

    def generate(self, args: dict[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
        """This rank's part of one pipeline call (see ``pipelines.rank_pipeline.generate_on_rank``)."""
        from pipelines.rank_pipeline import generate_on_rank

        return generate_on_rank(self._loaded(), args)

    def call_pipeline(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """``pipe.<name>(*args, **kwargs)`` for one of the LoRA methods every rank runs alike."""
        from pipelines.lora_loading import LORA_METHODS

        if name not in LORA_METHODS:
            raise AttributeError(f"a replica rank does not run `{name}`; it runs {list(LORA_METHODS)}")
        return getattr(self._loaded(), name)(*args, **kwargs)

    def _loaded(self) -> Any:
        if self.pipe is None:
            raise RuntimeError(f"rank {self.rank} has no model loaded")
        return self.pipe

    def leave(self) -> None:
        """Leave the collective world (every rank at the same time)."""
        from sd3_core.collectives import leave_world

        self.pipe = None
        leave_world()


def _vae_without_weights(path: str):
    """The VAE's structure without its weights: ranks other than 0 never decode, but the
    pipeline reads the VAE's config (its scale factor)."""
    import paddle

    from sd3_core.vae import AutoencoderKL

    with paddle.LazyGuard():
        return AutoencoderKL.from_config(AutoencoderKL.load_config(path, subfolder="vae"))
