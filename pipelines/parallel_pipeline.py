"""StableDiffusion3Pipeline's call, run by a replica group of ``cfg x mp`` ranks.

Two halves, one idea. :func:`generate_on_rank` is what every rank runs (Ray-free: a rank is any
process with a :class:`~sd3_core.collectives.DeviceGroups`): encode its CFG half, denoise with
its transformer shard, decode on rank 0. :class:`ParallelStableDiffusion3Pipeline` is the
caller's object: the pipeline's arguments in, rank 0's images out, with the ranks living in an
``actors.replica_group.ReplicaGroup`` (Ray actors in one placement group).

Not supported under the split yet: skip-layer guidance, LoRA, per-step callbacks and
precomputed prompt embeddings (a clear error says so); use ``StableDiffusion3Pipeline``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle
from PIL import Image

from pipelines.parallel_denoise import denoise, encode_prompt_half
from pipelines.stable_diffusion_3 import StableDiffusion3Pipeline, StableDiffusion3PipelineOutput
from sd3_core.collectives import DeviceGroups

__all__ = ["ParallelStableDiffusion3Pipeline", "generate_on_rank"]

# StableDiffusion3Pipeline arguments a replica group does not take (yet), with the reason.
_UNSUPPORTED = {
    "skip_guidance_layers": "skip-layer guidance is not supported under the CFG/tensor-parallel split yet",
    "callback_on_step_end": "per-step callbacks cannot run inside the ranks",
    "prompt_embeds": "precomputed prompt embeddings are not supported on a replica group yet",
    "negative_prompt_embeds": "precomputed prompt embeddings are not supported on a replica group yet",
    "pooled_prompt_embeds": "precomputed prompt embeddings are not supported on a replica group yet",
    "negative_pooled_prompt_embeds": "precomputed prompt embeddings are not supported on a replica group yet",
}


def generate_on_rank(
    pipe: StableDiffusion3Pipeline,
    groups: DeviceGroups,
    prompt: str | list[str],
    prompt_2: str | list[str] | None = None,
    prompt_3: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 28,
    sigmas: list[float] | None = None,
    guidance_scale: float = 7.0,
    negative_prompt: str | list[str] | None = None,
    negative_prompt_2: str | list[str] | None = None,
    negative_prompt_3: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    generator: Any = None,
    seed: int | Sequence[int] | None = None,
    latents: Any = None,
    output_type: str = "np",
    clip_skip: int | None = None,
    max_sequence_length: int = 256,
    mu: float | None = None,
    share_within_mp: bool = False,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """This rank's part of ``pipe(...)``: ``(images, stats)``; images only on rank 0, else None.

    Every rank of the replica calls this with the same arguments. Images are an NHWC float array
    in [0, 1] (``output_type`` "np" or "pil": the caller makes PIL images) or the float32 latents
    ("latent"). ``stats``: denoising seconds and steps, and the collectives of the encoding and of
    the denoising loop (counted by ``groups.counter``).
    """
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(
        prompt, height, width, num_inference_steps, num_images_per_prompt, max_sequence_length,
        None, None, negative_prompt, None, None, output_type,
    )  # fmt: skip
    do_cfg = guidance_scale > 1
    counter = groups.counter
    counter.reset()
    with paddle.no_grad():
        embeds, pooled = encode_prompt_half(
            pipe, groups, prompt, prompt_2, prompt_3,
            negative_prompt, negative_prompt_2, negative_prompt_3,
            num_images_per_prompt, do_cfg, clip_skip, max_sequence_length, share_within_mp,
        )  # fmt: skip
        encode_counts = counter.snapshot()
        counter.reset()
        batch = len([prompt] if isinstance(prompt, str) else prompt) * num_images_per_prompt
        latents = pipe.prepare_latents(batch, height, width, generator, seed, latents)
        if mu is None and pipe.scheduler.config.get("use_dynamic_shifting"):
            tokens = (latents.shape[2] // pipe.patch_size) * (latents.shape[3] // pipe.patch_size)
            mu = pipe.scheduler.mu_for_image_seq_len(tokens)
        if sigmas is not None:
            pipe.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        else:
            pipe.scheduler.set_timesteps(num_inference_steps, mu=mu)
        started = time.perf_counter()
        latents = denoise(pipe, groups, latents, embeds, pooled, guidance_scale)
        seconds = time.perf_counter() - started
        stats = {
            "rank": groups.rank,
            "steps": int(pipe.scheduler.timesteps.shape[0]),
            "denoise_seconds": seconds,
            "encode_collectives": encode_counts,
            "denoise_collectives": counter.snapshot(),
        }
        if groups.rank != 0:
            return None, stats
        if output_type == "latent":
            return latents.numpy(), stats
        return pipe.decode_latents(latents, "np"), stats


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
        dtype: str = "float32",
        cpus_per_rank: float = 1.0,
        **group_options: Any,
    ) -> ParallelStableDiffusion3Pipeline:
        """Start a ``cfg x mp`` replica group on ``device`` ("gpu", "npu", "cpu") with ``model``
        (a diffusers folder or URL). Ray must be initialised (``ray.init``) first.

        ``group_options`` go to ``ReplicaGroup`` (e.g. ``compute_device="cpu"`` to run GPU-kind
        bundles on the CPU, as the tests do with Ray's logical GPUs)."""
        from actors.replica import ReplicaSpec
        from actors.replica_group import ReplicaGroup

        spec = ReplicaSpec(model=model, dtype=dtype, device=device, cfg=cfg, mp=mp, cpus=cpus_per_rank)
        return cls(ReplicaGroup(spec, **group_options))

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        seed: int | Sequence[int] | None = None,
        latents: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        mu: float | None = None,
        **unsupported: Any,
    ) -> StableDiffusion3PipelineOutput | tuple:
        """Generate images (see ``StableDiffusion3Pipeline.__call__``). A NumPy ``generator`` is
        copied to every rank, so the caller's generator does not advance."""
        for name, value in unsupported.items():
            if name not in _UNSUPPORTED:
                raise TypeError(f"ParallelStableDiffusion3Pipeline got an unexpected argument `{name}`")
            if value is not None:
                raise NotImplementedError(f"`{name}`: {_UNSUPPORTED[name]}; use StableDiffusion3Pipeline")
        if prompt is None:
            raise ValueError("`prompt` is required")
        if isinstance(latents, paddle.Tensor):
            latents = latents.numpy()
        args = dict(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, height=height, width=width,
            num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3, num_images_per_prompt=num_images_per_prompt,
            generator=generator, seed=seed, latents=latents, output_type=output_type,
            clip_skip=clip_skip, max_sequence_length=max_sequence_length, mu=mu,
        )  # fmt: skip
        images: Any = self.group.generate(args)
        if output_type == "latent":
            images = paddle.to_tensor(images)
        elif output_type == "pil":
            images = [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]
        return StableDiffusion3PipelineOutput(images=images) if return_dict else (images,)

    def close(self) -> None:
        self.group.shutdown()

    def __enter__(self) -> ParallelStableDiffusion3Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
