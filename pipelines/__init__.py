"""User-facing pipelines built on sd3_core."""

import sd3_core.runtime  # noqa: F401  (thread/MKL settings must precede paddle's import)

from pipelines.stable_diffusion_3 import StableDiffusion3Pipeline, StableDiffusion3PipelineOutput

__all__ = ["StableDiffusion3Pipeline", "StableDiffusion3PipelineOutput"]


def __getattr__(name: str):
    if name == "ParallelStableDiffusion3Pipeline":  # Ray-driven: it lives with the actors
        raise ImportError(
            "ParallelStableDiffusion3Pipeline runs on Ray actors; write "
            "`from actors import ParallelStableDiffusion3Pipeline`"
        )
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
