"""User-facing pipelines built on sd3_core."""

import sd3_core.runtime  # noqa: F401  (thread/MKL settings must precede paddle's import)

from pipelines.parallel_pipeline import ParallelStableDiffusion3Pipeline
from pipelines.stable_diffusion_3 import StableDiffusion3Pipeline, StableDiffusion3PipelineOutput

__all__ = ["ParallelStableDiffusion3Pipeline", "StableDiffusion3Pipeline", "StableDiffusion3PipelineOutput"]
