"""The per-image fields of a generation request, declared once.

Each :class:`GenerationField` says what one input of an image is: its name (the prompt-table
column, the manifest column and the pipeline argument), Arrow type, job default, limits, how it
falls back to other fields, whether one pipeline call shares it, and its command-line flag. The
batch job derives from :data:`GENERATION_FIELDS` its defaults (``JobDefaults``), work rows and
their schema, the manifest schema, the replica's request, the ``sd3 generate`` flags and the
per-row validation; adding a field is one line here plus its use in the pipeline call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from sd3_core.folder_defaults import MAX_T5_LENGTH

__all__ = [
    "GENERATION_FIELDS",
    "MAX_SEED",
    "SIZE_MULTIPLE",
    "GenerationField",
    "call_key",
    "field_names",
    "image_fields",
    "rendered_value",
    "shared_fields",
]

MAX_SEED = 2**63 - 1
SIZE_MULTIPLE = 16  # VAE factor 8 x transformer patch 2
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class GenerationField:
    """One input of an image.

    ``kind`` is "text", "int" or "float"; ``default`` the job-level default (None: the model's,
    or for ``seed`` one derived from the job seed and the row id); ``minimum``/``maximum``
    inclusive limits and ``multiple_of`` a step, checked for every row (``maximum_from``: the
    name of a job limit, e.g. ``max_size``, that caps it too); ``fallback`` the fields whose value
    is used, in order, when this one is null when rendering (``""`` last: the empty string);
    ``shared``: one pipeline call renders only images that agree on it; ``splits_calls``: one
    call's images all have it or all lack it (its value varies per image); ``nonempty``: a text
    that may be null but not blank; ``above``: a float's
    exclusive lower limit; ``needs``: the field it is meaningless without; ``per_row``: a count the
    job expands into images, not an input of one (not a pipeline argument, not a manifest
    column); ``flags``: its ``sd3 generate`` spellings (none: not a job-level flag)."""

    name: str
    kind: str
    arrow: pa.DataType
    help: str
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None
    multiple_of: int | None = None
    maximum_from: str | None = None
    fallback: tuple[str, ...] = ()
    shared: bool = False
    splits_calls: bool = False
    nonempty: bool = False
    above: float | None = None
    needs: str | None = None
    per_row: bool = False
    flags: tuple[str, ...] = ()

    def problem(self, value: Any, limits: dict[str, int]) -> str | None:
        """Why ``value`` (already parsed, not None) is not allowed, as ``"name: reason"``; or None."""
        if self.kind == "float":
            if not math.isfinite(value):
                return f"{self.name}: {value} is not finite"
            if self.above is not None and not value > self.above:
                return f"{self.name}: {value} is not > {self.above:g}"
            if self.maximum is not None and value > self.maximum:
                return f"{self.name}: {value} exceeds {self.maximum:g}"
            return None
        if self.kind == "text":
            return f"{self.name}: empty" if self.nonempty and not value.strip() else None
        if self.kind != "int":
            return None
        if self.multiple_of is not None and (value < self.multiple_of or value % self.multiple_of):
            return f"{self.name}: {value} is not a positive multiple of {self.multiple_of}"
        ranged = self.minimum is not None and self.maximum is not None and self.maximum < _INT32_MAX
        if ranged and not self.minimum <= value <= self.maximum:
            return f"{self.name}: {value} is not in {self.minimum}..{self.maximum}"
        if self.minimum is not None and value < self.minimum:
            return f"{self.name}: {value} is < {self.minimum}"
        if self.maximum is not None and value > self.maximum:
            return f"{self.name}: {value} exceeds {self.maximum}"
        cap = limits.get(self.maximum_from) if self.maximum_from else None
        if cap is not None and value > cap:
            return f"{self.name}: {value} exceeds the job limit {cap}"
        return None


def _text(
    name: str, help: str, fallback: tuple[str, ...] = (), flags: tuple[str, ...] = ()
) -> GenerationField:
    return GenerationField(name, "text", pa.string(), help, fallback=fallback, flags=flags)


# fmt: off
GENERATION_FIELDS: tuple[GenerationField, ...] = (
    _text("prompt", "the prompt (CLIP-L; and CLIP-G and T5 unless prompt_2/prompt_3 say otherwise)"),
    _text("prompt_2", "CLIP-G prompt (default: the prompt)", ("prompt",), ("--prompt-2",)),
    _text("prompt_3", "T5 prompt (default: the prompt)", ("prompt",), ("--prompt-3",)),
    _text("negative_prompt", "negative prompt (default: none)", ("",), ("--negative-prompt",)),
    _text("negative_prompt_2", "CLIP-G negative prompt (default: the negative prompt)", ("negative_prompt", ""), ("--negative-prompt-2",)),
    _text("negative_prompt_3", "T5 negative prompt (default: the negative prompt)", ("negative_prompt", ""), ("--negative-prompt-3",)),
    GenerationField("seed", "int", pa.int64(), "the seed of the row's first image (image k: seed + k)", minimum=0, maximum=MAX_SEED),
    GenerationField("height", "int", pa.int32(), "image height (default: the model's size)", multiple_of=SIZE_MULTIPLE, maximum_from="max_size", shared=True, flags=("--height",)),
    GenerationField("width", "int", pa.int32(), "image width (default: the model's size)", multiple_of=SIZE_MULTIPLE, maximum_from="max_size", shared=True, flags=("--width",)),
    GenerationField("num_inference_steps", "int", pa.int32(), "denoising steps (default 28)", default=28, minimum=1, maximum=_INT32_MAX, shared=True, flags=("--steps", "--num-inference-steps", "--num_inference_steps")),
    GenerationField("guidance_scale", "float", pa.float64(), "classifier-free guidance (default: the model folder's _guidance_scale, else 7.0)", shared=True, flags=("--guidance-scale",)),
    GenerationField("max_sequence_length", "int", pa.int32(), f"T5 tokens (<= {MAX_T5_LENGTH}; default: the model folder's _max_sequence_length, else 256)", minimum=1, maximum=MAX_T5_LENGTH, shared=True, flags=("--max-sequence-length",)),
    GenerationField("init_image", "text", pa.string(), "picture to start from, a path or fsspec URL (image to image; default: none, text to image)", splits_calls=True, nonempty=True, flags=("--init-image",)),
    GenerationField("strength", "float", pa.float64(), "how much of init_image is redrawn, in (0, 1] (default 0.6)", above=0.0, maximum=1, needs="init_image", shared=True, flags=("--strength",)),
    GenerationField("num_images", "int", pa.int32(), "images per prompt (default 1)", default=1, minimum=1, maximum_from="max_num_images", per_row=True, flags=("--num-images",)),
)
# fmt: on


def field_names() -> tuple[str, ...]:
    """Every field's name, in declaration order (the prompt-table columns the job reads)."""
    return tuple(f.name for f in GENERATION_FIELDS)


def image_fields() -> tuple[GenerationField, ...]:
    """The inputs of one image: the pipeline's arguments and the manifest's columns."""
    return tuple(f for f in GENERATION_FIELDS if not f.per_row)


def rendered_value(values: Mapping[str, Any], f: GenerationField) -> Any:
    """``values[f.name]``, or when it is null the first non-null of its ``fallback`` (``""``: the
    empty string): what the pipeline is given."""
    value = values[f.name]
    for other in f.fallback:
        if value is not None:
            break
        value = "" if other == "" else values[other]
    return value


def shared_fields() -> tuple[str, ...]:
    """The fields one pipeline call's images share (the rest vary per image)."""
    return tuple(f.name for f in GENERATION_FIELDS if f.shared)


def call_key(values: Mapping[str, Any]) -> tuple:
    """Images with equal keys can share one pipeline call: their ``shared`` fields agree and each
    ``splits_calls`` field is given for all or for none."""
    shared = tuple(values[f.name] for f in GENERATION_FIELDS if f.shared)
    return shared + tuple(values[f.name] is not None for f in GENERATION_FIELDS if f.splits_calls)
