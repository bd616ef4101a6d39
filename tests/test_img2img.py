"""StableDiffusion3Img2ImgPipeline against diffusers' own img2img outputs, and its inputs."""

from __future__ import annotations

import functools
import re

import numpy as np
import paddle
import pytest
from PIL import Image

from pipelines import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from pipelines import stable_diffusion_3_img2img as img2img_module
from sd3_core.storage import write_bytes_atomic
from tests.reference_cases import arrays, cases, fixture_path
from tests.s3_server import make_bucket

IMAGE_TOL = 2e-3
CALL = dict(prompt="a red fox", height=64, width=64, num_inference_steps=4, guidance_scale=3.0)


@functools.cache
def pipeline(fixture: str = "sd3-tiny") -> StableDiffusion3Img2ImgPipeline:
    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(fixture_path(fixture))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """A smooth uint8 RGB test picture, HWC."""
    coarse = np.random.default_rng(seed).uniform(0, 255, (height // 16, width // 16, 3))
    return np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1).round().astype(np.uint8)


@pytest.mark.parametrize("case", cases("img2img"), ids=lambda c: c["name"])
def test_img2img_matches_diffusers(case, monkeypatch):
    args, ref = dict(case["args"]), arrays(case)
    args.pop("note")
    draws = [paddle.to_tensor(ref["in_noise"]), paddle.to_tensor(ref["in_posterior_noise"])]
    monkeypatch.setattr(img2img_module, "standard_normal_draws", lambda *a, **k: list(draws))
    pipe = pipeline(case["fixture"])
    images = [Image.fromarray(a) for a in ref["in_image"]]
    out = pipe(**args, image=images, output_type="np").images
    np.testing.assert_allclose(out, ref["out_images"], rtol=0, atol=IMAGE_TOL)
    latents = pipe(**args, image=images, output_type="latent").images
    np.testing.assert_allclose(latents.numpy(), ref["out_latents"], rtol=0, atol=IMAGE_TOL)


def test_strength_one_with_a_seed_draws_the_text_to_image_picture():
    pipe = pipeline()
    text_to_image = StableDiffusion3Pipeline.from_pipe(pipe)
    assert text_to_image.transformer is pipe.transformer and text_to_image.vae is pipe.vae
    expected = text_to_image(**CALL, seed=[3], output_type="np").images
    out = pipe(**CALL, image=Image.fromarray(picture(0)), strength=1.0, seed=[3], output_type="np").images
    np.testing.assert_array_equal(out, expected)
    weaker = pipe(**CALL, image=Image.fromarray(picture(0)), strength=0.5, seed=[3], output_type="np").images
    assert np.abs(weaker - expected).max() > 1e-2
    assert pipe.num_timesteps == 2  # half of the 4 steps


def test_every_image_form_gives_the_same_picture():
    pipe = pipeline()
    pixels = picture(1)
    forms = {
        "pil": Image.fromarray(pixels),
        "uint8 hwc": pixels,
        "float nhwc": pixels[None].astype(np.float32) / 255,
        "tensor [0, 1]": paddle.to_tensor(pixels.transpose(2, 0, 1).astype(np.float32) / 255),
        "tensor [-1, 1]": paddle.to_tensor(pixels.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1),
        "list": [pixels],
    }
    images = {k: pipe(**CALL, image=v, seed=[2], output_type="np").images for k, v in forms.items()}
    for name, image in images.items():
        np.testing.assert_allclose(image, images["pil"], rtol=0, atol=1e-5, err_msg=name)


def test_latents_as_image_are_noised_from_the_cut_schedule():
    pipe = pipeline()
    pixels = paddle.to_tensor(picture(1).transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1)
    vae = pipe.vae
    clean = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    out = pipe(**CALL, image=clean, seed=[4], output_type="latent").images
    # By hand: diffusers' cut of the schedule (int(4 - 4 * 0.6) = 1 step skipped, 3 run), the noise
    # drawn as text to image draws it, then flow-matching Euler steps with CFG.
    reference = StableDiffusion3Pipeline.from_pipe(pipe)
    reference.scheduler.set_timesteps(4)
    start = int(4 - 4 * 0.6)
    assert start == 1
    noise = reference.prepare_latents(1, 64, 64, seed=[4])
    t = reference.scheduler.timesteps[start : start + 1]
    noised = reference.scheduler.scale_noise(clean, t, noise)
    sigmas = reference.scheduler.sigmas.numpy()
    embeds, negative, pooled, negative_pooled = reference.encode_prompt(
        "a red fox", do_classifier_free_guidance=True
    )
    latents = noised
    for i in range(start, 4):
        t = reference.scheduler.timesteps[i : i + 1]
        v = reference.transformer(
            paddle.concat([latents, latents]), paddle.concat([negative, embeds]),
            paddle.concat([negative_pooled, pooled]), paddle.concat([t, t]),
        ).sample  # fmt: skip
        uncond, text = paddle.chunk(v, 2)
        latents = latents + (sigmas[i + 1] - sigmas[i]) * (uncond + 3.0 * (text - uncond))
    np.testing.assert_allclose(out.numpy(), latents.numpy(), rtol=0, atol=1e-5)


def test_a_picture_file_is_read_from_a_path_or_url_as_diffusers_load_image_reads_it(tmp_path, s3_endpoint):
    pipe = pipeline()
    pixels = picture(9)
    Image.fromarray(pixels).save(tmp_path / "start.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bucket = make_bucket(s3_endpoint)
    write_bytes_atomic(f"s3://{bucket}/in/start.png", (tmp_path / "start.png").read_bytes())
    expected = pipe(**CALL, image=Image.fromarray(pixels), seed=[1], output_type="np").images
    urls = (
        str(tmp_path / "start.png"),
        tmp_path / "start.png",
        f"file://{tmp_path}/start.png",
        f"s3://{bucket}/in/start.png",
    )
    for image in urls:
        np.testing.assert_array_equal(pipe(**CALL, image=image, seed=[1], output_type="np").images, expected)
    with pytest.raises(ValueError, match=r"image\[1\]: cannot read '.*broken.png': UnidentifiedImageError"):
        pipe(**CALL, image=[Image.fromarray(pixels), str(tmp_path / "broken.png")], seed=[1])


def test_a_pil_image_of_another_size_is_resized_to_the_models_multiple():
    pipe = pipeline()
    big = Image.fromarray(picture(5, 80, 96)).resize((99, 75))  # 99 x 75: not multiples of 16
    out = pipe(**{**CALL, "height": None, "width": None}, image=big, seed=[1], output_type="np").images
    assert out.shape == (1, 64, 96, 3)  # rounded down to multiples of 16
    resized = big.resize((96, 64), Image.LANCZOS)
    expected = pipe(**{**CALL, "height": 64, "width": 96}, image=resized, seed=[1], output_type="np").images
    np.testing.assert_array_equal(out, expected)


def test_image_i_goes_with_prompt_i_and_per_image_seeds_hold():
    pipe = pipeline()
    images = [Image.fromarray(picture(6)), Image.fromarray(picture(7))]
    call = {**CALL, "num_inference_steps": 3}
    batch = pipe(**{**call, "prompt": ["a fox", "a cat"]}, image=images, num_images_per_prompt=2,
                 seed=[10, 11, 12, 13], output_type="np").images  # fmt: skip
    alone = pipe(**{**call, "prompt": "a cat"}, image=images[1], num_images_per_prompt=2, seed=[12, 13],
                 output_type="np").images  # fmt: skip
    np.testing.assert_allclose(batch[2:], alone, rtol=0, atol=1e-5)
    shared = pipe(
        **{**call, "prompt": ["a fox", "a cat"]}, image=images[1], seed=[12, 13], output_type="np"
    ).images
    np.testing.assert_allclose(shared[1], alone[1], rtol=0, atol=1e-5)  # one image for every prompt


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(strength=0), ValueError, "strength=0 must be a number in (0, 1]"),
        (dict(strength=1.5), ValueError, "strength=1.5 must be"),
        (dict(strength=True), ValueError, "strength=True must be"),
        (dict(image=None), ValueError, "image is required"),
        (dict(image=[]), ValueError, "image is an empty list"),
        (dict(image=np.zeros((48, 64, 3), np.uint8)), ValueError, "image is 48x64 px but height x width is 64x64"),
        (dict(image=[np.zeros((64, 64, 3), np.uint8)] * 3), ValueError, "`image` has 3 images for a batch of 1"),
        (dict(image=np.zeros((64, 64, 4), np.uint8)), ValueError, "image[0]: an array must be RGB pixels"),
        (dict(image=np.full((64, 64, 3), 2.0)), ValueError, "image[0]: float pixels must be in [0, 1]"),
        (dict(image=paddle.zeros([1, 5, 64, 64])), ValueError, "image[0]: a tensor must have 3 (RGB) or 16"),
        (dict(image=3), TypeError, "image[0]: expected a PIL image, a path or URL, a numpy array or a paddle Tensor"),
        (dict(image="missing/fox.png"), ValueError, "image[0]: cannot read 'missing/fox.png': "),
        (dict(image=[Image.new("RGB", (64, 64)), np.zeros((64, 64, 3))]), TypeError, "mixing PIL images"),
    ],
)  # fmt: skip
def test_bad_inputs_are_named(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        pipeline()(**{**CALL, "image": Image.new("RGB", (64, 64)), **kwargs})


def test_from_pipe_shares_the_models_and_takes_replacements_by_name():
    base = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))
    base.default_guidance_scale = 4.5
    pipe = StableDiffusion3Img2ImgPipeline.from_pipe(base)
    assert all(pipe.components[k] is v for k, v in base.components.items())
    assert pipe.default_guidance_scale == 4.5
    other = StableDiffusion3Img2ImgPipeline.from_pipe(base, text_encoder_3=None, tokenizer_3=None)
    assert other.text_encoder_3 is None and other.transformer is base.transformer
    with pytest.raises(TypeError, match=r"from_pipe: \['unet'\] are not components"):
        StableDiffusion3Img2ImgPipeline.from_pipe(base, unet=None)


def test_the_optimised_transformer_draws_what_eager_draws(tmp_path):
    eager = pipeline()
    optimised = StableDiffusion3Img2ImgPipeline.from_pipe(eager)
    optimised.enable_inference_optimize(cache_dir=str(tmp_path))
    assert eager.transformer_program is None and optimised.transformer is eager.transformer
    kwargs = dict(CALL, image=Image.fromarray(picture(8)), seed=[5], output_type="np")
    np.testing.assert_allclose(optimised(**kwargs).images, eager(**kwargs).images, rtol=0, atol=2e-3)
    assert StableDiffusion3Pipeline.from_pipe(optimised).transformer_program is optimised.transformer_program
