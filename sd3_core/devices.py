"""Device names: what users write (Paddle's ``gpu:0``, torch's ``cuda:0``, a Paddle place) and
the Paddle device it means, and whether this Paddle build can use it.

Importing this module does not import Paddle: a training process sets its NPU flags from it
before Paddle loads (``pipelines.training.devices``).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["DEVICE_KINDS", "layer_device", "paddle_device", "require_device"]

#: The kinds of device a pipeline, a replica or a training run computes on.
DEVICE_KINDS = ("cpu", "gpu", "npu")
# Other ecosystems' names for a kind (torch calls an NVIDIA GPU "cuda").
_KIND_ALIASES = {"cuda": "gpu"}
_PLACE = re.compile(r"^(?:Place|CUDAPlace|CustomPlace)\((.*)\)$")


def paddle_device(device: Any) -> str:
    """Paddle's device name (``"cpu"``, ``"gpu:N"``, ``"npu:N"``) for ``device``: a kind
    (``"gpu"``: device 0, the first the process sees), ``"gpu:1"``, torch's ``"cuda"`` /
    ``"cuda:1"`` or a ``torch.device`` (by its text; torch is never imported), or a Paddle place."""
    text = str(device).strip()
    place = _PLACE.match(text)
    if place:
        text = place.group(1).replace(", ", ":")
    kind, _, index = text.lower().partition(":")
    kind = _KIND_ALIASES.get(kind, kind)
    if kind not in DEVICE_KINDS or (index and not index.isdigit()):
        raise ValueError(
            f"device={device!r} is not a device here; use 'cpu', 'gpu' or 'gpu:N' (torch's 'cuda', "
            "'cuda:N'), or 'npu' / 'npu:N'"
        )
    return "cpu" if kind == "cpu" else f"{kind}:{int(index or 0)}"


def layer_device(layer: Any) -> str:
    """The device a Paddle layer's weights are on (a :func:`paddle_device` name; "cpu" for a
    layer without weights)."""
    for param in layer.parameters():
        return paddle_device(param.place)
    return "cpu"


def require_device(name: str) -> None:
    """Raise a RuntimeError saying what to install or write when this Paddle build cannot
    compute on ``name`` (a :func:`paddle_device` name)."""
    import paddle

    kind, _, index = name.partition(":")
    if kind == "gpu":
        if not paddle.is_compiled_with_cuda():
            raise RuntimeError(
                f"device {name!r}: this Paddle is the CPU build (paddle.is_compiled_with_cuda() is "
                "False); install paddlepaddle-gpu (README, 'GPU') or use 'cpu'"
            )
        count = paddle.device.cuda.device_count()
        if int(index) >= count:
            raise RuntimeError(f"device {name!r}: this process sees {count} GPU(s) (CUDA_VISIBLE_DEVICES)")
    elif kind == "npu" and "npu" not in paddle.device.get_all_custom_device_type():
        raise RuntimeError(
            f"device {name!r}: this Paddle has no 'npu' custom device; install PaddleCustomDevice's "
            "NPU plugin (paddle-custom-npu) on the NPU nodes"
        )
