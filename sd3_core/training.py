"""Flow-matching training math for SD3 (diffusers' train_dreambooth_(lora_)sd3.py), as pure functions.

One training step, in the order the reference scripts take it:

    latents = encode_latents(vae, pixels)                       # (sample - shift) * scaling
    u = sample_density(scheme, batch, rng)                      # where on the path to train
    timesteps = timesteps_from_density(u, scheduler)            # fresh training schedule
    sigmas = scheduler.sigmas_for_timesteps(timesteps)
    noisy = add_noise(latents, noise, sigmas)                   # (1 - s) x0 + s noise
    pred = transformer(noisy, ..., timesteps).sample
    loss = flow_matching_loss(pred, latents, noise, noisy, sigmas, ...)

Two reference bugs are avoided (sd3-reference.md section 7): latents get the shift factor, and
under prior preservation the loss weighting is split with the prediction and target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import paddle

from sd3_core.scheduler import FlowMatchEulerDiscreteScheduler

__all__ = [
    "DENSITIES",
    "WEIGHTINGS",
    "FlowMatchingLoss",
    "add_noise",
    "density_from_draws",
    "encode_latents",
    "flow_matching_loss",
    "flow_matching_target",
    "loss_weighting",
    "precondition_outputs",
    "sample_density",
    "split_scheme",
    "timesteps_from_density",
]

DENSITIES = ("uniform", "logit_normal", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# The reference scripts' single --weighting_scheme flag picks both (the other one stays plain).
_SCHEMES = {
    "logit_normal": ("logit_normal", "none"),
    "mode": ("mode", "none"),
    "sigma_sqrt": ("uniform", "sigma_sqrt"),
    "cosmap": ("uniform", "cosmap"),
    "none": ("uniform", "none"),
}


def split_scheme(weighting_scheme: str) -> tuple[str, str]:
    """``--weighting_scheme`` of the reference scripts -> ``(density, weighting)``."""
    try:
        return _SCHEMES[weighting_scheme]
    except KeyError:
        raise ValueError(f"weighting_scheme={weighting_scheme!r} is not one of {sorted(_SCHEMES)}") from None


# ---- timestep sampling -------------------------------------------------------------------------


def density_from_draws(
    density: str,
    draws: np.ndarray,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> np.ndarray:
    """``u`` in [0, 1] from raw draws: standard normals for ``logit_normal``, uniforms otherwise.

    diffusers' compute_density_for_timestep_sampling with the random draws made explicit:
    logit_normal ``sigmoid(mean + std * n)``; mode ``1 - u - s (cos^2(pi u / 2) - 1 + u)``.
    float32 throughout, as in torch.
    """
    d = np.asarray(draws, dtype=np.float32)
    if density == "logit_normal":
        z = np.float32(logit_mean) + np.float32(logit_std) * d
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    if density == "mode":
        cos = np.cos(np.float32(math.pi) * d / np.float32(2)) ** 2
        return (1 - d - np.float32(mode_scale) * (cos - 1 + d)).astype(np.float32)
    if density == "uniform":
        return d
    raise ValueError(f"timestep density {density!r} is not one of {DENSITIES}")


def sample_density(
    density: str,
    batch_size: int,
    rng: np.random.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> np.ndarray:
    """Draw ``batch_size`` values of ``u`` (NumPy generator, so a seed reproduces on any device)."""
    if density not in DENSITIES:
        raise ValueError(f"timestep density {density!r} is not one of {DENSITIES}")
    if density == "logit_normal":
        draws = rng.standard_normal(batch_size, dtype=np.float32)
    else:
        draws = rng.random(batch_size, dtype=np.float32)
    return density_from_draws(density, draws, logit_mean, logit_std, mode_scale)


def timesteps_from_density(
    u: np.ndarray, scheduler: FlowMatchEulerDiscreteScheduler
) -> tuple[np.ndarray, paddle.Tensor]:
    """``(indices, timesteps)``: ``indices = int(u * num_train_timesteps)``, timesteps from the
    scheduler's training schedule (never set_timesteps'd).

    The index is clipped to the schedule: the ``mode`` density maps a draw of exactly 0 to
    u = 1, which the reference scripts would index out of range with.
    """
    if scheduler.num_inference_steps is not None:
        raise ValueError(
            "timesteps_from_density needs a fresh scheduler (training schedule); this one had "
            "set_timesteps called - build a new one from the same config"
        )
    n = scheduler.config.num_train_timesteps
    u32 = np.asarray(u, dtype=np.float32)
    indices = np.clip((u32 * np.float32(n)).astype(np.int64), 0, n - 1)  # .long() truncates
    return indices, paddle.to_tensor(scheduler._timesteps_np[indices])


# ---- noising, targets, weighting ---------------------------------------------------------------


def _expand(sigmas: paddle.Tensor, like: paddle.Tensor) -> paddle.Tensor:
    if sigmas.ndim == like.ndim:
        return sigmas
    return sigmas.reshape([-1] + [1] * (like.ndim - 1))


def add_noise(x0: paddle.Tensor, noise: paddle.Tensor, sigmas: paddle.Tensor) -> paddle.Tensor:
    """``x_t = (1 - sigma) x0 + sigma noise`` (sigmas ``[B]`` or ``[B, 1, 1, 1]``)."""
    s = _expand(sigmas, x0).astype(x0.dtype)
    return (1.0 - s) * x0 + s * noise.astype(x0.dtype)


def flow_matching_target(x0: paddle.Tensor, noise: paddle.Tensor) -> paddle.Tensor:
    """The velocity target ``noise - x0``."""
    return noise - x0


def precondition_outputs(
    model_pred: paddle.Tensor, noisy: paddle.Tensor, sigmas: paddle.Tensor
) -> paddle.Tensor:
    """EDM-style preconditioning (the scripts' ``--precondition_outputs``): ``pred * (-sigma) + x_t``,
    an estimate of ``x0`` trained against the clean latents."""
    return model_pred * (-_expand(sigmas, model_pred)) + noisy


def loss_weighting(weighting: str, sigmas: paddle.Tensor) -> paddle.Tensor:
    """compute_loss_weighting_for_sd3: sigma_sqrt ``sigma^-2``; cosmap ``2 / (pi (1 - 2s + 2s^2))``;
    none ``1``. Same shape as ``sigmas``, float32."""
    s = sigmas.astype("float32")
    if weighting == "sigma_sqrt":
        return s**-2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    if weighting == "none":
        return paddle.ones_like(s)
    raise ValueError(f"loss weighting {weighting!r} is not one of {WEIGHTINGS}")


def weighted_mse(pred: paddle.Tensor, target: paddle.Tensor, weighting: paddle.Tensor) -> paddle.Tensor:
    """Mean over each sample of ``w (pred - target)^2`` (float32), then mean over the batch."""
    diff = pred.astype("float32") - target.astype("float32")
    per_element = _expand(weighting.astype("float32"), diff) * diff**2
    return per_element.reshape([diff.shape[0], -1]).mean(axis=1).mean()


@dataclass
class FlowMatchingLoss:
    """``loss`` drives the optimizer; ``instance`` and ``prior`` (None without prior preservation)
    are its parts, for logging."""

    loss: paddle.Tensor
    instance: paddle.Tensor
    prior: paddle.Tensor | None


def flow_matching_loss(
    model_pred: paddle.Tensor,
    x0: paddle.Tensor,
    noise: paddle.Tensor,
    noisy: paddle.Tensor,
    sigmas: paddle.Tensor,
    weighting: str = "none",
    precondition: bool = False,
    prior_preservation: bool = False,
    prior_loss_weight: float = 1.0,
) -> FlowMatchingLoss:
    """The scripts' loss. With ``prior_preservation`` the batch is ``[instance, class]`` halves and
    prediction, target **and** weighting are split (the full fine-tune script forgets the last)."""
    if precondition:
        model_pred = precondition_outputs(model_pred, noisy, sigmas)
        target = x0
    else:
        target = flow_matching_target(x0, noise)
    w = loss_weighting(weighting, _expand(sigmas, model_pred))
    if not prior_preservation:
        loss = weighted_mse(model_pred, target, w)
        return FlowMatchingLoss(loss, loss, None)
    b = model_pred.shape[0]
    if b % 2:
        raise ValueError(
            f"prior preservation needs a batch of instance + class halves; got an odd batch of {b}"
        )
    pred_i, pred_p = paddle.chunk(model_pred, 2)
    target_i, target_p = paddle.chunk(target, 2)
    w_i, w_p = paddle.chunk(w, 2)
    instance = weighted_mse(pred_i, target_i, w_i)
    prior = weighted_mse(pred_p, target_p, w_p)
    return FlowMatchingLoss(instance + prior_loss_weight * prior, instance, prior)


# ---- latents -----------------------------------------------------------------------------------


def encode_latents(
    vae, pixels: paddle.Tensor, noise: paddle.Tensor | np.ndarray | None = None, generator=None
) -> paddle.Tensor:
    """``(vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor``; pixels in [-1, 1], NCHW.

    ``noise``/``generator`` go to the posterior's sample (see ``DiagonalGaussian.sample``).
    """
    config = vae.config
    latents = vae.encode(pixels.astype(vae.dtype)).latent_dist.sample(noise=noise, generator=generator)
    shift = config.get("shift_factor") or 0.0
    return (latents - shift) * config.scaling_factor
