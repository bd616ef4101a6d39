"""FlowMatchEulerDiscreteScheduler reproduces diffusers 0.42.1 exactly.

References: tests/fixtures/references (kind "scheduler", made by diffusers from the same
configs) plus a few schedules diffusers printed for configurations the fixtures do not cover
(dynamic shifting, shift_terminal, karras/exponential, inverted, custom sigmas/timesteps).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from sd3_core.scheduler import DEFAULT_CONFIG, FlowMatchEulerDiscreteScheduler

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCES = FIXTURES / "references"


def _cases(op: str) -> list:
    cases = json.loads((REFERENCES / "cases.json").read_text(encoding="utf-8"))
    return [
        pytest.param(c, id=c["name"]) for c in cases if c["kind"] == "scheduler" and c["args"]["op"] == op
    ]


def _reference(case: dict) -> dict[str, np.ndarray]:
    with np.load(REFERENCES / case["file"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _scheduler(case: dict) -> FlowMatchEulerDiscreteScheduler:
    config = case["args"]["config"]
    if isinstance(config, dict):
        return FlowMatchEulerDiscreteScheduler(**config)
    return FlowMatchEulerDiscreteScheduler.from_pretrained(FIXTURES / case["fixture"], subfolder="scheduler")


def _t(a: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(a)


# ---- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("set_timesteps"))
def test_set_timesteps_is_bit_identical_to_diffusers(case):
    ref = _reference(case)
    s = _scheduler(case)
    s.set_timesteps(case["args"]["num_inference_steps"])
    assert s.sigmas.dtype == paddle.float32 and s.timesteps.dtype == paddle.float32
    np.testing.assert_array_equal(s.sigmas.numpy(), ref["out_sigmas"])
    np.testing.assert_array_equal(s.timesteps.numpy(), ref["out_timesteps"])


def test_shift3_four_steps_matches_reference_doc_including_double_shifted_sigma_min():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(4)
    np.testing.assert_allclose(s.sigmas.numpy(), [1, 0.857692, 0.602151, 0.008929, 0], atol=1e-6)
    np.testing.assert_array_equal(s.timesteps.numpy(), s.sigmas.numpy()[:-1] * np.float32(1000))


def test_shift_sigma_range_once_ends_at_the_training_sigma_min():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(4, shift_sigma_range_once=True)
    sig = s.sigmas.numpy()
    assert sig[0] == 1.0 and sig[-1] == 0.0
    np.testing.assert_allclose(sig[-2], s.sigma_min, rtol=1e-6)  # 3*0.001 / (1 + 2*0.001)
    assert sig[-2] < 0.003


# diffusers 0.42.1 output for configurations the committed references do not cover.
DIFFUSERS_SCHEDULES = [
    (
        "dynamic_exponential",
        {"use_dynamic_shifting": True},
        {"num_inference_steps": 4, "mu": 0.8},
        [1.0, 0.816774845123291, 0.5274352431297302, 0.002222816925495863, 0.0],
        [1000.0, 816.7748413085938, 527.4352416992188, 2.2228169441223145],
    ),
    (
        "dynamic_linear",
        {"use_dynamic_shifting": True, "time_shift_type": "linear"},
        {"num_inference_steps": 4, "mu": 1.2},
        [1.0, 0.706193745136261, 0.37570303678512573, 0.0011997601250186563, 0.0],
        [1000.0, 706.1937255859375, 375.7030334472656, 1.19976007938385],
    ),
    (
        "dynamic_shift_terminal",
        {"use_dynamic_shifting": True, "shift_terminal": 0.1},
        {"num_inference_steps": 4, "mu": 1.1},
        [1.0, 0.8713608384132385, 0.6398672461509705, 0.10000000149011612, 0.0],
        [1000.0, 871.36083984375, 639.8672485351562, 100.0],
    ),
    (
        "karras",
        {"shift": 3.0, "use_karras_sigmas": True},
        {"num_inference_steps": 4},
        [1.0, 0.2866939306259155, 0.062588632106781, 0.008928571827709675, 0.0],
        [1000.0, 286.6939392089844, 62.58863067626953, 8.928571701049805],
    ),
    (
        "exponential",
        {"shift": 3.0, "use_exponential_sigmas": True},
        {"num_inference_steps": 4},
        [1.0, 0.20745663344860077, 0.0430382564663887, 0.008928571827709675, 0.0],
        [1000.0, 207.45663452148438, 43.03825759887695, 8.928571701049805],
    ),
    (
        "invert",
        {"shift": 2.0, "invert_sigmas": True},
        {"num_inference_steps": 4},
        [0.0, 0.19952064752578735, 0.4985029697418213, 0.9960119724273682, 1.0],
        [0.0, 199.52064514160156, 498.5029602050781, 996.011962890625],
    ),
    (
        "custom_sigmas",
        {"shift": 3.0},
        {"sigmas": [1.0, 0.75, 0.5, 0.1]},
        [1.0, 0.8999999761581421, 0.75, 0.25, 0.0],
        [1000.0, 900.0, 750.0, 250.0],
    ),
    (
        "custom_timesteps",
        {"shift": 3.0},
        {"timesteps": [1000.0, 800.0, 500.0, 100.0]},
        [1.0, 0.9230769872665405, 0.75, 0.25, 0.0],
        [1000.0, 800.0, 500.0, 100.0],
    ),
]


@pytest.mark.parametrize(
    "name,config,kwargs,sigmas,timesteps", DIFFUSERS_SCHEDULES, ids=[c[0] for c in DIFFUSERS_SCHEDULES]
)
def test_other_schedules_match_diffusers(name, config, kwargs, sigmas, timesteps):
    s = FlowMatchEulerDiscreteScheduler(**config)
    s.set_timesteps(**kwargs)
    np.testing.assert_array_equal(s.sigmas.numpy(), np.array(sigmas, np.float32))
    np.testing.assert_array_equal(s.timesteps.numpy(), np.array(timesteps, np.float32))


def test_mu_for_image_seq_len_is_diffusers_calculate_shift():
    s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    assert s.mu_for_image_seq_len(256) == pytest.approx(0.5)
    assert s.mu_for_image_seq_len(4096) == pytest.approx(1.15)
    assert s.mu_for_image_seq_len(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


# ---- step and scale_noise ---------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("step"))
def test_step_matches_diffusers(case):
    ref = _reference(case)
    s = _scheduler(case)
    s.set_timesteps(case["args"]["num_inference_steps"])
    for k, i in enumerate(case["args"]["step_indices"]):
        v, x, want = _t(ref["in_model_output"][k]), _t(ref["in_sample"][k]), ref["out_prev_sample"][k]
        t = ref["in_timesteps"][k]
        for timestep, step_index in ((_t(t), None), (_t(t.reshape(1)), None), (float(t), None), (_t(t), i)):
            out = s.step(v, timestep, x, step_index=step_index).prev_sample
            np.testing.assert_array_equal(out.numpy(), want)


def test_step_is_pure_and_keeps_the_model_output_dtype():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(4)
    rng = np.random.default_rng(0)
    x, v = (
        _t(rng.standard_normal((1, 4, 2, 2), np.float32)),
        _t(rng.standard_normal((1, 4, 2, 2), np.float32)),
    )
    late = s.step(v, s.timesteps[2], x).prev_sample.numpy()
    s.step(v, s.timesteps[0], x)
    np.testing.assert_array_equal(s.step(v, s.timesteps[2], x).prev_sample.numpy(), late)
    sig = s.sigmas.numpy()
    np.testing.assert_allclose(late, x.numpy() + (sig[3] - sig[2]) * v.numpy(), rtol=1e-6)
    half = s.step(v.astype("float16"), s.timesteps[1], x.astype("float16")).prev_sample
    assert half.dtype == paddle.float16


def test_stochastic_step_renoises_the_predicted_x0():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    s.set_timesteps(4)
    x, v, n = (_t(np.full((1, 2, 2, 2), a, np.float32)) for a in (1.0, 0.5, -1.0))
    sig = s.sigmas.numpy()
    out = s.step(v, s.timesteps[1], x, noise=n).prev_sample.numpy()
    x0 = 1.0 - sig[1] * 0.5
    np.testing.assert_allclose(out, (1 - sig[2]) * x0 + sig[2] * -1.0, rtol=1e-6)


@pytest.mark.parametrize("case", _cases("scale_noise"))
def test_scale_noise_matches_diffusers(case):
    ref = _reference(case)
    s = _scheduler(case)
    s.set_timesteps(case["args"]["num_inference_steps"])
    out = s.scale_noise(_t(ref["in_sample"]), _t(ref["in_timesteps"]), _t(ref["in_noise"]))
    np.testing.assert_array_equal(out.numpy(), ref["out_sample"])


@pytest.mark.parametrize("case", _cases("training"))
def test_training_lookup_matches_train_dreambooth_sd3(case):
    ref = _reference(case)
    s = _scheduler(case)  # fresh: the training schedule, no set_timesteps
    np.testing.assert_array_equal(s.timesteps.numpy(), ref["out_init_timesteps"])
    np.testing.assert_array_equal(s.sigmas.numpy(), ref["out_init_sigmas"])
    indices = (ref["in_u"].astype(np.float32) * np.float32(1000)).astype(np.int64)
    np.testing.assert_array_equal(indices, ref["out_indices"])
    timesteps = paddle.gather(s.timesteps, _t(indices))
    np.testing.assert_array_equal(timesteps.numpy(), ref["out_timesteps"])
    sigmas = s.sigmas_for_timesteps(timesteps, n_dim=4)
    assert sigmas.shape == [16, 1, 1, 1]
    np.testing.assert_array_equal(sigmas.numpy().reshape(-1), ref["out_sigmas"])
    x0, noise = _t(ref["in_x0"]), _t(ref["in_noise"])
    np.testing.assert_array_equal(((1.0 - sigmas) * x0 + sigmas * noise).numpy(), ref["out_noisy"])
    np.testing.assert_array_equal(s.scale_noise(x0, timesteps, noise).numpy(), ref["out_noisy"])


# ---- config and files --------------------------------------------------------------------------


def test_config_round_trip_through_diffusers_format(tmp_path):
    s = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.4)
    s.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert set(saved) - {"_class_name", "_diffusers_version"} == set(DEFAULT_CONFIG)
    loaded = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert loaded.config == s.config and loaded.config.base_shift == 0.4


def test_fixture_config_loads_with_subfolder():
    s = FlowMatchEulerDiscreteScheduler.from_pretrained(FIXTURES / "sd3-tiny", subfolder="scheduler")
    assert s.config.shift == 3.0 and s.config.num_train_timesteps == 1000 and len(s) == 1000


def test_from_config_ignores_private_keys_and_warns_about_unknown_ones():
    with pytest.warns(UserWarning, match="made_up_key"):
        s = FlowMatchEulerDiscreteScheduler.from_config(
            {"_class_name": "X", "_diffusers_version": "0.1", "shift": 2.0, "made_up_key": 1}
        )
    assert s.config.shift == 2.0 and "made_up_key" not in s.config and "_class_name" not in s.config


@pytest.mark.parametrize(
    "config,match",
    [
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"shift": 0.0}, "shift"),
        ({"shift": -1.0}, "shift"),
        ({"shift": "3"}, "shift"),
        ({"time_shift_type": "cubic"}, "time_shift_type"),
        ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one of"),
        ({"shift_terminal": 1.0}, "shift_terminal"),
    ],
)
def test_bad_configs_are_rejected(config, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchEulerDiscreteScheduler(**config)


def test_from_pretrained_names_the_missing_or_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json"):
        FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_num_inference_steps_must_be_a_positive_integer(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowMatchEulerDiscreteScheduler().set_timesteps(n)


def test_set_timesteps_argument_errors():
    with pytest.raises(ValueError, match="mu"):
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(ValueError, match="sigmas has 2 values"):
        FlowMatchEulerDiscreteScheduler().set_timesteps(4, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="give num_inference_steps"):
        FlowMatchEulerDiscreteScheduler().set_timesteps()


def test_step_errors_name_the_problem():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(4)
    x = paddle.zeros([1, 4, 2, 2])
    with pytest.raises(ValueError, match="not in the scheduler's current timesteps"):
        s.step(x, 123.0, x)
    with pytest.raises(ValueError, match="integer timestep"):
        s.step(x, 1, x)
    with pytest.raises(ValueError, match="step_index=4"):
        s.step(x, s.timesteps[0], x, step_index=4)
    with pytest.raises(ValueError, match="shape"):
        s.step(paddle.zeros([1, 4, 2, 3]), s.timesteps[0], x)
    with pytest.raises(ValueError, match="sigmas_for_timesteps"):
        FlowMatchEulerDiscreteScheduler().sigmas_for_timesteps(paddle.to_tensor([0.5]))
