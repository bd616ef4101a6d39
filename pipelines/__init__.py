"""User-facing pipelines built on sd3_core: text-to-image, image-to-image, and training
(`pipelines.training`)."""

__all__ = ["StableDiffusion3Img2ImgPipeline", "StableDiffusion3Pipeline", "StableDiffusion3PipelineOutput"]


def __getattr__(name: str):
    # Resolved on first use: it loads Paddle, which importing pipelines.training.config or
    # .devices must not (the NPU flags have to be in the environment before Paddle loads).
    if name == "StableDiffusion3Img2ImgPipeline":
        from pipelines import stable_diffusion_3_img2img

        return stable_diffusion_3_img2img.StableDiffusion3Img2ImgPipeline
    if name in __all__:
        from pipelines import stable_diffusion_3

        return getattr(stable_diffusion_3, name)
    if name == "ParallelStableDiffusion3Pipeline":  # Ray-driven: it lives with the actors
        raise ImportError(
            "ParallelStableDiffusion3Pipeline runs on Ray actors; write "
            "`from actors import ParallelStableDiffusion3Pipeline`"
        )
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
