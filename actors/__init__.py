"""Ray actors: model replicas, tensor-parallel shard workers, the training actor."""

import sd3_core.runtime  # noqa: F401  (thread/MKL settings must precede paddle's import)
