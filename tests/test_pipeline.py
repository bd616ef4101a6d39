"""StableDiffusion3Pipeline against diffusers' own outputs on the same weights and latents."""

from __future__ import annotations

import functools
import logging

import numpy as np
import paddle
import pytest

from pipelines import StableDiffusion3Pipeline
from sd3_core.scheduler import FlowMatchEulerDiscreteScheduler
from tests.reference_cases import arrays, cases, fixture_path

MODULE_TOL = 1e-4
IMAGE_TOL = 2e-3


@functools.cache
def pipeline(fixture: str, drop_t5: bool = False) -> StableDiffusion3Pipeline:
    extra = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path(fixture), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_PROMPT_KEYS = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3")


@pytest.mark.parametrize("case", cases("encode_prompt"), ids=lambda c: c["name"])
def test_encode_prompt_matches_diffusers(case):
    args, ref = case["args"], arrays(case)
    pipe = pipeline(case["fixture"], args["drop_t5"])
    out = pipe.encode_prompt(
        **{k: args[k] for k in _PROMPT_KEYS if k in args and k != "prompt"},
        prompt=args["prompt"],
        num_images_per_prompt=args["num_images_per_prompt"],
        do_classifier_free_guidance=args["do_classifier_free_guidance"],
        clip_skip=args["clip_skip"],
        max_sequence_length=args["max_sequence_length"],
    )
    names = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    for name, value in zip(names, out, strict=True):
        if f"out_{name}" not in ref:
            assert value is None, name
            continue
        expected = ref[f"out_{name}"]
        assert list(value.shape) == list(expected.shape), name
        np.testing.assert_allclose(value.numpy(), expected, rtol=0, atol=MODULE_TOL, err_msg=name)


@pytest.mark.parametrize("case", cases("pipeline"), ids=lambda c: c["name"])
def test_pipeline_matches_diffusers(case):
    args, ref = dict(case["args"]), arrays(case)
    pipe = pipeline(case["fixture"], args.pop("drop_t5"))
    args.pop("note", None)
    images = pipe(**args, latents=ref["in_latents"], output_type="np").images
    np.testing.assert_allclose(images, ref["out_images"], rtol=0, atol=IMAGE_TOL)
    latents = pipe(**args, latents=paddle.to_tensor(ref["in_latents"]), output_type="latent").images
    np.testing.assert_allclose(latents.numpy(), ref["out_latents"], rtol=0, atol=IMAGE_TOL)


@pytest.mark.parametrize(
    "method,vae_method,attribute,value",
    [
        ("enable_vae_tiling", "enable_tiling", "use_tiling", True),
        ("disable_vae_tiling", "disable_tiling", "use_tiling", False),
        ("enable_vae_slicing", "enable_slicing", "use_slicing", True),
        ("disable_vae_slicing", "disable_slicing", "use_slicing", False),
    ],
)
def test_pipeline_vae_switches_delegate_to_the_vae_and_say_the_current_spelling(
    method, vae_method, attribute, value
):
    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))  # own copy: switches are state
    setattr(pipe.vae, attribute, not value)
    with pytest.warns(FutureWarning, match=rf"`{method}\(\)` on a `StableDiffusion3Pipeline` is deprecated.*"
                      rf"Please use `pipe\.vae\.{vae_method}\(\)`"):  # fmt: skip
        getattr(pipe, method)()
    assert getattr(pipe.vae, attribute) is value


def test_tiled_vae_decodes_the_pipelines_images():
    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt="a red fox", height=96, width=96, num_inference_steps=2, guidance_scale=1.0, seed=[3]
    )
    latents = pipe(**kwargs, output_type="latent").images
    untiled = pipe(**kwargs, output_type="np").images
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size = 32  # 96 px: 4 x 4 tiles
    tiled = pipe(**kwargs, output_type="np").images
    z = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    expected = np.clip(pipe.vae.decode(z).sample.numpy().transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(tiled, expected, rtol=0, atol=1e-6)
    assert np.abs(tiled - untiled).max() > 1e-2  # the tiled path was taken


def test_long_prompt_warns_with_removed_text(caplog):
    pipe = pipeline("sd3-tiny")
    long_prompt = " ".join(["lighthouse"] * 100) + " zebra"
    with caplog.at_level(logging.WARNING):
        pipe.encode_prompt(long_prompt, do_classifier_free_guidance=False, max_sequence_length=32)
    messages = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert any("CLIP" in m and "zebra" in m for m in messages), messages


def test_pil_output_and_seed_reproducibility():
    pipe = pipeline("sd3-tiny")
    kwargs = dict(prompt="a red fox", height=64, width=96, num_inference_steps=2, guidance_scale=3.0)
    first = pipe(**kwargs, seed=[7]).images
    again = pipe(**kwargs, seed=[7]).images
    other = pipe(**kwargs, seed=[8]).images
    assert first[0].size == (96, 64) and first[0].mode == "RGB"
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))


