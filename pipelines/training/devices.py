"""Which device a training process computes on, and the settings that device needs.

Kept free of a Paddle import: the NPU flags must be in the environment before Paddle loads.
"""

from __future__ import annotations

import os

DEVICES = ("cpu", "gpu", "npu")
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
    if device not in DEVICES:
        raise ValueError(f"device={device!r} must be one of {DEVICES}")
    if device == "npu":
        apply_npu_flags()
    import paddle

    name = os.environ.get(DEVICE_OVERRIDE_ENV) or {"cpu": "cpu", "gpu": "gpu:0", "npu": "npu:0"}[device]
    if name.startswith("npu") and "npu" not in paddle.device.get_all_custom_device_type():
        raise RuntimeError(
            "device npu: this Paddle has no 'npu' custom device; install PaddleCustomDevice's NPU "
            "plugin (paddle-custom-npu) on the NPU nodes"
        )
    paddle.set_device(name)
    return name
