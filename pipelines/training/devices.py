"""Which device a training process computes on, and the settings that device needs.

Kept free of a Paddle import: the NPU flags must be in the environment before Paddle loads.
"""

from __future__ import annotations

import os

from sd3_core.devices import DEVICE_KINDS, paddle_device, require_device

# PaddleMIX's SD3 DreamBooth instructions for Ascend NPUs (ppdiffusers/examples/dreambooth/README_sd3.md).
NPU_FLAGS = {
    "FLAGS_npu_storage_format": "0",
    "FLAGS_use_stride_kernel": "0",
    "FLAGS_npu_scale_aclnn": "True",
    "FLAGS_allocator_strategy": "auto_growth",
}
# Tests run the math on CPU inside an actor that holds a logical GPU/NPU resource.
DEVICE_OVERRIDE_ENV = "SD3_TRAIN_PADDLE_DEVICE"


def apply_npu_flags() -> None:
    """Put the NPU flags into this process's environment (a value the user set wins)."""
    for key, value in NPU_FLAGS.items():
        os.environ.setdefault(key, value)


def select_device(device: str) -> str:
    """Make Paddle compute on ``device`` (the process's one GPU/NPU); returns the Paddle device name."""
    if device not in DEVICE_KINDS:
        raise ValueError(f"device={device!r} must be one of {DEVICE_KINDS}")
    if device == "npu":
        apply_npu_flags()
    import paddle

    name = paddle_device(os.environ.get(DEVICE_OVERRIDE_ENV) or device)
    require_device(name)
    paddle.set_device(name)
    return name
