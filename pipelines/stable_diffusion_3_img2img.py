"""Image to image (diffusers' ``StableDiffusion3Img2ImgPipeline``).

The text-to-image loop started part-way: the schedule is cut to its last ``strength`` share of
steps, and the loop starts from the given images' latents noised to that point,
``sigma * noise + (1 - sigma) * (posterior sample - shift) * scaling``. Both random draws (the
start noise, then the VAE posterior's) come from ``seed`` / ``generator`` as the text-to-image
latents do, so ``strength=1`` with a seed draws the text-to-image picture of that seed.

One deliberate difference from diffusers: with one image per prompt and
``num_images_per_prompt > 1``, image ``i`` goes with prompt ``i`` (diffusers repeats the image batch
whole, pairing the second image with the first prompt's second copy).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import paddle
from PIL import Image, ImageOps

from pipelines.latents import initial_latents, standard_normal_draws
from pipelines.pipeline_output import StableDiffusion3PipelineOutput
from pipelines.stable_diffusion_3 import StableDiffusion3Pipeline
from sd3_core.storage import StorageOptions, read_bytes

__all__ = ["StableDiffusion3Img2ImgPipeline", "read_picture"]


class StableDiffusion3Img2ImgPipeline(StableDiffusion3Pipeline):
    """SD3 / SD3.5 image to image. Loads from the same folders as :class:`StableDiffusion3Pipeline`
    (``from_pretrained(path)``), or shares a loaded one's models: ``from_pipe(pipe)``."""

    _init: tuple[paddle.Tensor, float] | None = None  # the running call's images and strength

    @paddle.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        image: Any = None,
        strength: float = 0.6,
        num_inference_steps: int = 50,
        **kwargs: Any,
    ) -> StableDiffusion3PipelineOutput | tuple:
        """Redraw ``image`` to fit the prompt; ``strength`` in (0, 1] is how much (1: from noise).

        ``image``: a PIL image, a picture file's path or fsspec URL, a NumPy array (HWC or NHWC; float in [0, 1] or uint8) or a Paddle
        tensor (CHW or NCHW in [0, 1], or in [-1, 1] when it has negative values), or a list of them;
        one for every image, one per prompt or one per image of the batch. A 16-channel array or
        tensor is taken as latents already scaled. ``height`` / ``width`` default to the image's
        size rounded down to the model's multiple; PIL images are resized to them (Lanczos), arrays
        must have that size. Other arguments as :meth:`StableDiffusion3Pipeline.__call__`
        (diffusers' default of 50 steps)."""
        if isinstance(strength, bool) or not isinstance(strength, Real) or not 0 < strength <= 1:
            raise ValueError(f"strength={strength!r} must be a number in (0, 1]")
        pixels, height, width = self._image_input(image, height, width)
        self._init = (pixels, float(strength))
        try:
            return super().__call__(
                prompt, prompt_2, prompt_3, height, width, num_inference_steps=num_inference_steps, **kwargs
            )
        finally:
            self._init = None

    def _start(
        self,
        batch: int,
        height: int,
        width: int,
        generator: Any,
        seed: int | Sequence[int] | None,
        latents: Any,
        num_inference_steps: int,
        sigmas: list[float] | None,
        mu: float | None,
    ) -> tuple[paddle.Tensor, int]:
        """The schedule cut as diffusers' ``get_timesteps`` cuts it, and the noised image latents
        (given ``latents`` are the start as they are, as in diffusers)."""
        if self._init is None:
            raise RuntimeError("StableDiffusion3Img2ImgPipeline._start runs only inside a call")
        images, strength = self._init
        self._set_timesteps(height, width, num_inference_steps, sigmas, mu)
        steps = int(self.scheduler.timesteps.shape[0])
        start = int(max(steps - min(steps * strength, steps), 0))
        shape = [batch, self.transformer.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor]  # fmt: skip
        if latents is not None:
            return initial_latents(shape, latents=latents), start
        noise, posterior_noise = standard_normal_draws(shape, generator, seed, count=2)
        clean = self._image_latents(images, batch, posterior_noise)
        sigma_at = paddle.expand(self.scheduler.timesteps[start : start + 1], [batch])
        return self.scheduler.scale_noise(clean, sigma_at, noise), start

    def _image_latents(
        self, images: paddle.Tensor, batch: int, posterior_noise: paddle.Tensor
    ) -> paddle.Tensor:
        """Float32 ``(posterior sample - shift) * scaling`` of each image, repeated to the batch."""
        count = images.shape[0]
        if batch % count:
            raise ValueError(
                f"`image` has {count} images for a batch of {batch} (len(prompt) x num_images_per_prompt): "
                "pass one image, one per prompt or one per image of the batch"
            )
        vae = self.vae
        if images.shape[1] == vae.config.latent_channels:  # latents, already scaled (as diffusers)
            return paddle.repeat_interleave(images.astype("float32"), batch // count, axis=0)
        posterior = vae.encode(images.astype(vae.dtype), return_dict=False)[0]
        mean = paddle.repeat_interleave(posterior.mean.astype("float32"), batch // count, axis=0)
        std = paddle.repeat_interleave(posterior.std.astype("float32"), batch // count, axis=0)
        shift = vae.config.get("shift_factor") or 0.0
        return (mean + std * posterior_noise - shift) * vae.config.scaling_factor

    def _image_input(
        self, image: Any, height: int | None, width: int | None
    ) -> tuple[paddle.Tensor, int, int]:
        """``image`` as a float32 NCHW tensor (pixels in [-1, 1], or latents), with the call's size."""
        if image is None:
            raise ValueError("image is required: the picture(s) to start from")
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if not items:
            raise ValueError("image is an empty list")
        items = [_read_item(i, n) if isinstance(i, (str, os.PathLike)) else i for n, i in enumerate(items)]
        pil = [isinstance(i, Image.Image) for i in items]
        if any(pil) and not all(pil):
            raise TypeError("image: a list mixing PIL images and arrays/tensors; pass one kind")
        if all(pil):
            multiple = self.vae_scale_factor * self.patch_size
            w0, h0 = items[0].size
            height = height or max(multiple, h0 - h0 % multiple)
            width = width or max(multiple, w0 - w0 % multiple)
            resized = [i.convert("RGB").resize((width, height), Image.LANCZOS) if i.size != (width, height)
                       else i.convert("RGB") for i in items]  # fmt: skip
            array = np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in resized])
            return paddle.to_tensor(array.transpose(0, 3, 1, 2) * 2.0 - 1.0), height, width
        tensor = paddle.concat([_nchw(i, n) for n, i in enumerate(items)])
        latent = tensor.shape[1] == self.vae.config.latent_channels
        factor = self.vae_scale_factor if latent else 1
        height = height or tensor.shape[2] * factor
        width = width or tensor.shape[3] * factor
        if [tensor.shape[2] * factor, tensor.shape[3] * factor] != [height, width]:
            raise ValueError(
                f"image is {tensor.shape[2] * factor}x{tensor.shape[3] * factor} px but height x width is "
                f"{height}x{width}: resize it first, or pass PIL images (resized to fit)"
            )
        return tensor, height, width


def read_picture(url: str | os.PathLike, options: StorageOptions | None = None) -> Image.Image:
    """The RGB picture in a file (PNG, JPEG, ...) at a path or fsspec URL, turned upright by its
    EXIF orientation as diffusers' ``load_image`` does; ValueError naming the URL if it cannot."""
    try:
        picture = Image.open(io.BytesIO(read_bytes(os.fspath(url), options)))
        picture.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {os.fspath(url)!r}: {type(e).__name__}: {e}") from None
    return ImageOps.exif_transpose(picture).convert("RGB")


def _read_item(url: str | os.PathLike, index: int) -> Image.Image:
    try:
        return read_picture(url)
    except ValueError as e:
        raise ValueError(f"image[{index}]: {e}") from None


def _nchw(item: Any, index: int) -> paddle.Tensor:
    """One array / tensor item of ``image`` -> float32 NCHW: pixels in [-1, 1], or latents (a
    16-channel tensor) as given."""
    name = f"image[{index}]"
    if isinstance(item, paddle.Tensor):
        tensor = item.astype("float32")
        tensor = tensor.unsqueeze(0) if tensor.ndim == 3 else tensor
        if tensor.ndim != 4:
            raise ValueError(f"{name}: a tensor must be CHW or NCHW, got shape {list(item.shape)}")
        if tensor.shape[1] not in (3, 16):
            raise ValueError(
                f"{name}: a tensor must have 3 (RGB) or 16 (latent) channels, got shape {list(item.shape)}"
            )
        if tensor.shape[1] == 16 or float(tensor.min()) < 0:  # latents, or pixels in [-1, 1] already
            return tensor
        return tensor * 2.0 - 1.0
    if isinstance(item, np.ndarray):
        array = item[None] if item.ndim == 3 else item
        if array.ndim != 4:
            raise ValueError(f"{name}: an array must be HWC or NHWC, got shape {list(item.shape)}")
        if array.shape[-1] != 3:
            raise ValueError(
                f"{name}: an array must be RGB pixels, HWC or NHWC, got shape {list(item.shape)} "
                "(latents go as a [B, 16, h, w] paddle Tensor)"
            )
        scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
        if scaled.min() < 0 or scaled.max() > 1:
            raise ValueError(f"{name}: float pixels must be in [0, 1] (uint8 in [0, 255])")
        return paddle.to_tensor(np.ascontiguousarray(scaled.transpose(0, 3, 1, 2)) * 2.0 - 1.0)
    raise TypeError(
        f"{name}: expected a PIL image, a path or URL, a numpy array or a paddle Tensor, got {type(item).__name__}"
    )
