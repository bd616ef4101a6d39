"""Loading and saving the components of an SD3 pipeline.

From a diffusers folder or Hub id (``from_pretrained``), from an original-layout single file plus
an optional config folder (``from_single_file``), and back to the diffusers layout
(``save_pretrained``): ``PipelineLoadingMixin`` gives ``StableDiffusion3Pipeline`` these methods.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, Self

from sd3_core import single_file
from sd3_core.clip_text_encoder import clip_text_encoder_from_weights, load_clip_text_encoder
from sd3_core.dtypes import dtype_argument
from sd3_core.folder_defaults import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_T5_LENGTH,
    GUIDANCE_SCALE_KEY,
    MAX_SEQUENCE_LENGTH_KEY,
    folder_guidance_scale,
    folder_max_sequence_length,
)
from sd3_core.folder_layout import LIBRARY_CLASSES, pipeline_files
from sd3_core.hub import LoadOptions, model_folder
from sd3_core.model_config import read_json_object
from sd3_core.scheduler import FlowMatchEulerDiscreteScheduler
from sd3_core.t5_encoder import load_t5_encoder, t5_encoder_from_weights
from sd3_core.tokenizer_loading import load_clip_tokenizer, load_t5_tokenizer
from sd3_core.transformer import SD3Transformer2DModel
from sd3_core.vae import AutoencoderKL

__all__ = ["TEXT_COMPONENTS", "PipelineLoadingMixin"]

#: What the loaders return: ``(components by name, model_index.json's entries, its path)``.
Loaded = tuple[dict[str, Any], dict[str, Any], str]

_FROM_FOLDER = object()  # sentinel: "load this component from the pipeline folder"

_OPTIONAL = ("text_encoder_3", "tokenizer_3")
# The components only prompt encoding needs (a rank that receives its embeddings can go without).
TEXT_COMPONENTS = tuple(name for name in LIBRARY_CLASSES if name.startswith(("text_encoder", "tokenizer")))


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


def _folder_components(
    pretrained_model_name_or_path: str | os.PathLike,
    dtype: str,
    options: LoadOptions,
    components: Mapping[str, Any],
) -> Loaded:
    """``(components, model_index, model_index_file)`` of a diffusers folder or Hub id; the
    ``components`` given are used as they are (and not fetched), the rest loaded in ``dtype``."""
    unknown = sorted(set(components) - set(LIBRARY_CLASSES))
    if unknown:
        raise TypeError(
            f"from_pretrained got unknown argument(s) {unknown}; components it takes: {list(LIBRARY_CLASSES)}"
        )
    wanted = [n for n in LIBRARY_CLASSES if components.get(n, _FROM_FOLDER) is _FROM_FOLDER]
    path = model_folder(pretrained_model_name_or_path, None, options, pipeline_files(wanted))
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"{path!r} is not a diffusers pipeline folder: {index_file} does not exist")
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
        loaded[name] = _load_component(name, sub, dtype)
    return loaded, index, index_file


def _single_file_components(
    path: str,
    config: str | os.PathLike | None,
    dtype: str,
    components: Mapping[str, Any],
) -> Loaded:
    """``(components, model_index, model_index_file)`` of an original-layout single file, what it
    lacks from the ``config`` folder; the ``components`` given are used as they are."""
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
    with single_file.open_checkpoint(path) as ckpt:
        loaded = {
            name: components[name]
            if name in components
            else _single_file_component(name, ckpt, config, index, dtype)
            for name in LIBRARY_CLASSES
        }
    return loaded, index, index_file


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


def _save_components(
    components: Mapping[str, Any],
    save_directory: str | os.PathLike,
    max_sequence_length: int,
    guidance_scale: float,
) -> None:
    """Write ``components`` in the diffusers folder layout (PyTorch layout on disk), with the
    folder defaults that differ from SD3's. The folder appears whole or not at all."""
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
        for name, component in components.items():
            if component is None:
                index[name] = [None, None]
                continue
            index[name] = list(LIBRARY_CLASSES[name])
            component.save_pretrained(os.path.join(staging, name))
        if max_sequence_length != DEFAULT_T5_LENGTH:
            index[MAX_SEQUENCE_LENGTH_KEY] = max_sequence_length
        if guidance_scale != DEFAULT_GUIDANCE_SCALE:
            index[GUIDANCE_SCALE_KEY] = guidance_scale
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


