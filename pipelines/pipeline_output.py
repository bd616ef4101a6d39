"""What a pipeline call returns with ``return_dict=True`` (diffusers' name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sd3_core.outputs import BaseOutput

__all__ = ["StableDiffusion3PipelineOutput"]


@dataclass
class StableDiffusion3PipelineOutput(BaseOutput):
    """`images`: a list of PIL images, an NHWC float array in [0, 1], or latents (`out[0]` too)."""

    images: Any