def test_pd_output_is_the_np_images_as_an_nchw_paddle_tensor():
    """PPDiffusers' ``output_type="pd"``: float32 ``[B, 3, H, W]`` in [0, 1]."""
    pipe = pipeline("sd3-tiny")
    kwargs = dict(prompt=["a red fox", "a cat"], height=64, width=96, num_inference_steps=2, seed=[7, 8])
    array = pipe(**kwargs, output_type="np").images
    tensor = pipe(**kwargs, output_type="pd").images
    assert (
        isinstance(tensor, paddle.Tensor)
        and tensor.dtype == paddle.float32
        and tensor.shape == [2, 3, 64, 96]
    )
    np.testing.assert_array_equal(tensor.numpy().transpose(0, 2, 3, 1), array)


def test_per_image_seeds_do_not_depend_on_batch_composition():
    pipe = pipeline("sd3-tiny")
    kwargs = dict(height=64, width=64, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    alone = pipe(prompt="a cat", seed=[11], **kwargs).images
    batched = pipe(prompt=["a dog", "a cat"], seed=[5, 11], **kwargs).images
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-5)


def test_callback_sees_every_step_and_its_latents_replace_the_pipelines():
    pipe = pipeline("sd3-tiny")
    kwargs = dict(prompt=["a cat", "a dog"], height=64, width=64, num_inference_steps=3, guidance_scale=2.0,
                  seed=[1, 2], output_type="latent")  # fmt: skip
    seen = []

    def record(p, i, t, tensors):
        seen.append((p, i, float(t[0]), {k: list(v.shape) for k, v in tensors.items()}))
        return {}

    plain = pipe(**kwargs).images
    recorded = pipe(
        **kwargs, callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "pooled_prompt_embeds"],
    ).images  # fmt: skip
    np.testing.assert_array_equal(recorded.numpy(), plain.numpy())  # a callback returning {} changes nothing
    assert [i for _, i, _, _ in seen] == [0, 1, 2] and all(p is pipe for p, *_ in seen)
    assert [t for _, _, t, _ in seen] == pipe.scheduler.timesteps.numpy().tolist()
    assert seen[0][3] == {
        "latents": [2, 16, 8, 8],
        "prompt_embeds": [4, 333, 128],
        "pooled_prompt_embeds": [4, 80],
    }

    def zero_at_last_step(p, i, t, tensors):
        return {"latents": tensors["latents"] * 0} if i == 2 else {}

    assert float(pipe(**kwargs, callback_on_step_end=zero_at_last_step).images.abs().max()) == 0.0


STATE_CALL = dict(prompt="a cat", negative_prompt="fog", height=64, width=64, num_inference_steps=4,
                  guidance_scale=3.0, seed=[3], output_type="latent")  # fmt: skip


def manual_latents(pipe: StableDiffusion3Pipeline, plan) -> np.ndarray:
    """STATE_CALL's latents by a plain loop over the transformer and the Euler step
    ``x + (sigma_next - sigma) * v``; ``plan(i, embeds, pooled)`` gives each step's guidance scale
    and the ``[negative; positive]`` embeddings it runs on."""
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        "a cat", negative_prompt="fog", do_classifier_free_guidance=True, max_sequence_length=256
    )
    embeds, pooled = paddle.concat([neg, pos]), paddle.concat([neg_pooled, pooled])
    x = pipe.prepare_latents(1, 64, 64, seed=[3])
    pipe.scheduler.set_timesteps(4)
    sigmas, timesteps = pipe.scheduler.sigmas.numpy(), pipe.scheduler.timesteps
    for i in range(4):
        guidance, embeds, pooled = plan(i, embeds, pooled)
        t = timesteps[i : i + 1]
        if guidance > 1:
            v = pipe.transformer(paddle.concat([x, x]), embeds, pooled, paddle.concat([t, t])).sample
            uncond, text = paddle.chunk(v, 2)
            v = uncond + guidance * (text - uncond)
        else:
            v = pipe.transformer(x, embeds[1:], pooled[1:], t).sample
        x = x + float(sigmas[i + 1] - sigmas[i]) * v
    return x.numpy()


