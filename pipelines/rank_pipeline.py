"""StableDiffusion3Pipeline as one rank of a ``cfg x mp`` replica runs it.

:class:`RankPipeline` is the single pipeline with three seams overridden, so every argument of
``StableDiffusion3Pipeline.__call__`` (skip-layer guidance, per-step callbacks, precomputed
prompt embeddings, sigmas, LoRA adapters loaded on the rank, ...) means the same here. Every
rank of the replica calls it with the same arguments, in lockstep.

- **CFG split** (``cfg=2`` and guidance on): the negative half of the CFG batch lives on cfg
  rank 0, the positive half on cfg rank 1. Each rank encodes only its own prompts and runs the
  transformer on its own half; after every transformer call one all-gather over the replica
  exchanges the halves, so guidance and the scheduler step run on every rank with the same
  inputs and every rank holds the same latents. Skip-layer guidance needs a third forward, on
  the positive prompts only: both halves run it (on gloo every collective of the tensor-parallel
  forward is a world collective, so the halves must stay in lockstep) and the positive half's
  result is gathered.
- **Tensor parallel** (``mp > 1``): ``pipe.transformer`` is this rank's shard
  (``sd3_core.tensor_parallel``); nothing else changes.
- **Shared text encoding** (``share_within_mp``): text encoders (T5-XXL alone is larger than the
  SD3-medium transformer) need not be on every rank: only mp rank 0 of each half encodes, and one
  all-reduce per generation (the other ranks contribute zeros) hands the embeddings to the rest
  of its mp group.
- **Callbacks** run on rank 0 only; the latents they return and the call state they set
  (``pipe._interrupt``, ``pipe._guidance_scale``) reach every rank by one all-reduce per step
  (the other ranks contribute zeros), so the ranks stay in lockstep. Under the CFG split the
  ``prompt_embeds`` a callback sees hold zeros in the other half's rows.

Stats of the last call (``last_stats``): seconds and steps of the denoising loop, and the
collectives of the encoding and of the denoising loop (counted by ``groups.counter``).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import paddle

from pipelines.stable_diffusion_3 import OUTPUT_TYPES, StableDiffusion3Pipeline
from sd3_core.collectives import DeviceGroups

__all__ = ["RankPipeline", "call_arguments", "generate_on_rank"]

_ENCODE_SIGNATURE = inspect.signature(StableDiffusion3Pipeline.encode_prompt)
_CALL_SIGNATURE = inspect.signature(StableDiffusion3Pipeline.__call__)
# Arguments that may arrive as NumPy arrays (they travel between processes that way).
TENSOR_ARGUMENTS = (
    "latents",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)


def call_arguments(signature: inspect.Signature, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Every argument of a call to a method of ``signature`` by name (``self`` left out), defaults
    filled in; a wrong argument raises the TypeError Python would."""
    bound = signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    return {name: value for name, value in bound.arguments.items() if name != "self"}


