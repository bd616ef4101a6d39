"""Text-to-image with Stable Diffusion 3 on Paddle, with diffusers' names and numerics.

`__call__` reads as its steps: check inputs, encode the prompt, prepare latents, set timesteps,
denoise (guidance, scheduler step), decode, postprocess.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import paddle
from PIL import Image
from tqdm.auto import tqdm

from pipelines.latents import generator_seeds, initial_latents
from pipelines.lora_loading import SD3LoraLoaderMixin
from pipelines.pipeline_device import PipelineDeviceMixin
from pipelines.pipeline_loading import PipelineLoadingMixin
from pipelines.pipeline_output import StableDiffusion3PipelineOutput
from pipelines.prompt_encoding import PromptEncodingMixin, check_prompt_inputs
from pipelines.stage_timer import StageTimer
from sd3_core import runtime
from sd3_core.dtypes import cast
from sd3_core.folder_defaults import DEFAULT_GUIDANCE_SCALE, DEFAULT_T5_LENGTH, MAX_T5_LENGTH
from sd3_core.inference_program import TransformerProgram, program_precision
from sd3_core.lora import joint_attention_scale, scaled_adapters
from sd3_core.scheduler import FlowMatchEulerDiscreteScheduler
from sd3_core.transformer import SD3Transformer2DModel
from sd3_core.vae import AutoencoderKL

# generator_seeds and the output class are also imported from here (actors/parallel_pipeline.py).
__all__ = [
    "CALLBACK_TENSOR_INPUTS",
    "StableDiffusion3Pipeline",
    "StableDiffusion3PipelineOutput",
    "generator_seeds",
    "OUTPUT_TYPES",
]

_NO_IP_ADAPTER = (
    "IP-Adapters (image prompts) are not implemented for SD3 here; describe the image in the prompt"
)

# What `output_type` may be: PIL images, NHWC floats, NCHW Paddle tensors, the latents.
OUTPUT_TYPES = ("pil", "np", "pd", "latent")

# What `callback_on_step_end` may ask for (`callback_on_step_end_tensor_inputs`), as in diffusers.
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "pooled_prompt_embeds")


class StableDiffusion3Pipeline(
    PipelineLoadingMixin, PromptEncodingMixin, SD3LoraLoaderMixin, PipelineDeviceMixin
):
    """SD3 / SD3.5 text-to-image. Build with `from_pretrained(path)` on a diffusers folder."""

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: Any,
        tokenizer: Any,
        text_encoder_2: Any,
        tokenizer_2: Any,
        text_encoder_3: Any = None,
        tokenizer_3: Any = None,
    ) -> None:
        runtime.configure()
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 must both be given or both be None (T5 dropped)")
        self.transformer = transformer
        self.scheduler = scheduler
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.patch_size = transformer.config.patch_size
        self.default_sample_size = transformer.config.sample_size
        self.tokenizer_max_length = getattr(tokenizer, "model_max_length", 77)
        # What max_sequence_length=None and guidance_scale=None mean; from_pretrained takes them from
        # the folder when it says (sd3_core.folder_defaults).
        self.default_max_sequence_length = DEFAULT_T5_LENGTH
        self.default_guidance_scale = DEFAULT_GUIDANCE_SCALE
        self._progress_bar_config: dict[str, Any] = {}
        #: The static-program runner of the transformer (``inference_optimize``); None: eager.
        self.transformer_program: TransformerProgram | None = None
        #: Set to a ``StageTimer`` to collect seconds per stage of each call (benchmarks).
        self.stage_timer: StageTimer | None = None
        # The running call's state, read through diffusers' properties (below); a step callback
        # may set ``_guidance_scale`` (CFG on or off from the next step) or ``_interrupt``.
        self._guidance_scale: float | None = None
        self._clip_skip: int | None = None
        self._joint_attention_kwargs: dict[str, Any] | None = None
        self._skip_guidance_layers: list[int] | None = None
        self._num_timesteps: int | None = None
        self._interrupt = False

    def enable_inference_optimize(
        self, precision: str | None = None, cache_dir: str | None = None, threads: int | None = None
    ) -> None:
        """Run the transformer as cached static Paddle Inference programs (``sd3_core.inference_program``).

        ``precision`` defaults to what the loaded dtype means on this device: on CPU, bfloat16
        math for ``dtype="bfloat16"`` where the CPU has it (else float32, with a warning)."""
        precision = precision or program_precision(self.transformer.dtype)
        self.transformer_program = TransformerProgram(self.transformer, precision, cache_dir, threads)

    def disable_inference_optimize(self) -> None:
        self.transformer_program = None

    # diffusers' older pipeline spellings of the VAE switches: they still work, and warn as
    # diffusers' pipelines did before removing them (StableDiffusion3Pipeline never had them).
    def enable_vae_slicing(self) -> None:
        """Same as ``pipe.vae.enable_slicing()`` (deprecated spelling)."""
        self._vae_switch("enable_vae_slicing", "enable_slicing")

    def disable_vae_slicing(self) -> None:
        """Same as ``pipe.vae.disable_slicing()`` (deprecated spelling)."""
        self._vae_switch("disable_vae_slicing", "disable_slicing")

    def enable_vae_tiling(self) -> None:
        """Same as ``pipe.vae.enable_tiling()`` (deprecated spelling)."""
        self._vae_switch("enable_vae_tiling", "enable_tiling")

    def disable_vae_tiling(self) -> None:
        """Same as ``pipe.vae.disable_tiling()`` (deprecated spelling)."""
        self._vae_switch("disable_vae_tiling", "disable_tiling")

    def _vae_switch(self, called: str, vae_method: str) -> None:
        warnings.warn(
            f"Calling `{called}()` on a `{type(self).__name__}` is deprecated and this method will be "
            f"removed in a future version. Please use `pipe.vae.{vae_method}()`.",
            FutureWarning,
            stacklevel=3,
        )
        getattr(self.vae, vae_method)()

    def load_ip_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused: image prompts are not supported (see the message)."""
        raise NotImplementedError(f"load_ip_adapter is not supported: {_NO_IP_ADAPTER}")

    def folder_defaults(
        self, guidance_scale: float | None = None, max_sequence_length: int | None = None
    ) -> tuple[float, int]:
        """``(guidance_scale, max_sequence_length)`` with each None replaced by the model folder's
        default (the one rule for what None means in encode_prompt and __call__)."""
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        if max_sequence_length is None:
            max_sequence_length = self.default_max_sequence_length
        return guidance_scale, max_sequence_length

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the denoising progress bar (tqdm's), e.g. `disable=True`."""
        self._progress_bar_config = dict(kwargs)

    @property
    def dtype(self) -> Any:
        return self.transformer.dtype

    # diffusers' properties of the running call (step callbacks read them).
    @property
    def guidance_scale(self) -> float | None:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale is not None and self._guidance_scale > 1

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def joint_attention_kwargs(self) -> dict[str, Any] | None:
        return self._joint_attention_kwargs

    @property
    def skip_guidance_layers(self) -> list[int] | None:
        return self._skip_guidance_layers

    @property
    def num_timesteps(self) -> int | None:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a step callback to stop denoising after that step
        (the latents so far are decoded), as in diffusers."""
        return self._interrupt

    # ------------------------------------------------------------------ checks and latents
    def check_inputs(
        self,
        prompt: Any,
        height: int,
        width: int,
        num_inference_steps: int,
        num_images_per_prompt: int,
        max_sequence_length: int,
        prompt_embeds: Any,
        pooled_prompt_embeds: Any,
        negative_prompt: Any,
        negative_prompt_embeds: Any,
        negative_pooled_prompt_embeds: Any,
        output_type: str,
    ) -> None:
        """Raise a ValueError/TypeError that names the argument and the problem."""
        multiple = self.vae_scale_factor * self.patch_size
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
            if value % multiple:
                raise ValueError(
                    f"{name}={value} is not a multiple of {multiple} (VAE factor {self.vae_scale_factor} x patch "
                    f"{self.patch_size}); try {name}={max(multiple, value - value % multiple)}"
                )
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be an integer >= 1")
        if (
            not isinstance(max_sequence_length, (int, np.integer))
            or not 1 <= max_sequence_length <= MAX_T5_LENGTH
        ):
            raise ValueError(
                f"max_sequence_length={max_sequence_length!r} must be an integer in [1, {MAX_T5_LENGTH}]"
            )
        if output_type == "pt":
            raise ValueError(
                "output_type='pt' (torch tensors) is not supported: write output_type='pd' for Paddle "
                "tensors (NCHW in [0, 1], as PPDiffusers) or 'np'"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type={output_type!r} must be one of {', '.join(map(repr, OUTPUT_TYPES))}"
            )
        check_prompt_inputs(
            prompt, prompt_embeds, pooled_prompt_embeds,
            negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds,
        )  # fmt: skip

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: Any = None,
        seed: int | Sequence[int] | None = None,
        latents: Any = None,
    ) -> paddle.Tensor:
        """Standard-normal float32 latents `(B, C, H/8, W/8)`, drawn with NumPy so a seed gives the same image
        on any device. `seed`/`generator` may be one value (one draw for the batch) or one per image.

        Latents, guidance and the scheduler step stay float32 whatever the model dtype: only the transformer
        input is cast, which costs nothing and keeps half-precision runs from drifting step by step."""
        shape = [
            batch_size,
            self.transformer.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        ]
        return initial_latents(shape, generator, seed, latents)

    # ------------------------------------------------------------------ generation
    @paddle.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        seed: int | Sequence[int] | None = None,
        latents: Any = None,
        prompt_embeds: paddle.Tensor | None = None,
        negative_prompt_embeds: paddle.Tensor | None = None,
        pooled_prompt_embeds: paddle.Tensor | None = None,
        negative_pooled_prompt_embeds: paddle.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        """Generate images. Arguments and defaults follow diffusers' StableDiffusion3Pipeline; `seed`
        (an int, or one per image) is an alternative to `generator` (NumPy generators, or paddle /
        torch Generators standing for their seed: see :func:`generator_seeds`);
        `guidance_scale=None` and `max_sequence_length=None` take the model folder's defaults (7.0
        and 256 unless its model_index.json declares others). `joint_attention_kwargs={"scale": s}`
        scales the LoRA adapters for this call, as in diffusers. A step callback's returned
        `latents`, `prompt_embeds` and `pooled_prompt_embeds` replace the loop's."""
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        guidance_scale, max_sequence_length = self.folder_defaults(guidance_scale, max_sequence_length)
        # 1. check inputs
        self.check_inputs(
            prompt, height, width, num_inference_steps, num_images_per_prompt, max_sequence_length,
            prompt_embeds, pooled_prompt_embeds, negative_prompt, negative_prompt_embeds,
            negative_pooled_prompt_embeds, output_type,
        )  # fmt: skip
        for name, value in (
            ("ip_adapter_image", ip_adapter_image),
            ("ip_adapter_image_embeds", ip_adapter_image_embeds),
        ):
            if value is not None:
                raise ValueError(f"{name}: {_NO_IP_ADAPTER}")
        if skip_guidance_layers is not None:
            n_layers = self.transformer.config.num_layers
            bad = [i for i in skip_guidance_layers if not 0 <= int(i) < n_layers]
            if bad:
                raise ValueError(
                    f"skip_guidance_layers {bad} are outside the transformer's layers 0..{n_layers - 1}"
                )
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(CALLBACK_TENSOR_INPUTS))
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not among {list(CALLBACK_TENSOR_INPUTS)}"
            )
        lora_scale = joint_attention_scale(joint_attention_kwargs)
        self._guidance_scale, self._clip_skip = guidance_scale, clip_skip
        self._joint_attention_kwargs, self._skip_guidance_layers = (
            joint_attention_kwargs,
            skip_guidance_layers,
        )
        self._interrupt = False
        do_cfg = self.do_classifier_free_guidance
        # 2. encode the prompt
        with self._stage("text_encoding"):
            prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
                prompt, prompt_2, prompt_3,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=do_cfg,
                negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                clip_skip=clip_skip, max_sequence_length=max_sequence_length,
            )  # fmt: skip
        model_dtype = self.transformer.dtype
        cond_embeds, cond_pooled = prompt_embeds.astype(model_dtype), pooled.astype(model_dtype)
        if do_cfg:
            embeds = paddle.concat([negative_prompt_embeds.astype(model_dtype), cond_embeds])
            pooled_all = paddle.concat([negative_pooled.astype(model_dtype), cond_pooled])
        else:
            embeds, pooled_all = cond_embeds, cond_pooled
        # 3-4. the schedule, and the latents the loop starts from at its position `start` in it
        batch = cond_embeds.shape[0]
        latents, start = self._start(
            batch, height, width, generator, seed, latents, num_inference_steps, sigmas, mu
        )
        timesteps = self.scheduler.timesteps[start:]
        num_steps = self._num_timesteps = int(timesteps.shape[0])
        # 5. denoising loop
        if self.stage_timer is not None:
            self.stage_timer.steps += num_steps
        with (
            self._stage("denoising"),
            tqdm(total=num_steps, **self._progress_bar_config) as progress,
            scaled_adapters(self.transformer, lora_scale),
        ):
            for i in range(num_steps):
                if self.interrupt:
                    break
                do_cfg = self.do_classifier_free_guidance  # a callback may have changed it
                embeds, pooled_all = _guidance_rows(do_cfg, latents.shape[0], embeds, pooled_all)
                t = timesteps[i : i + 1]
                model_input = paddle.concat([latents, latents]) if do_cfg else latents
                noise_pred = self._velocity(model_input, embeds, pooled_all, t)
                if do_cfg:
                    uncond, text = paddle.chunk(noise_pred, 2)
                    noise_pred = uncond + self._guidance_scale * (text - uncond)
                    slg_active = (
                        num_steps * skip_layer_guidance_start < i < num_steps * skip_layer_guidance_stop
                    )
                    if skip_guidance_layers is not None and slg_active:
                        skipped = self._velocity(latents, cond_embeds, cond_pooled, t, skip_guidance_layers)
                        noise_pred = noise_pred + (text - skipped) * skip_layer_guidance_scale
                latents = self.scheduler.step(
                    noise_pred, t, latents, step_index=start + i, return_dict=False
                )[0]
                if callback_on_step_end is not None:
                    values = {"latents": latents, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled_all}
                    wanted = {k: values[k] for k in callback_on_step_end_tensor_inputs}
                    returned = callback_on_step_end(self, i, t, wanted) or {}
                    latents = returned.get("latents", latents)
                    embeds = cast(returned.get("prompt_embeds", embeds), model_dtype)
                    pooled_all = cast(returned.get("pooled_prompt_embeds", pooled_all), model_dtype)
                progress.update()
        # 6. decode and postprocess
        if output_type == "latent":
            images: Any = latents
        else:
            with self._stage("vae_decode"):
                images = self.decode_latents(latents, output_type)
        return StableDiffusion3PipelineOutput(images=images) if return_dict else (images,)

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
        """Set the scheduler's timesteps; return the loop's first latents and the position in the
        timesteps it starts at. Text to image: noise (or ``latents``) from the first step."""
        self._set_timesteps(height, width, num_inference_steps, sigmas, mu)
        return self.prepare_latents(batch, height, width, generator, seed, latents), 0

    def _set_timesteps(
        self, height: int, width: int, num_inference_steps: int, sigmas: list[float] | None, mu: float | None
    ) -> None:
        """The scheduler's schedule for a call (``mu`` from the image size under dynamic shifting)."""
        if mu is None and self.scheduler.config.get("use_dynamic_shifting"):
            side = self.vae_scale_factor * self.patch_size
            mu = self.scheduler.mu_for_image_seq_len((height // side) * (width // side))
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        else:
            self.scheduler.set_timesteps(num_inference_steps, mu=mu)

    def _stage(self, name: str) -> AbstractContextManager:
        """Times stage `name` of a call into `stage_timer` (a no-op without one)."""
        return nullcontext() if self.stage_timer is None else self.stage_timer.stage(name)

    def _velocity(
        self,
        latents: paddle.Tensor,
        embeds: paddle.Tensor,
        pooled: paddle.Tensor,
        t: paddle.Tensor,
        skip_layers: list[int] | None = None,
    ) -> paddle.Tensor:
        """The transformer's float32 velocity for float32 ``latents`` at timestep ``t`` (shape [1]).

        The one place the denoising loop calls the transformer: a replica rank
        (``pipelines.rank_pipeline``) overrides it to run only its CFG half."""
        transformer = self.transformer_program or self.transformer
        velocity = transformer(
            latents.astype(self.transformer.dtype), embeds, pooled,
            paddle.expand(t, [latents.shape[0]]), skip_layers=skip_layers, return_dict=False,
        )[0]  # fmt: skip
        return velocity.astype("float32")

    def decode_latents(self, latents: paddle.Tensor, output_type: str = "np") -> Any:
        """Latents -> images as ``output_type`` says (see :meth:`images_as`)."""
        config = self.vae.config
        z = latents.astype(self.vae.dtype) / config.scaling_factor + config.shift_factor
        decoded = self.vae.decode(z, return_dict=False)[0]
        images = paddle.clip(decoded.astype("float32") / 2 + 0.5, 0.0, 1.0)
        return self.images_as(images.transpose([0, 2, 3, 1]).numpy(), output_type)

    @classmethod
    def images_as(cls, images: np.ndarray, output_type: str) -> Any:
        """NHWC float images in [0, 1] as the pipeline returns them: that array ("np"), a float32
        Paddle tensor ``[B, 3, H, W]`` in [0, 1] ("pd", PPDiffusers' form) or PIL images ("pil")."""
        if output_type == "np":
            return images
        if output_type == "pd":
            return paddle.to_tensor(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return cls.numpy_to_pil(images)

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
        """NHWC (or one HWC) float images in [0, 1] -> PIL images, 1 channel as "L" (diffusers' helper)."""
        images = images[None] if images.ndim == 3 else images
        pixels = (images * 255).round().astype(np.uint8)
        return [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in pixels]


def _guidance_rows(
    do_cfg: bool, batch: int, embeds: paddle.Tensor, pooled: paddle.Tensor
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """The embeddings for a step: with CFG switched off mid-call (a callback set
    ``_guidance_scale <= 1``), the positive half of the ``[negative; positive]`` rows."""
    if do_cfg and embeds.shape[0] != 2 * batch:
        raise ValueError(
            "guidance was switched on during the call (pipe._guidance_scale > 1) but the call "
            "began without it, so there are no negative embeddings; pass guidance_scale > 1 instead"
        )
    if not do_cfg and embeds.shape[0] == 2 * batch:
        return embeds[batch:], pooled[batch:]
    return embeds, pooled
