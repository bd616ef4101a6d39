"""Classifier-free guidance split across two ranks, for a replica of ``cfg x mp`` processes.

With ``cfg=2`` the negative half of the CFG batch lives on cfg rank 0 and the positive half on
cfg rank 1: each rank encodes only its own prompts and runs the transformer on its own half.
After every transformer call the halves are exchanged (one all-gather over the replica), so
guidance and the scheduler step run on every rank with the same inputs and every rank holds the
same latents. With ``cfg=1`` this is the single-process pipeline's loop (both halves in one
batch), with a tensor-parallel transformer when ``mp > 1``.

Every rank of the replica calls these functions with the same arguments.

Text encoders (T5-XXL alone is larger than the SD3-medium transformer) need not be on every
rank: with ``share_within_mp`` only mp rank 0 of each half encodes, and one all-reduce per
generation (the other ranks contribute zeros) hands the embeddings to the rest of its mp group.
"""

from __future__ import annotations

from collections.abc import Sequence

import paddle

from pipelines.stable_diffusion_3 import StableDiffusion3Pipeline
from sd3_core.collectives import DeviceGroups

__all__ = ["cfg_parallel_latents", "denoise", "encode_prompt_half"]


def encode_prompt_half(
    pipe: StableDiffusion3Pipeline,
    groups: DeviceGroups,
    prompt: str | list[str],
    prompt_2: str | list[str] | None = None,
    prompt_3: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    negative_prompt_2: str | list[str] | None = None,
    negative_prompt_3: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
    clip_skip: int | None = None,
    max_sequence_length: int = 256,
    share_within_mp: bool = False,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(embeds, pooled)`` this rank feeds the transformer, in the model's dtype.

    cfg=1 (or no guidance): the pipeline's batch, ``[negative, positive]`` under CFG. cfg=2: only
    this rank's half, the negatives on cfg rank 0 and the positives on cfg rank 1. With
    ``share_within_mp`` (same value on every rank) only mp rank 0 needs ``pipe``'s text encoders.
    """
    split = groups.cfg == 2 and do_classifier_free_guidance
    prompts = dict(
        prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
        num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
        max_sequence_length=max_sequence_length,
    )  # fmt: skip
    if not (share_within_mp and groups.mp > 1):
        return _encode_half(pipe, groups, split, do_classifier_free_guidance, prompts)
    if groups.mp_rank == 0:
        embeds, pooled = _encode_half(pipe, groups, split, do_classifier_free_guidance, prompts)
    else:  # zeros of the leader's shapes: adding them in the all-reduce is exact
        config = pipe.transformer.config
        n = len([prompt] if isinstance(prompt, str) else prompt) * num_images_per_prompt
        n *= 2 if do_classifier_free_guidance and not split else 1
        tokens = pipe.tokenizer_max_length + max_sequence_length  # CLIP tokens, then T5 tokens
        dtype = pipe.transformer.dtype
        embeds = paddle.zeros([n, tokens, config.joint_attention_dim], dtype=dtype)
        pooled = paddle.zeros([n, config.pooled_projection_dim], dtype=dtype)
    embeds, pooled = groups.mp_group.all_reduce_sum([embeds, pooled])
    return embeds, pooled


def _encode_half(
    pipe: StableDiffusion3Pipeline, groups: DeviceGroups, split: bool, do_cfg: bool, prompts: dict
) -> tuple[paddle.Tensor, paddle.Tensor]:
    negative_only = split and groups.cfg_rank == 0
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        **prompts,
        do_classifier_free_guidance=do_cfg and not (split and groups.cfg_rank == 1),
        # Given embeddings skip encoding that side; an empty tensor marks "not on this rank".
        prompt_embeds=paddle.zeros([0]) if negative_only else None,
        pooled_prompt_embeds=paddle.zeros([0]) if negative_only else None,
    )
    dtype = pipe.transformer.dtype
    if negative_only:
        return neg.astype(dtype), neg_pooled.astype(dtype)
    if do_cfg and not split:
        return paddle.concat([neg, pos]).astype(dtype), paddle.concat([neg_pooled, pooled]).astype(dtype)
    return pos.astype(dtype), pooled.astype(dtype)


def denoise(
    pipe: StableDiffusion3Pipeline,
    groups: DeviceGroups,
    latents: paddle.Tensor,
    embeds: paddle.Tensor,
    pooled: paddle.Tensor,
    guidance_scale: float,
) -> paddle.Tensor:
    """Run ``pipe.scheduler``'s timesteps (already set) from ``latents``; float32 latents out.

    ``embeds``/``pooled`` come from :func:`encode_prompt_half` with the same guidance choice.
    """
    do_cfg = guidance_scale > 1
    split = groups.cfg == 2 and do_cfg
    dtype = pipe.transformer.dtype
    timesteps = pipe.scheduler.timesteps
    for i in range(int(timesteps.shape[0])):
        t = timesteps[i : i + 1]
        model_input = paddle.concat([latents, latents]) if do_cfg and not split else latents
        velocity = pipe.transformer(
            model_input.astype(dtype), embeds, pooled, paddle.expand(t, [model_input.shape[0]])
        ).astype("float32")
        if split:
            halves = groups.replica.all_gather(velocity)
            uncond, text = halves[groups.half_leader(0)], halves[groups.half_leader(1)]
        elif do_cfg:
            uncond, text = paddle.chunk(velocity, 2)
        if do_cfg:
            velocity = uncond + guidance_scale * (text - uncond)
        latents = pipe.scheduler.step(velocity, t, latents, step_index=i)
    return latents


def cfg_parallel_latents(
    pipe: StableDiffusion3Pipeline,
    groups: DeviceGroups,
    prompt: str | list[str],
    prompt_2: str | list[str] | None = None,
    prompt_3: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 28,
    guidance_scale: float = 7.0,
    negative_prompt: str | list[str] | None = None,
    negative_prompt_2: str | list[str] | None = None,
    negative_prompt_3: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    seed: int | Sequence[int] | None = None,
    clip_skip: int | None = None,
    max_sequence_length: int = 256,
    share_within_mp: bool = False,
) -> paddle.Tensor:
    """Final latents on every rank, equal to ``pipe(..., output_type="latent")`` with these arguments.

    ``pipe.transformer`` is this rank's (possibly tensor-parallel) transformer. Decoding is left
    to the caller (one rank is enough: ``pipe.decode_latents``).
    """
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(
        prompt, height, width, num_inference_steps, num_images_per_prompt, max_sequence_length,
        None, None, negative_prompt, None, None, "latent",
    )  # fmt: skip
    do_cfg = guidance_scale > 1
    embeds, pooled = encode_prompt_half(
        pipe, groups, prompt, prompt_2, prompt_3,
        negative_prompt, negative_prompt_2, negative_prompt_3,
        num_images_per_prompt, do_cfg, clip_skip, max_sequence_length, share_within_mp,
    )  # fmt: skip
    batch = len([prompt] if isinstance(prompt, str) else prompt) * num_images_per_prompt
    latents = pipe.prepare_latents(batch, height, width, seed=seed)
    mu = None
    if pipe.scheduler.config.get("use_dynamic_shifting"):
        tokens = (latents.shape[2] // pipe.patch_size) * (latents.shape[3] // pipe.patch_size)
        mu = pipe.scheduler.mu_for_image_seq_len(tokens)
    pipe.scheduler.set_timesteps(num_inference_steps, mu=mu)
    return denoise(pipe, groups, latents, embeds, pooled, guidance_scale)