class PipelineLoadingMixin:
    """Mixed into :class:`StableDiffusion3Pipeline`: its diffusers loading and saving methods.

    Needs the pipeline's components as attributes (``LIBRARY_CLASSES``), its folder defaults and
    ``enable_inference_optimize``."""

    default_max_sequence_length: int
    default_guidance_scale: float

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
    ) -> Self:
        """Load a diffusers-format SD3 folder or Hub id (``org/name``, fetched through huggingface_hub's
        cache; ``revision=``, ``cache_dir=``, ``token=``, ``local_files_only=`` as in diffusers).

        ``dtype`` (default float32) may also be spelled ``paddle_dtype=`` (PPDiffusers) or
        ``torch_dtype=`` (diffusers). Pass `text_encoder_3=None, tokenizer_3=None` to drop T5; any
        other component may be passed in ready-made instead of loaded (its files are then not
        fetched). `inference_optimize=True` runs the transformer as static programs
        (:meth:`enable_inference_optimize`)."""
        dtype_name = dtype_argument(dtype, paddle_dtype, torch_dtype)
        options = LoadOptions.take(kwargs, "StableDiffusion3Pipeline.from_pretrained")
        loaded, index, index_file = _folder_components(
            pretrained_model_name_or_path, dtype_name, options, kwargs
        )
        return cls._assemble(loaded, index, index_file, inference_optimize)

    @classmethod
    def from_pipe(cls, pipeline: Any, **components: Any) -> Self:
        """A ``cls`` pipeline sharing ``pipeline``'s models, not copying them (diffusers' method,
        e.g. ``StableDiffusion3Img2ImgPipeline.from_pipe(pipe)``); ``components`` given replace its
        own. The folder defaults, the progress-bar setting and, for the same transformer, the
        inference-optimize program come along."""
        unknown = sorted(set(components) - set(LIBRARY_CLASSES))
        if unknown:
            raise TypeError(
                f"from_pipe: {unknown} are not components (those are {', '.join(LIBRARY_CLASSES)})"
            )
        pipe = cls(**{**pipeline.components, **components})
        pipe.default_max_sequence_length = pipeline.default_max_sequence_length
        pipe.default_guidance_scale = pipeline.default_guidance_scale
        pipe.set_progress_bar_config(**pipeline._progress_bar_config)
        if pipe.transformer is pipeline.transformer:
            pipe.transformer_program = pipeline.transformer_program
        return pipe

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
    ) -> Self:
        """Load an original-layout single file (Stability's / ComfyUI's ``sd3_medium*.safetensors``,
        ``sd3.5_*.safetensors``): local path, ``file://`` or fsspec URL.

        The transformer comes from the file, and the VAE and text encoders when it holds them (an
        fp8 T5 is upcast). Everything else (tokenizers always) comes from ``config``, a diffusers
        SD3 folder, whose model configs also fill what the file's keys do not record; without one
        the scheduler is SD3's default. Components may be passed ready-made as in `from_pretrained`
        (``text_encoder_3=None, tokenizer_3=None`` drops T5). ``paddle_dtype=`` / ``torch_dtype=``
        are ``dtype=`` (default float32)."""
        dtype_name = dtype_argument(dtype, paddle_dtype, torch_dtype)
        loaded, index, index_file = _single_file_components(
            os.fspath(path_or_url), config, dtype_name, components
        )
        return cls._assemble(loaded, index, index_file, inference_optimize)

    @classmethod
    def _assemble(
        cls, loaded: dict[str, Any], index: dict[str, Any], index_file: str, inference_optimize: bool
    ) -> Self:
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
        _save_components(
            self.components, save_directory, self.default_max_sequence_length, self.default_guidance_scale
        )
