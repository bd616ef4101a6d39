"""diffusers' calling conventions of the components: ``return_dict``, output objects,
``latent_dist``, ``joint_attention_kwargs``, as a custom denoising loop written for diffusers uses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest
from safetensors import safe_open

from pipelines import StableDiffusion3Pipeline
from sd3_core import lora
from sd3_core.outputs import (
    AutoencoderKLOutput,
    DecoderOutput,
    FlowMatchEulerDiscreteSchedulerOutput,
    Transformer2DModelOutput,
)
from tests.reference_cases import fixture_path


@pytest.fixture(scope="module")
def pipe() -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_loop(pipe, tuples: bool) -> np.ndarray:
    """diffusers' own SD3 loop, its calls verbatim: in the pipeline's form (``return_dict=False``
    and ``[0]``) or in the default form a custom loop writes (``.sample``, ``.prev_sample``)."""
    pos, neg, pooled, neg_pooled = pipe.encode_prompt("a red fox", do_classifier_free_guidance=True)
    prompt_embeds, pooled_prompt_embeds = paddle.concat([neg, pos]), paddle.concat([neg_pooled, pooled])
    latents = pipe.prepare_latents(1, 64, 64, seed=[4])
    pipe.scheduler.set_timesteps(3)
    for t in pipe.scheduler.timesteps:
        latent_model_input = paddle.concat([latents] * 2)
        call = dict(
            hidden_states=latent_model_input,
            timestep=t.expand([latent_model_input.shape[0]]),
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled_prompt_embeds,
            joint_attention_kwargs=None,
        )
        if tuples:
            noise_pred = pipe.transformer(**call, return_dict=False)[0]
        else:
            noise_pred = pipe.transformer(**call).sample
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + 3.0 * (noise_pred_text - noise_pred_uncond)
        if tuples:
            latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        else:
            latents = pipe.scheduler.step(noise_pred, t, latents).prev_sample
    latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents, return_dict=False)[0] if tuples else pipe.vae.decode(latents).sample
    return np.clip(image.numpy().transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)


@pytest.mark.parametrize("tuples", [True, False], ids=["return_dict=False", "default"])
def test_a_loop_written_for_diffusers_gives_the_pipelines_image(pipe, tuples):
    call = dict(prompt="a red fox", height=64, width=64, num_inference_steps=3, guidance_scale=3.0, seed=[4])
    expected = pipe(**call, output_type="np").images
    np.testing.assert_allclose(_diffusers_loop(pipe, tuples), expected, rtol=0, atol=1e-5)


def test_prompt_encoding_written_for_diffusers_gives_encode_prompts_embeddings(pipe):
    """diffusers' `_get_clip_prompt_embeds` / `_get_t5_prompt_embeds` / `encode_prompt`, with
    return_tensors="pd" for "pt"."""
    prompt = ["a red fox", "a lighthouse at dusk"]
    clip = []
    for tokenizer, text_encoder in (
        (pipe.tokenizer, pipe.text_encoder),
        (pipe.tokenizer_2, pipe.text_encoder_2),
    ):
        text_inputs = tokenizer(
            prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pd"
        )
        prompt_embeds = text_encoder(text_inputs.input_ids, output_hidden_states=True)
        clip.append((prompt_embeds[0], prompt_embeds.hidden_states[-2]))
    text_inputs = pipe.tokenizer_3(prompt, padding="max_length", max_length=32, truncation=True,
                                   add_special_tokens=True, return_tensors="pd")  # fmt: skip
    t5_prompt_embed = pipe.text_encoder_3(text_inputs.input_ids)[0]
    clip_prompt_embeds = paddle.concat([clip[0][1], clip[1][1]], axis=-1)
    width = t5_prompt_embed.shape[-1] - clip_prompt_embeds.shape[-1]
    clip_prompt_embeds = paddle.concat(
        [clip_prompt_embeds, paddle.zeros([*clip_prompt_embeds.shape[:2], width])], -1
    )
    prompt_embeds = paddle.concat([clip_prompt_embeds, t5_prompt_embed], axis=-2)
    pooled_prompt_embeds = paddle.concat([clip[0][0], clip[1][0]], axis=-1)
    ours, _, ours_pooled, _ = pipe.encode_prompt(
        prompt, do_classifier_free_guidance=False, max_sequence_length=32
    )
    np.testing.assert_array_equal(prompt_embeds.numpy(), ours.numpy())
    np.testing.assert_array_equal(pooled_prompt_embeds.numpy(), ours_pooled.numpy())


def test_return_dict_forms_hold_the_same_value(pipe):
    """The default (``return_dict=True``) is diffusers' output object; False is its tuple."""
    z = paddle.to_tensor(np.random.default_rng(0).standard_normal((1, 16, 4, 4)).astype(np.float32))
    decoded = pipe.vae.decode(z)
    assert isinstance(decoded, DecoderOutput) and decoded.keys() == ["sample"]
    as_tuple = pipe.vae.decode(z, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    for same in (decoded[0], decoded["sample"], pipe.vae.decode(z, return_dict=True).sample, as_tuple[0]):
        np.testing.assert_array_equal(same.numpy(), decoded.sample.numpy())
    tiled = pipe.vae.tiled_decode(z)
    assert isinstance(tiled, DecoderOutput)
    np.testing.assert_array_equal(
        tiled.sample.numpy(), pipe.vae.tiled_decode(z, return_dict=False)[0].numpy()
    )

    x = paddle.to_tensor(np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32))
    encoded = pipe.vae.encode(x)
    assert isinstance(encoded, AutoencoderKLOutput) and encoded.keys() == ["latent_dist"]
    mean = encoded.latent_dist.mean.numpy()
    for posterior in (pipe.vae.encode(x, return_dict=False)[0], pipe.vae.tiled_encode(x).latent_dist):
        np.testing.assert_allclose(posterior.mode().numpy(), mean, rtol=0, atol=1e-5)
    reconstructed = pipe.vae(x)  # diffusers' forward: encode, the posterior's mode, decode
    assert isinstance(reconstructed, DecoderOutput)
    np.testing.assert_array_equal(
        reconstructed.sample.numpy(), pipe.vae.decode(encoded.latent_dist.mode()).sample.numpy()
    )
    np.testing.assert_array_equal(pipe.vae(x, return_dict=False)[0].numpy(), reconstructed.sample.numpy())

    sample = paddle.ones([1, 16, 4, 4])
    pipe.scheduler.set_timesteps(2)
    t = pipe.scheduler.timesteps[0]
    stepped = pipe.scheduler.step(sample, t, sample)
    assert isinstance(stepped, FlowMatchEulerDiscreteSchedulerOutput)
    np.testing.assert_array_equal(
        stepped.prev_sample.numpy(), pipe.scheduler.step(sample, t, sample, return_dict=False)[0].numpy()
    )

    args = (
        paddle.ones([1, 16, 8, 8]),
        paddle.ones([1, 12, 128]),
        paddle.ones([1, 80]),
        paddle.to_tensor([500.0]),
    )
    out = pipe.transformer(*args)
    assert isinstance(out, Transformer2DModelOutput)
    np.testing.assert_array_equal(out.sample.numpy(), pipe.transformer(*args, return_dict=False)[0].numpy())


