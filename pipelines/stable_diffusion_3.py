"""Text-to-image with Stable Diffusion 3 on Paddle, with diffusers' names and numerics.

`__call__` reads as its steps: check inputs, encode the prompt, prepare latents, set timesteps,
denoise (guidance, scheduler step), decode, postprocess.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
from PIL import Image
from tqdm.auto import tqdm

from pipelines.lora_loading import SD3LoraLoaderMixin
from pipelines.stage_timer import StageTimer
from sd3_core import single_file
from sd3_core.clip_text_encoder import clip_text_encoder_from_weights, load_clip_text_encoder
from sd3_core.folder_defaults import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_T5_LENGTH,
    GUIDANCE_SCALE_KEY,
    MAX_SEQUENCE_LENGTH_KEY,
    MAX_T5_LENGTH,
    folder_guidance_scale,
    folder_max_sequence_length,
)
from sd3_core.folder_layout import LIBRARY_CLASSES, pipeline_files
from sd3_core.hub import LoadOptions, model_folder
from sd3_core.inference_program import TransformerProgram, program_precision
from sd3_core.modeling import dtype_argument, read_json_object
from sd3_core.scheduler import FlowMatchEulerDiscreteScheduler
from sd3_core.t5_encoder import load_t5_encoder, t5_encoder_from_weights
from sd3_core.tokenizer_loading import load_clip_tokenizer, load_t5_tokenizer
from sd3_core.transformer import SD3Transformer2DModel
from sd3_core.vae import AutoencoderKL

logger = logging.getLogger(__name__)

_FROM_FOLDER = object()  # sentinel: "load this component from the pipeline folder"

_OPTIONAL = ("text_encoder_3", "tokenizer_3")
# The components only prompt encoding needs (a rank that receives its embeddings can go without).
TEXT_COMPONENTS = tuple(name for name in LIBRARY_CLASSES if name.startswith(("text_encoder", "tokenizer")))
# What `callback_on_step_end` may ask for (`callback_on_step_end_tensor_inputs`), as in diffusers.
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "pooled_prompt_embeds")


@dataclass
class StableDiffusion3PipelineOutput:
    """`images`: a list of PIL images, an NHWC float array in [0, 1], or latents."""

    images: Any


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"`{name}` must be a str or a list of str, got {type(value).__name__}")


def _is_framework_generator(value: Any) -> bool:
    """A ``paddle.Generator`` or a ``torch.Generator`` (recognised by its class; torch is never imported)."""
    kind = type(value)
    return isinstance(value, paddle.base.core.Generator) or (
        kind.__name__ == "Generator" and kind.__module__.split(".")[0] == "torch"
    )


def generator_seeds(generator: Any) -> Any:
    """`generator` with each paddle / torch Generator replaced by its ``initial_seed()``.

    Latents are drawn with NumPy (the same on every device), so such a generator stands for its seed:
    ``paddle.Generator().manual_seed(42)`` draws what ``seed=42`` draws, every time (its state is
    neither read nor advanced). NumPy generators and ints pass through unchanged."""
    items = generator if isinstance(generator, (list, tuple)) else [generator]
    framework = [g for g in items if _is_framework_generator(g)]
    if len({id(g) for g in framework}) < len(framework):
        raise ValueError(
            "`generator` lists the same Generator object more than once: paddle.Generator() returns the "
            "device's one default generator, so `[paddle.Generator().manual_seed(i) for i in ...]` re-seeds "
            "that one object; pass `seed=[...]` (one int per image) instead"
        )
    seeds = [int(g.initial_seed()) if _is_framework_generator(g) else g for g in items]
    return seeds if isinstance(generator, (list, tuple)) else seeds[0]


def _numpy_rng(value: Any, name: str) -> np.random.Generator:
    """The NumPy generator for one `seed` / `generator` value (a NumPy generator, an int >= 0, or
    None: fresh entropy)."""
    if isinstance(value, np.random.Generator):
        return value
    if value is None:
        return np.random.default_rng()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return np.random.default_rng(int(value))
    raise TypeError(
        f"`{name}` must be an int >= 0, a numpy.random.Generator or a paddle.Generator "
        f"(or a list of them, one per image), got {value!r}"
    )


def _load_component(name: str, folder: str, dtype: str) -> Any:
    if name == "transformer":
        return SD3Transformer2DModel.from_pretrained(folder, dtype=dtype)
    if name == "vae":
        return AutoencoderKL.from_pretrained(folder, dtype=dtype)
    if name == "scheduler":
        return FlowMatchEulerDiscreteScheduler.from_pretrained(folder)
    if name in ("text_encoder", "text_encoder_2"):
        return load_clip_text_encoder(folder, dtype)
    if name == "text_encoder_3":
        return load_t5_encoder(folder, dtype)
    if name in ("tokenizer", "tokenizer_2"):
        return load_clip_tokenizer(folder)
    return load_t5_tokenizer(folder)


def _single_file_component(
    name: str,
    ckpt: single_file.Checkpoint,
    config: str | os.PathLike | None,
    index: dict[str, Any],
    dtype: str,
) -> Any:
    """One pipeline component for `from_single_file`: from the file, else from the config folder."""
    sub = os.path.join(os.fspath(config), name) if config is not None else None
    if name in ("transformer", "vae") and ckpt.has(name):
        hints_file = os.path.join(sub, "config.json") if sub else None
        hints = read_json_object(hints_file) if hints_file and os.path.isfile(hints_file) else None
        model_config, weights = ckpt.model_weights(name, hints)
        model_cls = SD3Transformer2DModel if name == "transformer" else AutoencoderKL
        return model_cls.from_weights(model_config, weights, dtype, ckpt.source)
    if name.startswith("text_encoder") and ckpt.has(name):
        te_config = ckpt.text_encoder_config(name, config)
        build = t5_encoder_from_weights if name == "text_encoder_3" else clip_text_encoder_from_weights
        return build(te_config, ckpt.text_encoder_weights(name), dtype, f"{ckpt.source} ({name})")
    if name == "transformer":
        raise single_file.SingleFileError(
            f"{ckpt.source}: holds no SD3 transformer (model.diffusion_model.*)"
        )
    entry = index.get(name)
    if sub is not None and entry and entry[0] is not None and os.path.isdir(sub):
        return _load_component(name, sub, dtype)
    if name == "scheduler":
        return FlowMatchEulerDiscreteScheduler.from_config(single_file.SD3_SCHEDULER_CONFIG)
    if name in _OPTIONAL and config is not None:
        return None  # the config folder has no T5 either: T5 dropped
    where = f"config={os.fspath(config)!r} has no {name}" if config is not None else "no config= was given"
    hint = " (or text_encoder_3=None, tokenizer_3=None to drop T5)" if name in _OPTIONAL else ""
    raise single_file.SingleFileError(
        f"{ckpt.source}: the file holds no {name} and {where}; pass config= a diffusers SD3 folder of "
        f"this model, or {name}=...{hint}"
    )


class StableDiffusion3Pipeline(SD3LoraLoaderMixin):
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

    # ------------------------------------------------------------------ loading and saving
    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LIBRARY_CLASSES}

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: str | Any = None,
        inference_optimize: bool = False,
        *,
        paddle_dtype: Any = None,
        torch_dtype: Any = None,
        **kwargs: Any,
    ) -> StableDiffusion3Pipeline:
        """Load a diffusers-format SD3 folder or Hub id (``org/name``, fetched through huggingface_hub's
        cache; ``revision=``, ``cache_dir=``, ``token=``, ``local_files_only=`` as in diffusers).

        ``dtype`` (default float32) may also be spelled ``paddle_dtype=`` (PPDiffusers) or
        ``torch_dtype=`` (diffusers). Pass `text_encoder_3=None, tokenizer_3=None` to drop T5; any
        other component may be passed in ready-made instead of loaded (its files are then not
        fetched). `inference_optimize=True` runs the transformer as static programs
        (:meth:`enable_inference_optimize`)."""
        dtype_name = dtype_argument(dtype, paddle_dtype, torch_dtype)
        options = LoadOptions.take(kwargs, "StableDiffusion3Pipeline.from_pretrained")
        components = kwargs
        unknown = sorted(set(components) - set(LIBRARY_CLASSES))
        if unknown:
            raise TypeError(
                f"from_pretrained got unknown argument(s) {unknown}; components it takes: {list(LIBRARY_CLASSES)}"
            )
        wanted = [n for n in LIBRARY_CLASSES if components.get(n, _FROM_FOLDER) is _FROM_FOLDER]
        path = model_folder(pretrained_model_name_or_path, None, options, pipeline_files(wanted))
        index_file = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_file):
            raise FileNotFoundError(
                f"{path!r} is not a diffusers pipeline folder: {index_file} does not exist"
            )
        index = read_json_object(index_file)
        loaded = {}
        for name in LIBRARY_CLASSES:
            given = components.get(name, _FROM_FOLDER)
            if given is not _FROM_FOLDER:
                loaded[name] = given
                continue
            entry = index.get(name)
            if not entry or entry[0] is None or entry[1] is None:
                if name in _OPTIONAL:
                    loaded[name] = None
                    continue
                raise ValueError(f"{index_file} has no `{name}` component, which SD3 needs")
            sub = os.path.join(path, name)
            if not os.path.isdir(sub):
                raise FileNotFoundError(f"model_index.json lists `{name}` but the folder {sub} is missing")
            loaded[name] = _load_component(name, sub, dtype_name)
        return cls._assemble(loaded, index, index_file, inference_optimize)

    @classmethod
    def from_single_file(
        cls,
        path_or_url: str | os.PathLike,
        config: str | os.PathLike | None = None,
        dtype: str | Any = None,
        inference_optimize: bool = False,
        *,
        paddle_dtype: Any = None,
        torch_dtype: Any = None,
        **components: Any,
    ) -> StableDiffusion3Pipeline:
        """Load an original-layout single file (Stability's / ComfyUI's ``sd3_medium*.safetensors``,
        ``sd3.5_*.safetensors``): local path, ``file://`` or fsspec URL.

        The transformer comes from the file, and the VAE and text encoders when it holds them (an
        fp8 T5 is upcast). Everything else (tokenizers always) comes from ``config``, a diffusers
        SD3 folder, whose model configs also fill what the file's keys do not record; without one
        the scheduler is SD3's default. Components may be passed ready-made as in `from_pretrained`
        (``text_encoder_3=None, tokenizer_3=None`` drops T5). ``paddle_dtype=`` / ``torch_dtype=``
        are ``dtype=`` (default float32)."""
        path = os.fspath(path_or_url)
        unknown = sorted(set(components) - set(LIBRARY_CLASSES))
        if unknown:
            raise TypeError(
                f"from_single_file got unknown component(s) {unknown}; known: {list(LIBRARY_CLASSES)}"
            )
        index: dict[str, Any] = {}
        index_file = "model_index.json"
        if config is not None:
            index_file = os.path.join(os.fspath(config), "model_index.json")
            if not os.path.isfile(index_file):
                raise FileNotFoundError(
                    f"config={os.fspath(config)!r} is not a diffusers SD3 pipeline folder: {index_file} does not exist"
                )
            index = read_json_object(index_file)
        dtype_name = dtype_argument(dtype, paddle_dtype, torch_dtype)
        with single_file.open_checkpoint(path) as ckpt:
            loaded = {
                name: components[name]
                if name in components
                else _single_file_component(name, ckpt, config, index, dtype_name)
                for name in LIBRARY_CLASSES
            }
        return cls._assemble(loaded, index, index_file, inference_optimize)

    @classmethod
    def _assemble(
        cls, loaded: dict[str, Any], index: dict[str, Any], index_file: str, inference_optimize: bool
    ) -> StableDiffusion3Pipeline:
        """The pipeline of loaded components, with the folder's defaults (``index``, read from
        ``index_file``) and, when asked, inference_optimize."""
        if (loaded["text_encoder_3"] is None) != (loaded["tokenizer_3"] is None):
            loaded["text_encoder_3"] = loaded["tokenizer_3"] = None  # T5 dropped on one side drops both
        pipe = cls(**loaded)
        pipe.default_max_sequence_length = folder_max_sequence_length(index, index_file)
        pipe.default_guidance_scale = folder_guidance_scale(index, index_file)
        if inference_optimize:
            pipe.enable_inference_optimize()
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the diffusers folder layout (PyTorch layout on disk). The folder appears whole or not at all."""
        target = os.path.abspath(os.fspath(save_directory))
        if os.path.exists(target) and os.listdir(target):
            raise FileExistsError(f"save_pretrained: {target} exists and is not empty")
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".sd3-save-", dir=parent)
        try:
            index: dict[str, Any] = {
                "_class_name": "StableDiffusion3Pipeline",
                "_diffusers_version": "0.42.1",
            }
            for name, component in self.components.items():
                if component is None:
                    index[name] = [None, None]
                    continue
                index[name] = list(LIBRARY_CLASSES[name])
                component.save_pretrained(os.path.join(staging, name))
            if self.default_max_sequence_length != DEFAULT_T5_LENGTH:
                index[MAX_SEQUENCE_LENGTH_KEY] = self.default_max_sequence_length
            if self.default_guidance_scale != DEFAULT_GUIDANCE_SCALE:
                index[GUIDANCE_SCALE_KEY] = self.default_guidance_scale
            index["image_encoder"] = [None, None]
            index["feature_extractor"] = [None, None]
            with open(os.path.join(staging, "model_index.json"), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
            if os.path.exists(target):
                os.rmdir(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the denoising progress bar (tqdm's), e.g. `disable=True`."""
        self._progress_bar_config = dict(kwargs)

    @property
    def dtype(self) -> Any:
        return self.transformer.dtype

    # ------------------------------------------------------------------ prompt encoding
    def _tokenize(self, tokenizer: Any, prompts: list[str], max_length: int, why: str) -> paddle.Tensor:
        batch = tokenizer(prompts, max_length=max_length)
        removed = [r for r in batch.removed if r]
        if removed:
            logger.warning("The following part of your input was truncated because %s: %s", why, removed)
        return paddle.to_tensor(batch.input_ids, dtype="int64")

    def _clip_embeds(
        self, prompts: list[str], index: int, num_images_per_prompt: int, clip_skip: int | None
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        tokenizer = (self.tokenizer, self.tokenizer_2)[index]
        encoder = (self.text_encoder, self.text_encoder_2)[index]
        ids = self._tokenize(
            tokenizer, prompts, self.tokenizer_max_length,
            f"CLIP can only handle sequences up to {self.tokenizer_max_length} tokens",
        )  # fmt: skip
        pooled, hidden_states = encoder(ids)
        depth = 2 if clip_skip is None else clip_skip + 2
        if depth > len(hidden_states):
            raise ValueError(
                f"clip_skip={clip_skip} is larger than the text encoder's {len(hidden_states) - 1} layers"
            )
        embeds = hidden_states[-depth]
        return (
            paddle.repeat_interleave(embeds, num_images_per_prompt, axis=0),
            paddle.repeat_interleave(pooled, num_images_per_prompt, axis=0),
        )

    def _t5_embeds(
        self, prompts: list[str], num_images_per_prompt: int, max_sequence_length: int
    ) -> paddle.Tensor:
        n = len(prompts) * num_images_per_prompt
        if self.text_encoder_3 is None:
            return paddle.zeros(
                [n, max_sequence_length, self.transformer.config.joint_attention_dim],
                dtype=self.text_encoder.dtype,
            )
        ids = self._tokenize(
            self.tokenizer_3,
            prompts,
            max_sequence_length,
            f"`max_sequence_length` is {max_sequence_length} tokens",
        )
        embeds = self.text_encoder_3(ids)
        return paddle.repeat_interleave(embeds, num_images_per_prompt, axis=0)

    def _encode_one_side(
        self,
        prompt: list[str],
        prompt_2: list[str],
        prompt_3: list[str],
        num_images_per_prompt: int,
        clip_skip: int | None,
        max_sequence_length: int,
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        embed_1, pooled_1 = self._clip_embeds(prompt, 0, num_images_per_prompt, clip_skip)
        embed_2, pooled_2 = self._clip_embeds(prompt_2, 1, num_images_per_prompt, clip_skip)
        t5 = self._t5_embeds(prompt_3, num_images_per_prompt, max_sequence_length)
        clip = paddle.concat([embed_1, embed_2.astype(embed_1.dtype)], axis=-1)
        width = t5.shape[-1]
        if clip.shape[-1] > width:
            raise ValueError(
                f"CLIP features ({clip.shape[-1]}) are wider than the T5 / joint attention width ({width}): "
                "the text encoders do not belong to this transformer"
            )
        pad = paddle.zeros([clip.shape[0], clip.shape[1], width - clip.shape[-1]], dtype=clip.dtype)
        clip = paddle.concat([clip, pad], axis=-1)
        embeds = paddle.concat([clip, t5.astype(clip.dtype)], axis=-2)
        pooled = paddle.concat([pooled_1, pooled_2.astype(pooled_1.dtype)], axis=-1)
        return embeds, pooled

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        device: Any = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        prompt_embeds: paddle.Tensor | None = None,
        negative_prompt_embeds: paddle.Tensor | None = None,
        pooled_prompt_embeds: paddle.Tensor | None = None,
        negative_pooled_prompt_embeds: paddle.Tensor | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[paddle.Tensor, paddle.Tensor | None, paddle.Tensor, paddle.Tensor | None]:
        """Returns (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds).

        `device` is accepted for diffusers compatibility; Paddle places tensors on its current device.
        """
        del device
        _, max_sequence_length = self.folder_defaults(max_sequence_length=max_sequence_length)
        prompts = _as_list(prompt, "prompt")
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if prompt_embeds is None:
            p2 = self._match_batch(_as_list(prompt_2, "prompt_2") or prompts, batch_size, "prompt_2")
            p3 = self._match_batch(_as_list(prompt_3, "prompt_3") or prompts, batch_size, "prompt_3")
            prompt_embeds, pooled_prompt_embeds = self._encode_one_side(
                prompts, p2, p3, num_images_per_prompt, clip_skip, max_sequence_length
            )
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            neg = self._match_batch(
                _as_list(negative_prompt, "negative_prompt") or [""], batch_size, "negative_prompt"
            )
            neg_2 = self._match_batch(
                _as_list(negative_prompt_2, "negative_prompt_2") or neg, batch_size, "negative_prompt_2"
            )
            neg_3 = self._match_batch(
                _as_list(negative_prompt_3, "negative_prompt_3") or neg, batch_size, "negative_prompt_3"
            )
            # clip_skip is not applied to the negative side (diffusers does the same).
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_one_side(
                neg, neg_2, neg_3, num_images_per_prompt, None, max_sequence_length
            )
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    @staticmethod
    def _match_batch(values: list[str], batch_size: int, name: str) -> list[str]:
        if len(values) == 1 and batch_size > 1:
            return values * batch_size
        if len(values) != batch_size:
            raise ValueError(
                f"`{name}` has {len(values)} entries but `prompt` has {batch_size}; they must match"
            )
        return values

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
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type={output_type!r} must be one of 'pil', 'np', 'latent'")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("`prompt` is required (or pass `prompt_embeds` and `pooled_prompt_embeds`)")
        if prompt is not None:
            prompts = _as_list(prompt, "prompt")
            if not prompts:
                raise ValueError("`prompt` is an empty list")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` from the same text encoders")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` needs `negative_pooled_prompt_embeds`")
        if (
            prompt_embeds is not None
            and negative_prompt_embeds is not None
            and list(prompt_embeds.shape) != list(negative_prompt_embeds.shape)
        ):
            raise ValueError(
                f"`prompt_embeds` {list(prompt_embeds.shape)} and `negative_prompt_embeds` "
                f"{list(negative_prompt_embeds.shape)} must have the same shape"
            )

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
        if latents is not None:
            if isinstance(latents, np.ndarray):
                latents = paddle.to_tensor(latents)
            if not isinstance(latents, paddle.Tensor):
                raise TypeError(
                    f"`latents` must be a numpy array or a paddle Tensor, got {type(latents).__name__}"
                )
            if list(latents.shape) != shape:
                raise ValueError(f"`latents` has shape {list(latents.shape)}, expected {shape}")
            return latents.astype("float32")
        if generator is not None and seed is not None:
            raise ValueError("pass either `generator` or `seed`, not both")
        name = "generator" if generator is not None else "seed"
        source = generator_seeds(generator) if generator is not None else seed
        if isinstance(source, (list, tuple)):
            if len(source) != batch_size:
                raise ValueError(
                    f"got {len(source)} seeds/generators for a batch of {batch_size} images "
                    "(batch = len(prompt) x num_images_per_prompt)"
                )
            rngs = [_numpy_rng(s, f"{name}[{i}]") for i, s in enumerate(source)]
            array = np.stack([rng.standard_normal(shape[1:], dtype=np.float32) for rng in rngs])
        else:
            array = _numpy_rng(source, name).standard_normal(shape, dtype=np.float32)
        return paddle.to_tensor(array)

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
        output_type: str = "pil",
        return_dict: bool = True,
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
        and 256 unless its model_index.json declares others)."""
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        guidance_scale, max_sequence_length = self.folder_defaults(guidance_scale, max_sequence_length)
        # 1. check inputs
        self.check_inputs(
            prompt, height, width, num_inference_steps, num_images_per_prompt, max_sequence_length,
            prompt_embeds, pooled_prompt_embeds, negative_prompt, negative_prompt_embeds,
            negative_pooled_prompt_embeds, output_type,
        )  # fmt: skip
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
        do_cfg = guidance_scale > 1
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
        # 3. prepare latents
        latents = self.prepare_latents(cond_embeds.shape[0], height, width, generator, seed, latents)
        # 4. timesteps
        if mu is None and self.scheduler.config.get("use_dynamic_shifting"):
            tokens = (latents.shape[2] // self.patch_size) * (latents.shape[3] // self.patch_size)
            mu = self.scheduler.mu_for_image_seq_len(tokens)
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        else:
            self.scheduler.set_timesteps(num_inference_steps, mu=mu)
        timesteps = self.scheduler.timesteps
        num_steps = int(timesteps.shape[0])
        # 5. denoising loop
        if self.stage_timer is not None:
            self.stage_timer.steps += num_steps
        with self._stage("denoising"), tqdm(total=num_steps, **self._progress_bar_config) as progress:
            for i in range(num_steps):
                t = timesteps[i : i + 1]
                model_input = paddle.concat([latents, latents]) if do_cfg else latents
                noise_pred = self._velocity(model_input, embeds, pooled_all, t)
                if do_cfg:
                    uncond, text = paddle.chunk(noise_pred, 2)
                    noise_pred = uncond + guidance_scale * (text - uncond)
                    slg_active = (
                        num_steps * skip_layer_guidance_start < i < num_steps * skip_layer_guidance_stop
                    )
                    if skip_guidance_layers is not None and slg_active:
                        skipped = self._velocity(latents, cond_embeds, cond_pooled, t, skip_guidance_layers)
                        noise_pred = noise_pred + (text - skipped) * skip_layer_guidance_scale
                latents = self.scheduler.step(noise_pred, t, latents, step_index=i)
                if callback_on_step_end is not None:
                    values = {"latents": latents, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled_all}
                    wanted = {k: values[k] for k in callback_on_step_end_tensor_inputs}
                    returned = callback_on_step_end(self, i, t, wanted) or {}
                    latents = returned.get("latents", latents)
                progress.update()
        # 6. decode and postprocess
        if output_type == "latent":
            images: Any = latents
        else:
            with self._stage("vae_decode"):
                images = self.decode_latents(latents, output_type)
        return StableDiffusion3PipelineOutput(images=images) if return_dict else (images,)

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
            paddle.expand(t, [latents.shape[0]]), skip_layers=skip_layers,
        )  # fmt: skip
        return velocity.astype("float32")

    def decode_latents(self, latents: paddle.Tensor, output_type: str = "np") -> Any:
        """Latents -> NHWC float images in [0, 1] ("np") or PIL images ("pil")."""
        config = self.vae.config
        z = latents.astype(self.vae.dtype) / config.scaling_factor + config.shift_factor
        decoded = self.vae.decode(z)
        images = paddle.clip(decoded.astype("float32") / 2 + 0.5, 0.0, 1.0)
        array = images.transpose([0, 2, 3, 1]).numpy()
        if output_type == "np":
            return array
        return [Image.fromarray(image) for image in (array * 255).round().astype(np.uint8)]