def test_call_state_properties_and_interrupt_as_in_diffusers():
    pipe = pipeline("sd3-tiny")
    seen, kept = [], {}

    def stop_after_step_1(p, i, t, tensors):
        seen.append((p.guidance_scale, p.do_classifier_free_guidance, p.clip_skip, p.num_timesteps,
                     p.joint_attention_kwargs, p.interrupt))  # fmt: skip
        kept[i] = tensors["latents"]
        if i == 1:
            p._interrupt = True
        return tensors

    out = pipe(**STATE_CALL, clip_skip=1, joint_attention_kwargs={"scale": 1.0},
               callback_on_step_end=stop_after_step_1).images  # fmt: skip
    assert seen == [(3.0, True, 1, 4, {"scale": 1.0}, False)] * 2  # no step after the interrupt
    np.testing.assert_array_equal(out.numpy(), kept[1].numpy())
    assert pipe(**STATE_CALL).images.shape == out.shape and not pipe.interrupt  # reset by the next call


def test_callback_switching_guidance_off_runs_the_rest_on_the_positive_prompts():
    pipe = pipeline("sd3-tiny")

    def guidance_off_after_step_1(p, i, t, tensors):
        if i == 1:
            p._guidance_scale = 0.0
        return tensors

    out = pipe(**STATE_CALL, callback_on_step_end=guidance_off_after_step_1).images.numpy()
    expected = manual_latents(pipe, lambda i, e, p: (3.0 if i < 2 else 0.0, e, p))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    assert np.abs(out - pipe(**STATE_CALL).images.numpy()).max() > 1e-2


def test_callback_returned_embeddings_replace_the_pipelines():
    pipe = pipeline("sd3-tiny")

    def halve_embeddings_at_step_0(p, i, t, tensors):
        if i == 0:
            return {k: v * 0.5 for k, v in tensors.items() if k != "latents"}
        return {}

    out = pipe(**STATE_CALL, callback_on_step_end=halve_embeddings_at_step_0,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "pooled_prompt_embeds"])  # fmt: skip
    expected = manual_latents(pipe, lambda i, e, p: (3.0, e * 0.5, p * 0.5) if i == 1 else (3.0, e, p))
    np.testing.assert_allclose(out.images.numpy(), expected, rtol=0, atol=1e-5)


def test_callback_switching_guidance_on_mid_call_is_refused():
    pipe = pipeline("sd3-tiny")

    def guidance_on(p, i, t, tensors):
        p._guidance_scale = 5.0
        return tensors

    with pytest.raises(ValueError, match="guidance was switched on during the call"):
        pipe(**{**STATE_CALL, "guidance_scale": 1.0}, callback_on_step_end=guidance_on)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=70), "height=70 is not a multiple of 16"),
        (dict(width=100), "width=100 is not a multiple of 16"),
        (dict(num_inference_steps=0), "num_inference_steps=0"),
        (dict(max_sequence_length=513), "max_sequence_length=513"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt=0"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "`negative_prompt` has 3 entries"),
        (dict(prompt=["a", "b"], prompt_2=["x", "y", "z"]), "`prompt_2` has 3 entries"),
        (dict(prompt=None), "`prompt` is required"),
        (dict(output_type="jpeg"), "output_type='jpeg'"),
        (dict(output_type="pt"), "output_type='pt' (torch tensors) is not supported: write output_type='pd'"),
        (dict(latents=np.zeros((1, 16, 4, 4), np.float32)), "`latents` has shape [1, 16, 4, 4]"),
        (dict(seed=[1, 2]), "got 2 seeds/generators for a batch of 1"),
        (dict(skip_guidance_layers=[7]), "skip_guidance_layers [7]"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs ['noise']"),
        (
            dict(joint_attention_kwargs={"ip_adapter_image_embeds": []}),
            "keys ['ip_adapter_image_embeds'] are not",
        ),
        (dict(joint_attention_kwargs={"scale": "high"}), "joint_attention_kwargs['scale']='high' must be"),
        (dict(joint_attention_kwargs=[("scale", 1)]), "joint_attention_kwargs must be a dict"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    pipe = pipeline("sd3-tiny")
    call = dict(prompt="a cat", height=64, width=64, num_inference_steps=1, guidance_scale=2.0)
    call.update(kwargs)
    with pytest.raises((ValueError, TypeError)) as info:
        pipe(**call)
    assert message in str(info.value)


def test_save_pretrained_round_trip(tmp_path):
    pipe = pipeline("sd35-tiny")
    target = tmp_path / "copy"
    pipe.save_pretrained(target)
    reloaded = StableDiffusion3Pipeline.from_pretrained(target)
    reloaded.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt="a snowy forest", height=64, width=64, num_inference_steps=2, seed=3, output_type="np"
    )
    np.testing.assert_array_equal(pipe(**kwargs).images, reloaded(**kwargs).images)
    with pytest.raises(FileExistsError):
        pipe.save_pretrained(target)


def test_dynamic_shifting_uses_the_resolution_dependent_mu():
    base = pipeline("sd3-tiny")
    config = dict(base.scheduler.config, use_dynamic_shifting=True)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    pipe = StableDiffusion3Pipeline(**dict(base.components, scheduler=scheduler))
    pipe.set_progress_bar_config(disable=True)
    pipe("a cat", height=64, width=96, num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    tokens = (64 // 8 // 2) * (96 // 8 // 2)
    c = scheduler.config
    mu = c.base_shift + (tokens - c.base_image_seq_len) * (c.max_shift - c.base_shift) / (
        c.max_image_seq_len - c.base_image_seq_len
    )
    expected = FlowMatchEulerDiscreteScheduler.from_config(config)
    expected.set_timesteps(3, mu=mu)
    np.testing.assert_array_equal(pipe.scheduler.sigmas.numpy(), expected.sigmas.numpy())
    static = FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)
    static.set_timesteps(3)
    assert np.abs(pipe.scheduler.sigmas.numpy() - static.sigmas.numpy()).max() > 1e-3


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-2), ("bfloat16", 5e-2)])
def test_half_precision_weights_stay_close_to_float32(dtype, tolerance):
    half = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd35-tiny"), dtype=dtype)
    half.set_progress_bar_config(disable=True)
    assert str(half.transformer.dtype) == f"paddle.{dtype}"
    kwargs = dict(prompt="a cat", height=64, width=64, num_inference_steps=3, seed=1, output_type="np")
    reference = pipeline("sd35-tiny")(**kwargs).images
    images = half(**kwargs).images
    difference = np.abs(images - reference).max()
    assert 0 < difference < tolerance  # rounded weights change the result, but only slightly


