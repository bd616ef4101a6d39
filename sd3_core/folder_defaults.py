"""Call defaults a model folder may declare for itself (no paddle: the batch job's driver reads them).

``model_index.json`` may carry ``_max_sequence_length``, the T5 length the model was trained at
(a private key, so diffusers loads the folder unchanged). Sampling at another length changes the
text tokens the transformer attends to: a model trained at 32 tokens loses its prompt adherence at
the usual 256. It may also carry ``_guidance_scale``, the classifier-free guidance the model samples
best at (diffusers' 7.0 suits SD3; SD3.5 and small models want less).
"""

from __future__ import annotations

import math
from typing import Any

MAX_T5_LENGTH = 512
DEFAULT_T5_LENGTH = 256  # diffusers' default max_sequence_length
MAX_SEQUENCE_LENGTH_KEY = "_max_sequence_length"
DEFAULT_GUIDANCE_SCALE = 7.0  # diffusers' default guidance_scale
MAX_GUIDANCE_SCALE = 100.0
GUIDANCE_SCALE_KEY = "_guidance_scale"


def folder_max_sequence_length(index: dict[str, Any], where: str = "model_index.json") -> int:
    """The default T5 length a folder's model_index.json declares, else diffusers' 256."""
    value = index.get(MAX_SEQUENCE_LENGTH_KEY, DEFAULT_T5_LENGTH)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_T5_LENGTH:
        raise ValueError(
            f"{where}: {MAX_SEQUENCE_LENGTH_KEY}={value!r} must be an integer in [1, {MAX_T5_LENGTH}]"
        )
    return value


def folder_guidance_scale(index: dict[str, Any], where: str = "model_index.json") -> float:
    """The default guidance scale a folder's model_index.json declares, else diffusers' 7.0."""
    value = index.get(GUIDANCE_SCALE_KEY, DEFAULT_GUIDANCE_SCALE)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_GUIDANCE_SCALE
    ):
        raise ValueError(
            f"{where}: {GUIDANCE_SCALE_KEY}={value!r} must be a number in [0, {MAX_GUIDANCE_SCALE:g}]"
        )
    return float(value)
