"""The initial latents of a call, drawn with NumPy from ``seed`` / ``generator``.

NumPy draws the same numbers on every device, so a seed gives the same image on CPU and GPU
and whatever the batch it is rendered in; paddle / torch Generators stand for their seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle

__all__ = ["generator_seeds", "initial_latents", "standard_normal_draws"]


def _is_framework_generator(value: Any) -> bool:
    """A ``paddle.Generator`` or a ``torch.Generator`` (recognised by its class; torch is never imported)."""
    kind = type(value)
    return isinstance(value, paddle.base.core.Generator) or (
        kind.__name__ == "Generator" and kind.__module__.split(".")[0] == "torch"
    )


def generator_seeds(generator: Any) -> Any:
    """`generator` with each paddle / torch Generator replaced by its ``initial_seed()``.

    Latents are drawn with NumPy (the same on every device), so such a generator stands for its seed:
    ``paddle.Generator().manual_seed(42)`` draws what ``seed=42`` draws, every time (its state is
    neither read nor advanced). NumPy generators and ints pass through unchanged."""
    items = generator if isinstance(generator, (list, tuple)) else [generator]
    framework = [g for g in items if _is_framework_generator(g)]
    if len({id(g) for g in framework}) < len(framework):
        raise ValueError(
            "`generator` lists the same Generator object more than once: paddle.Generator() returns the "
            "device's one default generator, so `[paddle.Generator().manual_seed(i) for i in ...]` re-seeds "
            "that one object; pass `seed=[...]` (one int per image) instead"
        )
    seeds = [int(g.initial_seed()) if _is_framework_generator(g) else g for g in items]
    return seeds if isinstance(generator, (list, tuple)) else seeds[0]


def _numpy_rng(value: Any, name: str) -> np.random.Generator:
    """The NumPy generator for one `seed` / `generator` value (a NumPy generator, an int >= 0, or
    None: fresh entropy)."""
    if isinstance(value, np.random.Generator):
        return value
    if value is None:
        return np.random.default_rng()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return np.random.default_rng(int(value))
    raise TypeError(
        f"`{name}` must be an int >= 0, a numpy.random.Generator or a paddle.Generator "
        f"(or a list of them, one per image), got {value!r}"
    )


def initial_latents(
    shape: list[int],
    generator: Any = None,
    seed: int | Sequence[int] | None = None,
    latents: Any = None,
) -> paddle.Tensor:
    """Float32 latents of ``shape`` ``[B, C, h, w]``: ``latents`` checked and cast, else standard
    normal draws from ``seed`` / ``generator`` (one value: one draw for the batch; a list: one per
    image)."""
    if latents is not None:
        if isinstance(latents, np.ndarray):
            latents = paddle.to_tensor(latents)
        if not isinstance(latents, paddle.Tensor):
            raise TypeError(
                f"`latents` must be a numpy array or a paddle Tensor, got {type(latents).__name__}"
            )
        if list(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {list(latents.shape)}, expected {shape}")
        return latents.astype("float32")
    return standard_normal_draws(shape, generator, seed)[0]


def standard_normal_draws(
    shape: list[int], generator: Any = None, seed: int | Sequence[int] | None = None, count: int = 1
) -> list[paddle.Tensor]:
    """``count`` float32 standard-normal tensors of ``shape`` ``[B, ...]``, drawn one after the other
    from ``seed`` / ``generator`` (one value: for the whole batch; a list: one per image). The first
    is what :func:`initial_latents` draws."""
    batch_size = shape[0]
    if generator is not None and seed is not None:
        raise ValueError("pass either `generator` or `seed`, not both")
    name = "generator" if generator is not None else "seed"
    source = generator_seeds(generator) if generator is not None else seed
    if isinstance(source, (list, tuple)):
        if len(source) != batch_size:
            raise ValueError(
                f"got {len(source)} seeds/generators for a batch of {batch_size} images "
                "(batch = len(prompt) x num_images_per_prompt)"
            )
        rngs = [_numpy_rng(s, f"{name}[{i}]") for i, s in enumerate(source)]
        per_image = [[rng.standard_normal(shape[1:], dtype=np.float32) for _ in range(count)] for rng in rngs]
        arrays = [np.stack([draws[k] for draws in per_image]) for k in range(count)]
    else:
        rng = _numpy_rng(source, name)
        arrays = [rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]
    return [paddle.to_tensor(array) for array in arrays]