# ---- a model folder's own defaults (T5 length, guidance) ------------------------------------------------------


def _folder_with(tmp_path, key: str, value) -> str:
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(fixture_path("sd3-tiny"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    index[key] = value
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def _folder_with_t5_length(tmp_path, value) -> str:
    return _folder_with(tmp_path, "_max_sequence_length", value)


def test_folder_declared_t5_length_is_the_default_and_survives_save(tmp_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(_folder_with_t5_length(tmp_path, 8))
    assert pipe.default_max_sequence_length == 8
    embeds, _, _, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
    assert embeds.shape[1] == 77 + 8  # CLIP tokens + T5 at the folder's length
    explicit, _, _, _ = pipe.encode_prompt(
        "a red circle", do_classifier_free_guidance=False, max_sequence_length=20
    )
    assert explicit.shape[1] == 77 + 20  # an explicit length still wins
    latents = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    default = pipe(
        "a red circle", height=64, width=64, num_inference_steps=2, latents=latents, output_type="np"
    )
    at_8 = pipe("a red circle", height=64, width=64, num_inference_steps=2, latents=latents, output_type="np",
                max_sequence_length=8)  # fmt: skip
    np.testing.assert_array_equal(default.images, at_8.images)
    pipe.save_pretrained(tmp_path / "saved")
    assert StableDiffusion3Pipeline.from_pretrained(tmp_path / "saved").default_max_sequence_length == 8
    assert (
        StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny")).default_max_sequence_length == 256
    )


@pytest.mark.parametrize("value", [0, 513, "32", True])
def test_folder_declared_t5_length_must_be_a_valid_length(tmp_path, value):
    with pytest.raises(ValueError, match="_max_sequence_length"):
        StableDiffusion3Pipeline.from_pretrained(_folder_with_t5_length(tmp_path, value))


def test_folder_declared_guidance_scale_is_the_default_and_survives_save(tmp_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(_folder_with(tmp_path, "_guidance_scale", 2.5))
    assert pipe.default_guidance_scale == 2.5
    latents = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    call = dict(
        prompt="a red circle", height=64, width=64, num_inference_steps=2, latents=latents, output_type="np"
    )
    default = pipe(**call).images
    np.testing.assert_array_equal(default, pipe(**call, guidance_scale=2.5).images)
    assert np.abs(default - pipe(**call, guidance_scale=7.0).images).max() > 1e-3  # the default is not 7
    pipe.save_pretrained(tmp_path / "saved")
    assert StableDiffusion3Pipeline.from_pretrained(tmp_path / "saved").default_guidance_scale == 2.5
    assert StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny")).default_guidance_scale == 7.0


@pytest.mark.parametrize("value", [-1, 101, float("nan"), "3", True])
def test_folder_declared_guidance_scale_must_be_a_valid_number(tmp_path, value):
    with pytest.raises(ValueError, match="_guidance_scale"):
        StableDiffusion3Pipeline.from_pretrained(_folder_with(tmp_path, "_guidance_scale", value))