class RankPipeline(StableDiffusion3Pipeline):
    """One rank's pipeline; build with :meth:`of` around a loaded pipeline (components shared)."""

    groups: DeviceGroups
    share_within_mp: bool

    @classmethod
    def of(
        cls, pipe: StableDiffusion3Pipeline, groups: DeviceGroups, share_within_mp: bool = False
    ) -> RankPipeline:
        """``pipe``'s components as rank ``groups.rank`` of its replica. With ``share_within_mp``
        (the same on every rank) only mp rank 0 of each half needs text encoders."""
        rank = cls(**pipe.components)
        rank.default_max_sequence_length = pipe.default_max_sequence_length
        rank.default_guidance_scale = pipe.default_guidance_scale
        rank._progress_bar_config = dict(pipe._progress_bar_config)
        rank.groups, rank.share_within_mp = groups, share_within_mp
        rank._split = False
        rank.last_stats = {}
        return rank

    @paddle.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``StableDiffusion3Pipeline.__call__``, as this rank's part of the replica's call."""
        call = call_arguments(_CALL_SIGNATURE, *args, **kwargs)
        for name in TENSOR_ARGUMENTS:
            if isinstance(call[name], np.ndarray):
                call[name] = paddle.to_tensor(call[name])
        call["guidance_scale"], call["max_sequence_length"] = self.folder_defaults(
            call["guidance_scale"], call["max_sequence_length"]
        )
        self._split = self.groups.cfg == 2 and call["guidance_scale"] > 1
        if call["callback_on_step_end"] is not None and self.groups.replica.world_size > 1:
            call["callback_on_step_end"] = self._shared_callback(
                call["callback_on_step_end"], call["callback_on_step_end_tensor_inputs"]
            )
            call["callback_on_step_end_tensor_inputs"] = ("latents", "prompt_embeds", "pooled_prompt_embeds")
        self.groups.counter.reset()
        self.last_stats = {"rank": self.groups.rank}
        self._encoded_at = self._denoised_at = None
        out = super().__call__(**call)
        self.last_stats.update(
            steps=int(self.scheduler.timesteps.shape[0]),
            denoise_seconds=(self._denoised_at or time.perf_counter()) - self._encoded_at,
            denoise_collectives=self.groups.counter.snapshot(),  # decoding sends none
        )
        return out

    # ---- the seams -----------------------------------------------------------------------------
    def encode_prompt(self, *args: Any, **kwargs: Any) -> tuple[paddle.Tensor, ...]:
        """``encode_prompt``'s four tensors, of which this rank computes only its half's: under
        the CFG split the other half's are zeros of the same shape."""
        a = call_arguments(_ENCODE_SIGNATURE, *args, **kwargs)
        g = self.groups
        do_cfg = a["do_classifier_free_guidance"]
        split = g.cfg == 2 and do_cfg
        negative_half = split and g.cfg_rank == 0
        given = a["prompt_embeds"] is not None  # precomputed: every rank has them, nothing to share
        share = self.share_within_mp and g.mp > 1 and not given
        if share and g.mp_rank:
            own = self._zero_embeddings(a, 2 if do_cfg and not split else 1)
        else:
            if negative_half and not given:  # given embeddings make the positive side skip encoding
                a.update(prompt_embeds=paddle.zeros([0]), pooled_prompt_embeds=paddle.zeros([0]))
            if split and not negative_half:
                a["do_classifier_free_guidance"] = False
            pos, neg, pooled, neg_pooled = super().encode_prompt(**a)
            if negative_half:
                own = [neg, neg_pooled]
            else:
                own = [pos, pooled] + ([neg, neg_pooled] if do_cfg and not split else [])
            own = [t.astype("float32") for t in own]
        if share:
            own = g.mp_group.all_reduce_sum(own)
        if negative_half:
            own = [paddle.zeros_like(t) for t in own] + own
        elif split:
            own = own + [paddle.zeros_like(t) for t in own]
        elif not do_cfg:
            own = own + [None, None]
        pos, pooled, neg, neg_pooled = own
        self.last_stats["encode_collectives"] = g.counter.snapshot()
        g.counter.reset()
        self._encoded_at = time.perf_counter()
        return pos, neg, pooled, neg_pooled

    def decode_latents(self, latents: paddle.Tensor, output_type: str = "np") -> Any:
        """Rank 0's images; the other ranks hold no VAE weights and return None."""
        self._denoised_at = time.perf_counter()
        return super().decode_latents(latents, output_type) if self.groups.rank == 0 else None

    def _zero_embeddings(self, a: dict[str, Any], sides: int) -> list[paddle.Tensor]:
        """Zeros shaped like the mp leader's ``[embeds, pooled] * sides`` (CLIP then T5 tokens)."""
        prompts = [a["prompt"]] if isinstance(a["prompt"], str) else a["prompt"]
        n = len(prompts) * a["num_images_per_prompt"]
        _, msl = self.folder_defaults(max_sequence_length=a["max_sequence_length"])
        config = self.transformer.config
        embeds = paddle.zeros([n, self.tokenizer_max_length + msl, config.joint_attention_dim])
        pooled = paddle.zeros([n, config.pooled_projection_dim])
        return [embeds, pooled] * sides

    def _velocity(
        self,
        latents: paddle.Tensor,
        embeds: paddle.Tensor,
        pooled: paddle.Tensor,
        t: paddle.Tensor,
        skip_layers: list[int] | None = None,
    ) -> paddle.Tensor:
        if not self._split:
            return super()._velocity(latents, embeds, pooled, t, skip_layers)
        g = self.groups
        if skip_layers is None:  # the CFG batch [negative; positive]: this rank's half only
            n = latents.shape[0] // 2
            rows = slice(g.cfg_rank * n, (g.cfg_rank + 1) * n)
            own = super()._velocity(latents[rows], embeds[rows], pooled[rows], t)
            halves = g.replica.all_gather(own)
            return paddle.concat([halves[g.half_leader(0)], halves[g.half_leader(1)]])
        # Skip-layer guidance on the positive prompts: the negative half's embeddings are zeros
        # here, its result is dropped; it runs only to keep the halves' collectives in lockstep.
        own = super()._velocity(latents, embeds, pooled, t, skip_layers)
        return g.replica.all_gather(own)[g.half_leader(1)]

    def _shared_callback(self, callback: Callable, wanted: Any) -> Callable:
        """``callback`` on rank 0; its latents, and the call state it may set (``_interrupt``,
        ``_guidance_scale``), reach every rank by one all-reduce per step. Returning other
        tensors than it was given is refused on every rank at once (no rank is left waiting)."""

        def on_every_rank(pipe: Any, i: int, t: paddle.Tensor, tensors: dict) -> dict:
            latents = tensors["latents"]
            state = paddle.zeros([3])  # interrupt, guidance scale, refused
            if self.groups.rank == 0:
                returned = callback(pipe, i, t, {k: tensors[k] for k in wanted}) or {}
                latents = returned.get("latents", latents).astype("float32")
                embeds = ("prompt_embeds", "pooled_prompt_embeds")
                changed = any(k in returned and returned[k] is not tensors[k] for k in embeds)
                state = paddle.to_tensor(
                    [float(self._interrupt), float(self._guidance_scale), float(changed)]
                )
            else:
                latents = paddle.zeros_like(latents)
            latents, state = self.groups.replica.all_reduce_sum([latents, state])
            interrupt, guidance, refused = (float(v) for v in state.numpy())
            if refused:
                raise ValueError(
                    "a step callback of a parallel pipeline may return only latents (its "
                    "prompt_embeds / pooled_prompt_embeds are not shared between ranks)"
                )
            if self._split and guidance <= 1:
                raise ValueError(
                    "a step callback switched guidance off (pipe._guidance_scale <= 1) under the "
                    "CFG split (cfg=2), whose halves live on different ranks; run it with cfg=1"
                )
            self._interrupt, self._guidance_scale = bool(interrupt), guidance
            return {"latents": latents}

        return on_every_rank


def generate_on_rank(rank: RankPipeline, args: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """This rank's part of ``pipe(**args)``: ``(images, stats)``; images only on rank 0, else None.

    Images are an NHWC float array in [0, 1] for every ``output_type`` but "latent" (the caller
    makes them PIL images or tensors: ``StableDiffusion3Pipeline.images_as``), for which they are
    the float32 latents as a NumPy array.
    """
    wanted = args.get("output_type", "pil")
    computed = wanted if wanted == "latent" or wanted not in OUTPUT_TYPES else "np"  # else: refused
    call = {**args, "output_type": computed, "return_dict": False}
    (images,) = rank(**call)
    if rank.groups.rank != 0:
        return None, rank.last_stats
    return (images.numpy() if isinstance(images, paddle.Tensor) else images), rank.last_stats
