"""The diffusers folder layout of an SD3 pipeline: its components and the files loading reads.

``LIBRARY_CLASSES`` are the ``model_index.json`` entries as diffusers writes them;
``pipeline_files`` the patterns (relative to the folder, as Hub downloads take them) that
``StableDiffusion3Pipeline.from_pretrained`` reads for a set of components.
"""

from __future__ import annotations

from collections.abc import Sequence

from sd3_core.scheduler import FlowMatchEulerDiscreteScheduler
from sd3_core.text_encoder_folder import ENCODER_FILES
from sd3_core.tokenizer_loading import TOKENIZER_FILES
from sd3_core.transformer import SD3Transformer2DModel
from sd3_core.vae import AutoencoderKL

__all__ = ["LIBRARY_CLASSES", "component_files", "pipeline_files"]

# model_index.json entries, as diffusers writes them for this pipeline.
LIBRARY_CLASSES = {
    "transformer": ("diffusers", "SD3Transformer2DModel"),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
    "tokenizer_3": ("transformers", "T5TokenizerFast"),
}


def component_files(name: str) -> list[str]:
    """The files loading component `name` reads from its folder (patterns, as Hub downloads take them)."""
    if name == "transformer":
        return SD3Transformer2DModel.hub_files()
    if name == "vae":
        return AutoencoderKL.hub_files()
    if name == "scheduler":
        return [FlowMatchEulerDiscreteScheduler.config_name]
    if name.startswith("text_encoder"):
        return list(ENCODER_FILES)
    return list(TOKENIZER_FILES)


def pipeline_files(components: Sequence[str] = tuple(LIBRARY_CLASSES)) -> list[str]:
    """The files ``from_pretrained`` reads to load `components` (patterns relative to the model
    folder, as Hub downloads take them)."""
    return ["model_index.json", *(f"{n}/{f}" for n in components for f in component_files(n))]
