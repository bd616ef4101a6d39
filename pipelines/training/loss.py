"""The training loss of the samples at given positions of the sample stream, and the fixed
evaluation loss that measures learning.

For the sample at position p (and each half: instance, then class under prior preservation)
every draw is keyed by (seed, purpose, p, half): the entry (``SampleOrder``), the timestep
density, the noise, the VAE posterior noise and the caption dropout. So a sample sees the same
inputs whatever the batch split and whether the run was resumed.
"""

from __future__ import annotations

import numpy as np
import paddle

from pipelines.training.config import TrainConfig
from pipelines.training.data import STREAM_CAPTION, STREAM_NOISE, STREAM_VAE, Entry, TrainingData, rng_for
from pipelines.training.encodings import SampleEncoder
from pipelines.training.model import TrainModels
from sd3_core import training


def batch_loss(
    positions: list[int],
    config: TrainConfig,
    seed: int,
    data: TrainingData,
    models: TrainModels,
    encoder: SampleEncoder,
) -> training.FlowMatchingLoss:
    """The flow-matching loss of the samples at ``positions`` (instance half, then class half)."""
    c = config
    density, weighting = training.split_scheme(c.weighting_scheme)
    latent_hw = c.resolution // 8
    channels = models.pipe.vae.config.latent_channels
    picked, draws, noises, vae_noises = [], [], [], []
    halves = [("i", data.instances)] + ([("c", data.classes)] if c.with_prior_preservation else [])
    for half, (kind, entries) in enumerate(halves):
        for pos in positions:
            index = data.order.entry_at(pos) % len(entries)
            picked.append((kind, index, entries[index]))
            rng = rng_for(seed, STREAM_NOISE, pos, half)
            draws.append(training.sample_density(density, 1, rng, c.logit_mean, c.logit_std, c.mode_scale)[0])
            noises.append(rng.standard_normal((channels, latent_hw, latent_hw), dtype=np.float32))
            vae_noises.append(
                rng_for(seed, STREAM_VAE, pos, half).standard_normal(
                    (channels, latent_hw, latent_hw), dtype=np.float32
                )
            )
    x0 = encoder.latents(picked, np.stack(vae_noises))
    embeds, pooled = encoder.text(sample_prompts(picked, positions, len(halves), seed, c.caption_dropout))
    noise = paddle.to_tensor(np.stack(noises))
    _, timesteps = training.timesteps_from_density(np.asarray(draws, np.float32), models.noise_scheduler)
    sigmas = models.noise_scheduler.sigmas_for_timesteps(timesteps, n_dim=4)
    noisy = training.add_noise(x0, noise, sigmas)
    with models.autocast():
        pred = models.transformer(noisy, embeds, pooled, timesteps, return_dict=False)[0]
    return training.flow_matching_loss(
        pred, x0, noise, noisy, sigmas, weighting, c.precondition_outputs,
        c.with_prior_preservation, c.prior_loss_weight,
    )  # fmt: skip


def sample_prompts(
    picked: list[tuple[str, int, Entry]], positions: list[int], halves: int, seed: int, caption_dropout: float
) -> list[str]:
    """The samples' prompts, each replaced by "" with probability ``caption_dropout`` (keyed by
    position, so resumed and re-batched runs drop the same ones): the unconditional
    prediction that classifier-free guidance needs."""
    p = caption_dropout
    keys = [(pos, half) for half in range(halves) for pos in positions]
    return [
        "" if p > 0 and rng_for(seed, STREAM_CAPTION, pos, half).random() < p else e.prompt
        for (pos, half), (_, _, e) in zip(keys, picked, strict=True)
    ]


def evaluation_loss(
    entries: list[Entry],
    models: TrainModels,
    encoder: SampleEncoder,
    sigmas=(0.25, 0.5, 0.75),
    seed: int = 1234,
) -> float:
    """Loss on ``entries`` at fixed sigmas with fixed noise (posterior mean, no weighting): the
    same inputs before and after training, so a drop is learning."""
    vae = models.pipe.vae
    rng = np.random.default_rng(seed)
    losses = []
    with paddle.no_grad():
        pixels = paddle.to_tensor(np.stack([e.pixels for e in entries]))
        mean = vae.encode(pixels.astype(vae.dtype)).latent_dist.mean.astype("float32")
        x0 = (mean - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor
        embeds, pooled = encoder.text([e.prompt for e in entries])
        for s in sigmas:
            noise = paddle.to_tensor(rng.standard_normal(x0.shape, dtype=np.float32))
            sig = paddle.full([x0.shape[0], 1, 1, 1], s, "float32")
            noisy = training.add_noise(x0, noise, sig)
            t = paddle.full([x0.shape[0]], s * 1000.0, "float32")
            pred = models.transformer(noisy, embeds, pooled, t, return_dict=False)[0]
            losses.append(float(training.flow_matching_loss(pred, x0, noise, noisy, sig).loss))
    return float(np.mean(losses))
