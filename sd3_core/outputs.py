"""diffusers' output objects and its ``return_dict`` convention for the components.

A component call returns what diffusers' returns: by default (``return_dict=True``) diffusers'
output object (``.sample``, ``.latent_dist``, ``.prev_sample``), with ``return_dict=False`` its
tuple, so ``vae.decode(z).sample`` and ``vae.decode(z, return_dict=False)[0]`` both read as in
diffusers. Code here takes the second form, as diffusers' own pipelines do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AutoencoderKLOutput",
    "BaseOutput",
    "DecoderOutput",
    "FlowMatchEulerDiscreteSchedulerOutput",
    "Transformer2DModelOutput",
    "component_return",
]


class BaseOutput:
    """diffusers' ``BaseOutput`` on a dataclass: fields by attribute, by name (``out["sample"]``)
    or by position among those that are not None (``out[0]``), and ``to_tuple()``."""

    def to_tuple(self) -> tuple[Any, ...]:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return tuple(v for v in values if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class Transformer2DModelOutput(BaseOutput):
    """What ``SD3Transformer2DModel(..., return_dict=True)`` returns: the velocity."""

    sample: Any


@dataclass
class DecoderOutput(BaseOutput):
    """What ``AutoencoderKL.decode(z, return_dict=True)`` returns: the images."""

    sample: Any


@dataclass
class AutoencoderKLOutput(BaseOutput):
    """What ``AutoencoderKL.encode(x, return_dict=True)`` returns: the posterior."""

    latent_dist: Any


@dataclass
class FlowMatchEulerDiscreteSchedulerOutput(BaseOutput):
    """What ``FlowMatchEulerDiscreteScheduler.step(..., return_dict=True)`` returns."""

    prev_sample: Any


def component_return(output: BaseOutput, return_dict: bool) -> Any:
    """``output`` for ``return_dict=True``, its tuple for False (see the module docstring)."""
    if not isinstance(return_dict, bool):
        raise TypeError(f"return_dict={return_dict!r} must be True or False")
    return output if return_dict else output.to_tuple()