def test_pipeline_output_indexes_as_diffusers(pipe):
    out = pipe(prompt="a cat", height=64, width=64, num_inference_steps=1, seed=[1], output_type="np")
    assert out[0] is out.images and out["images"] is out.images and out.to_tuple() == (out.images,)
    with pytest.raises(KeyError):
        out["sample"]


def test_transformer_joint_attention_scale_scales_the_adapters_for_the_call():
    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))
    lora.inject_lora(pipe.transformer, "a", rank=2)
    lora.random_lora_weights(pipe.transformer, "a", seed=3)
    args = (
        paddle.ones([1, 16, 8, 8]),
        paddle.ones([1, 12, 128]),
        paddle.ones([1, 80]),
        paddle.to_tensor([500.0]),
    )
    full = pipe.transformer(*args).sample.numpy()
    scaled = pipe.transformer(*args, joint_attention_kwargs={"scale": 0.25}).sample.numpy()
    np.testing.assert_array_equal(pipe.transformer(*args).sample.numpy(), full)  # for that call only
    lora.set_adapters(pipe.transformer, "a", 0.25)
    np.testing.assert_allclose(scaled, pipe.transformer(*args).sample.numpy(), rtol=0, atol=1e-6)
    assert np.abs(scaled - full).max() > 1e-3


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda p, a: p.transformer(*a, block_controlnet_hidden_states=[a[0]]), ValueError, "ControlNets"),
        (lambda p, a: p.transformer(*a, joint_attention_kwargs={"ip_adapter_image_embeds": 1}), ValueError,
         "keys ['ip_adapter_image_embeds'] are not supported"),
        (lambda p, a: p.transformer(*a, return_dict="yes"), TypeError, "return_dict='yes' must be True or False"),
        (lambda p, a: p.scheduler.step(a[0], p.scheduler.timesteps[0], a[0], generator=object()), ValueError,
         "pass the re-noising draw as noise="),
    ],
)  # fmt: skip
def test_diffusers_arguments_we_lack_are_refused_by_name(pipe, call, error, message):
    args = (
        paddle.ones([1, 16, 8, 8]),
        paddle.ones([1, 12, 128]),
        paddle.ones([1, 80]),
        paddle.to_tensor([500.0]),
    )
    pipe.scheduler.set_timesteps(2)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(")):
        call(pipe, args)


def _block_calls(transformer) -> list[int]:
    calls = []
    for block in transformer.transformer_blocks:
        block.register_forward_pre_hook(lambda layer, inputs: calls.append(1))
    return calls


def test_gradient_checkpointing_recomputes_the_blocks_with_the_same_gradients():
    """diffusers' ``transformer.enable_gradient_checkpointing()``: blocks run again in backward."""
    grads = []
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s).astype(np.float32) for s in ([2, 16, 8, 8], [2, 12, 128], [2, 80])]
    for checkpointing in (False, True):
        pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))
        transformer = pipe.transformer
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        assert transformer.is_gradient_checkpointing is checkpointing
        calls = _block_calls(transformer)
        out = transformer(*(paddle.to_tensor(a) for a in inputs), paddle.to_tensor([300.0, 700.0])).sample
        forward_calls = len(calls)
        out.square().mean().backward()
        assert len(calls) == forward_calls * (2 if checkpointing else 1)  # recomputed in backward
        grads.append({n: p.grad.numpy() for n, p in transformer.named_parameters() if p.grad is not None})
        with paddle.no_grad():  # no gradients recorded: nothing to recompute
            del calls[:]
            transformer(*(paddle.to_tensor(a) for a in inputs), paddle.to_tensor([300.0, 700.0]))
            assert len(calls) == forward_calls
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        np.testing.assert_allclose(grads[1][name], grads[0][name], rtol=0, atol=1e-6, err_msg=name)
    transformer.disable_gradient_checkpointing()
    assert not transformer.is_gradient_checkpointing


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_num_parameters_counts_the_checkpoints_parameters(pipe, component):
    """As diffusers counts: every tensor of the files but the transformer's position table (a buffer)."""
    total = 0
    for file in sorted((Path(fixture_path("sd3-tiny")) / component).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            total += sum(
                int(np.prod(f.get_slice(k).get_shape())) for k in f.keys() if k != "pos_embed.pos_embed"
            )
    model = getattr(pipe, component)
    assert model.num_parameters() == total
    assert model.num_parameters(exclude_embeddings=True) == total  # no embedding tables


@pytest.mark.parametrize("method", ["fuse_qkv_projections", "unfuse_qkv_projections"])
def test_qkv_fusion_switches_warn_that_they_change_nothing(pipe, method):
    args = (
        paddle.ones([1, 16, 8, 8]),
        paddle.ones([1, 12, 128]),
        paddle.ones([1, 80]),
        paddle.to_tensor([500.0]),
    )
    before = pipe.transformer(*args).sample.numpy()
    with pytest.warns(UserWarning, match=rf"{method}\(\) has no effect here: .*inference_optimize=True"):
        getattr(pipe.transformer, method)()
    np.testing.assert_array_equal(pipe.transformer(*args).sample.numpy(), before)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p.transformer.set_attn_processor(object()), "set_attn_processor is not supported"),
        (lambda p: p.load_ip_adapter("h94/IP-Adapter"), "load_ip_adapter is not supported: IP-Adapters"),
        (lambda p: p("a cat", ip_adapter_image=np.zeros((8, 8, 3))), "ip_adapter_image: IP-Adapters"),
        (lambda p: p("a cat", ip_adapter_image_embeds=[paddle.ones([1, 4])]), "ip_adapter_image_embeds: IP"),
    ],
)
def test_what_we_lack_of_diffusers_pipeline_api_is_refused_by_name(pipe, call, message):
    with pytest.raises((NotImplementedError, ValueError), match=message):
        call(pipe)


def test_numpy_to_pil_is_the_pipelines_own_conversion(pipe):
    call = dict(prompt="a cat", height=64, width=64, num_inference_steps=2, seed=[3])
    images = pipe(**call, output_type="np").images
    expected = pipe(**call).images
    converted = pipe.numpy_to_pil(images)
    assert [np.asarray(a).tolist() for a in converted] == [np.asarray(b).tolist() for b in expected]
    assert np.asarray(pipe.numpy_to_pil(images[0])[0]).shape == (64, 64, 3)  # one HWC image
    grey = pipe.numpy_to_pil(np.full((1, 4, 4, 1), 0.5))[0]
    assert grey.mode == "L" and np.asarray(grey).tolist() == [[128] * 4] * 4
