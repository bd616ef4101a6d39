"""Flow-matching training math against diffusers' training_utils and the SD3 training scripts.

References: tests/fixtures/training (tools/reference/training_cases.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from sd3_core import training
from sd3_core.scheduler import FlowMatchEulerDiscreteScheduler
from sd3_core.vae import AutoencoderKL

FIXTURES = Path(__file__).parent / "fixtures"
TRAINING = FIXTURES / "training"
CASES = json.loads((TRAINING / "cases.json").read_text())["cases"]


def cases(kind: str) -> list[dict]:
    found = [c for c in CASES if c["kind"] == kind]
    assert found
    return found


def load(case: dict) -> dict[str, np.ndarray]:
    with np.load(TRAINING / case["file"]) as data:
        return {k: data[k] for k in data.files}


def fresh_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_pretrained(FIXTURES / "sd3-tiny", subfolder="scheduler")


def t(a: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(a)


# ---- timestep densities and the sigma lookup ---------------------------------------------------


@pytest.mark.parametrize("case", cases("density"), ids=lambda c: c["name"])
def test_density_and_timestep_lookup_match_diffusers(case):
    args, ref = case["args"], load(case)
    kw = {k: args[k] for k in ("logit_mean", "logit_std", "mode_scale") if k in args}
    u = training.density_from_draws(args["density"], ref["in_draws"], **kw)
    np.testing.assert_allclose(u, ref["out_u"], rtol=0, atol=1e-6)
    scheduler = fresh_scheduler()
    indices, timesteps = training.timesteps_from_density(ref["out_u"], scheduler)
    np.testing.assert_array_equal(indices, ref["out_indices"])
    np.testing.assert_array_equal(timesteps.numpy(), ref["out_timesteps"])
    sigmas = scheduler.sigmas_for_timesteps(timesteps, n_dim=1)
    np.testing.assert_array_equal(sigmas.numpy(), ref["out_sigmas"])


def test_sample_density_is_seeded_and_in_range():
    for density in training.DENSITIES:
        a = training.sample_density(density, 256, np.random.default_rng(3))
        b = training.sample_density(density, 256, np.random.default_rng(3))
        np.testing.assert_array_equal(a, b)
        assert a.shape == (256,) and a.min() >= 0.0 and a.max() <= 1.0
    # logit-normal and the mode density (scale 1.29) both put more mass mid-path than uniform
    mid = {d: np.mean(np.abs(training.sample_density(d, 4000, np.random.default_rng(0)) - 0.5) < 0.25)
           for d in training.DENSITIES}  # fmt: skip
    assert min(mid["logit_normal"], mid["mode"]) > mid["uniform"] + 0.15


def test_mode_density_draw_of_zero_stays_in_the_schedule():
    u = training.density_from_draws("mode", np.array([0.0], np.float32))
    assert u[0] == 1.0  # the reference scripts would index timesteps[1000] here
    indices, _ = training.timesteps_from_density(u, fresh_scheduler())
    assert indices.tolist() == [999]


def test_timestep_lookup_needs_the_training_schedule():
    scheduler = fresh_scheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="fresh scheduler"):
        training.timesteps_from_density(np.array([0.5], np.float32), scheduler)


def test_weighting_scheme_flag_splits_into_density_and_weighting():
    assert training.split_scheme("logit_normal") == ("logit_normal", "none")
    assert training.split_scheme("sigma_sqrt") == ("uniform", "sigma_sqrt")
    assert training.split_scheme("cosmap") == ("uniform", "cosmap")
    with pytest.raises(ValueError, match="weighting_scheme='bogus'"):
        training.split_scheme("bogus")


# ---- noising, targets, weighting, loss ---------------------------------------------------------


@pytest.mark.parametrize("case", cases("loss"), ids=lambda c: c["name"])
def test_noising_target_and_weighting_match_the_script(case):
    ref = load(case)
    x0, noise, sigmas = t(ref["in_x0"]), t(ref["in_noise"]), t(ref["in_sigmas"])
    np.testing.assert_allclose(training.add_noise(x0, noise, sigmas).numpy(), ref["out_noisy"], atol=1e-6)
    np.testing.assert_array_equal(training.flow_matching_target(x0, noise).numpy(), ref["out_target"])
    w = training.loss_weighting(case["args"]["weighting"], sigmas.reshape([-1, 1, 1, 1]))
    np.testing.assert_allclose(w.numpy(), ref["out_weighting"], rtol=1e-6)


@pytest.mark.parametrize("case", cases("loss"), ids=lambda c: c["name"])
@pytest.mark.parametrize("precondition", [False, True], ids=["raw", "pre"])
@pytest.mark.parametrize("prior", [False, True], ids=["plain", "prior"])
def test_loss_matches_the_script(case, precondition, prior):
    ref, args = load(case), case["args"]
    x0, noise, sigmas = t(ref["in_x0"]), t(ref["in_noise"]), t(ref["in_sigmas"])
    noisy = training.add_noise(x0, noise, sigmas)
    out = training.flow_matching_loss(
        t(ref["in_model_pred"]), x0, noise, noisy, sigmas,
        weighting=args["weighting"], precondition=precondition,
        prior_preservation=prior, prior_loss_weight=args["prior_loss_weight"],
    )  # fmt: skip
    tag = f"{'pre' if precondition else 'raw'}_{'prior' if prior else 'plain'}"
    np.testing.assert_allclose(out.loss.numpy(), ref[f"out_loss_{tag}"], rtol=1e-5)
    np.testing.assert_allclose(out.instance.numpy(), ref[f"out_instance_{tag}"], rtol=1e-5)
    if prior:
        np.testing.assert_allclose(out.prior.numpy(), ref[f"out_prior_{tag}"], rtol=1e-5)
    else:
        assert out.prior is None


def test_prior_preservation_splits_the_weighting_too():
    # Batch [instance, class] with very different sigmas: each half must be weighted by its own
    # sigma. The full fine-tune reference script broadcasts the whole batch's weighting instead.
    rng = np.random.default_rng(0)
    x0, noise, pred = (t(rng.standard_normal((2, 4, 2, 2)).astype(np.float32)) for _ in range(3))
    sigmas = t(np.array([0.1, 0.9], np.float32))
    noisy = training.add_noise(x0, noise, sigmas)
    out = training.flow_matching_loss(pred, x0, noise, noisy, sigmas, "sigma_sqrt", prior_preservation=True)
    err = (pred - (noise - x0)).numpy() ** 2
    np.testing.assert_allclose(out.instance.numpy(), err[0].mean() / 0.1**2, rtol=1e-5)
    np.testing.assert_allclose(out.prior.numpy(), err[1].mean() / 0.9**2, rtol=1e-5)
    unsplit_prior = np.mean([err[1].mean() / s**2 for s in (0.1, 0.9)])
    assert abs(float(out.prior) - unsplit_prior) > 0.1 * unsplit_prior


def test_prior_loss_weight_and_halves():
    rng = np.random.default_rng(1)
    x0, noise, pred = (t(rng.standard_normal((4, 4, 2, 2)).astype(np.float32)) for _ in range(3))
    sigmas = t(np.array([0.2, 0.4, 0.6, 0.8], np.float32))
    noisy = training.add_noise(x0, noise, sigmas)
    out = training.flow_matching_loss(
        pred, x0, noise, noisy, sigmas, prior_preservation=True, prior_loss_weight=0.3
    )
    np.testing.assert_allclose(float(out.loss), float(out.instance) + 0.3 * float(out.prior), rtol=1e-6)
    with pytest.raises(ValueError, match="odd batch of 3"):
        training.flow_matching_loss(
            pred[:3], x0[:3], noise[:3], noisy[:3], sigmas[:3], prior_preservation=True
        )


def test_unknown_names_are_rejected():
    s = t(np.array([0.5], np.float32))
    with pytest.raises(ValueError, match="loss weighting 'sigma'"):
        training.loss_weighting("sigma", s)
    with pytest.raises(ValueError, match="timestep density 'normal'"):
        training.sample_density("normal", 2, np.random.default_rng(0))


def test_loss_is_differentiable_in_the_prediction():
    rng = np.random.default_rng(2)
    x0, noise = (t(rng.standard_normal((2, 4, 2, 2)).astype(np.float32)) for _ in range(2))
    pred = t(rng.standard_normal((2, 4, 2, 2)).astype(np.float32))
    pred.stop_gradient = False
    sigmas = t(np.array([0.3, 0.7], np.float32))
    out = training.flow_matching_loss(
        pred, x0, noise, training.add_noise(x0, noise, sigmas), sigmas, "cosmap"
    )
    out.loss.backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0


# ---- latents -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("latents"), ids=lambda c: c["name"])
def test_latents_subtract_the_shift_then_scale(case):
    ref = load(case)
    vae = AutoencoderKL.from_pretrained(FIXTURES / case["fixture"], subfolder="vae")
    assert vae.config.shift_factor == case["args"]["shift_factor"]
    latents = training.encode_latents(vae, t(ref["in_image"]), noise=ref["in_eps"])
    np.testing.assert_allclose(latents.numpy(), ref["out_latents"], atol=1e-4)
