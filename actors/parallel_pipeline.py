"""StableDiffusion3Pipeline's call, run by a replica group of ``cfg x mp`` ranks.

:class:`ParallelStableDiffusion3Pipeline` is the caller's object: the single pipeline's
arguments in, rank 0's images out, with the ranks living in an
``actors.replica_group.ReplicaGroup`` (Ray actors in one placement group). Each rank runs
``pipelines.rank_pipeline.RankPipeline`` (see there for how the work is split).

The call takes exactly ``StableDiffusion3Pipeline.__call__``'s arguments (its signature is that
one). Arguments travel to the ranks by value: a NumPy ``generator`` is copied, so the caller's
does not advance (a paddle one travels as its seed); ``callback_on_step_end`` runs on rank 0, in its process. The LoRA methods of
``StableDiffusion3Pipeline`` (``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ...) run
on every rank (a tensor-parallel rank keeps only its slices of each adapter); saving an
adapter is left to the single pipeline.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle
import ray

from actors.replica import RenderRequest, ReplicaLost, ReplicaSpec, render_request
from actors.replica_group import ReplicaGroup, ReplicaGroupBroken
from pipelines.lora_loading import LORA_COMPONENTS
from pipelines.pipeline_device import to_arguments
from pipelines.rank_pipeline import TENSOR_ARGUMENTS, call_arguments
from pipelines.stable_diffusion_3 import (
    StableDiffusion3Pipeline,
    StableDiffusion3PipelineOutput,
    generator_seeds,
)
from sd3_core.dtypes import dtype_argument

__all__ = ["GroupReplica", "ParallelStableDiffusion3Pipeline"]

logger = logging.getLogger(__name__)
_CALL_SIGNATURE = inspect.signature(StableDiffusion3Pipeline.__call__)


class ParallelStableDiffusion3Pipeline:
    """``StableDiffusion3Pipeline``'s call on a replica group; same arguments, same images.

    Build with :meth:`from_pretrained` (starts the group's actors) or around a running group.
    ``close()`` (or a ``with`` block) stops the group's actors and frees their devices.
    """

    def __init__(self, group: Any) -> None:
        self.group = group

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        cfg: int = 1,
        mp: int = 1,
        device: str = "gpu",
        dtype: str | Any = None,
        cpus_per_rank: float = 1.0,
        inference_optimize: bool = False,
        *,
        paddle_dtype: Any = None,
        torch_dtype: Any = None,
        **group_options: Any,
    ) -> ParallelStableDiffusion3Pipeline:
        """Start a ``cfg x mp`` replica group on ``device`` ("gpu", "npu", "cpu") with ``model``
        (a diffusers folder, URL or Hub id, resolved on each rank's node). Ray must be initialised
        (``ray.init``) first. ``dtype`` (default float32) may be spelled ``paddle_dtype=`` / ``torch_dtype=``.
        ``inference_optimize`` (mp = 1 only) runs each rank's transformer as static programs.

        ``group_options`` go to ``ReplicaGroup`` (e.g. ``compute_device="cpu"`` to run GPU-kind
        bundles on the CPU, as the tests do with Ray's logical GPUs)."""
        dtype = dtype_argument(dtype, paddle_dtype, torch_dtype)
        spec = ReplicaSpec(model=model, dtype=dtype, device=device, cfg=cfg, mp=mp, cpus=cpus_per_rank,
                           inference_optimize=inference_optimize)  # fmt: skip
        return cls(ReplicaGroup(spec, **group_options))

    @property
    def device(self) -> str:
        """The kind of device every rank computes on ("gpu", "npu", "cpu"; one device per rank)."""
        return self.group.spec.device

    def to(self, *args: Any, **kwargs: Any) -> ParallelStableDiffusion3Pipeline:
        """``pipe.to(...)`` as diffusers reads it (``StableDiffusion3Pipeline.to``): the ranks'
        device kind and dtype are fixed when the group is built, so asking for them returns the
        pipeline and asking for others is refused, saying how to build that group instead."""
        kwargs.pop("silence_dtype_warnings", None)
        device, dtype = to_arguments(args, **kwargs)
        spec = self.group.spec
        if (device is None or device.split(":")[0] == spec.device) and dtype in (None, spec.dtype):
            return self
        raise ValueError(
            f"pipe.to: this group's ranks compute on {spec.device} in {spec.dtype}, fixed when it is "
            "built; close() it and build another: ParallelStableDiffusion3Pipeline.from_pretrained("
            "model, cfg=..., mp=..., device=..., dtype=...)"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> StableDiffusion3PipelineOutput | tuple:
        """Generate images: see ``StableDiffusion3Pipeline.__call__``."""
        call = call_arguments(_CALL_SIGNATURE, *args, **kwargs)
        return_dict = call.pop("return_dict")
        for name in TENSOR_ARGUMENTS:
            if isinstance(call[name], paddle.Tensor):
                call[name] = call[name].numpy()
        call["generator"] = generator_seeds(call["generator"])  # a paddle Generator does not pickle
        images: Any = self.group.generate(call)
        output_type = call["output_type"]
        if output_type == "latent":
            images = paddle.to_tensor(images)
        else:
            images = StableDiffusion3Pipeline.images_as(images, output_type)
        return StableDiffusion3PipelineOutput(images=images) if return_dict else (images,)

    # diffusers' LoRA methods (``SD3LoraLoaderMixin``, same signatures): each runs on every rank,
    # which holds its own slices of the adapter; rank 0's result is returned.

    def load_lora_weights(
        self,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str | None = None,
        scale: float = 1.0,
        weight_name: str | None = None,
        subfolder: str | None = None,
        **hub_options: Any,
    ) -> str:
        """See ``StableDiffusion3Pipeline.load_lora_weights``; the path (or Hub id) is read on each
        rank's node."""
        return self.group.call_pipeline(
            "load_lora_weights", os.fspath(pretrained_model_name_or_path), adapter_name, scale, weight_name,
            subfolder, **hub_options,
        )  # fmt: skip

    def set_adapters(
        self,
        adapter_names: str | Sequence[str],
        adapter_weights: float | Sequence[float | None] | None = None,
    ) -> None:
        self.group.call_pipeline("set_adapters", adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return self.group.call_pipeline("get_active_adapters")

    def get_list_adapters(self) -> dict[str, list[str]]:
        return self.group.call_pipeline("get_list_adapters")

    def enable_lora(self) -> None:
        self.group.call_pipeline("enable_lora")

    def disable_lora(self) -> None:
        self.group.call_pipeline("disable_lora")

    def fuse_lora(
        self,
        components: Sequence[str] = LORA_COMPONENTS,
        lora_scale: float = 1.0,
        adapter_names: Sequence[str] | None = None,
    ) -> None:
        self.group.call_pipeline("fuse_lora", components, lora_scale, adapter_names)

    def unfuse_lora(self, components: Sequence[str] = LORA_COMPONENTS) -> None:
        self.group.call_pipeline("unfuse_lora", components)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        self.group.call_pipeline("delete_adapters", adapter_names)

    def unload_lora_weights(self) -> None:
        self.group.call_pipeline("unload_lora_weights")

    def close(self) -> None:
        self.group.shutdown()

    def __enter__(self) -> ParallelStableDiffusion3Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ParallelStableDiffusion3Pipeline.__call__.__signature__ = _CALL_SIGNATURE  # for help() and IDEs


class GroupReplica:
    """A replica group behind the batch job's ``Replica`` protocol: what a pool actor of
    ``map_batches`` holds instead of an in-process pipeline when ``cfg x mp > 1``.

    The pool actor only coordinates; the group's ranks hold the devices, in the bundles of the
    pool actor's placement group (``actors/pool_placement.py``), and end with the pool actor (an
    actor's actors end with it). A broken group (a rank died mid-call) raises ``ReplicaLost``:
    Ray restarts the pool actor, with a new group, and retries the batch.
    """

    def __init__(self, spec: ReplicaSpec) -> None:
        placement = ray.util.get_current_placement_group()
        if placement is None:
            raise RuntimeError(
                "a GroupReplica's ranks take the bundles of its pool actor's placement group; start the "
                "pool actor with actors.pool_placement.PoolPlacementGroups (map_batches' ray_remote_args_fn)"
            )
        self.group = ReplicaGroup(spec, placement_group=placement)
        self.pipe = ParallelStableDiffusion3Pipeline(self.group)
        self.model = self.group.model
        self.lora = self.group.lora
        self.name = f"{socket.gethostname()}:{os.getpid()}/{self.group.name}"

    def render(self, request: RenderRequest) -> list[np.ndarray]:
        try:
            return render_request(self.pipe, request)
        except ReplicaGroupBroken as e:
            logger.error(
                "replica group %s broke; ending this pool actor for Ray to restart: %s", self.name, e
            )
            raise ReplicaLost(f"replica group {self.name} broke: {e}") from e
