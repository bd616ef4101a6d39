"""Ray actors: model replicas, tensor-parallel shard workers, the Ray-driven parallel pipeline."""

__all__ = ["ParallelStableDiffusion3Pipeline"]


def __getattr__(name: str):
    # Resolved on first use: it loads Paddle and the pipelines, which drivers of the batch job
    # (importing actors.replica) never need.
    if name == "ParallelStableDiffusion3Pipeline":
        from actors.parallel_pipeline import ParallelStableDiffusion3Pipeline

        return ParallelStableDiffusion3Pipeline
    raise AttributeError(f"module 'actors' has no attribute {name!r}")
