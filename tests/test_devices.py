"""Device names as users write them, and what this Paddle build can compute on."""

from __future__ import annotations

import paddle
import pytest

from sd3_core.devices import layer_device, paddle_device, require_device


class _TorchDevice:
    """Stands for a ``torch.device``, which ``paddle_device`` reads by its text."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text


@pytest.mark.parametrize(
    "given, name",
    [
        ("cpu", "cpu"),
        ("cpu:0", "cpu"),
        ("CPU", "cpu"),
        ("gpu", "gpu:0"),
        ("gpu:3", "gpu:3"),
        ("cuda", "gpu:0"),
        ("cuda:1", "gpu:1"),
        (_TorchDevice("cuda:2"), "gpu:2"),
        ("npu", "npu:0"),
        ("npu:1", "npu:1"),
        (paddle.CPUPlace(), "cpu"),
        ("Place(gpu:1)", "gpu:1"),
    ],
)
def test_device_names_of_both_ecosystems_map_to_paddles(given, name):
    assert paddle_device(given) == name


@pytest.mark.parametrize("given", ["mps", "xpu", "cuda:x", "gpu:-1", "", "tpu:0"])
def test_unknown_devices_are_refused_with_the_names_that_work(given):
    with pytest.raises(
        ValueError, match=r"is not a device here; use 'cpu', 'gpu' or 'gpu:N' \(torch's 'cuda'"
    ):
        paddle_device(given)


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="the CPU build's message")
def test_a_gpu_on_the_cpu_build_says_what_to_install():
    require_device("cpu")
    with pytest.raises(
        RuntimeError, match=r"'gpu:0': this Paddle is the CPU build.*install paddlepaddle-gpu"
    ):
        require_device("gpu:0")


@pytest.mark.skipif("npu" in paddle.device.get_all_custom_device_type(), reason="an NPU build")
def test_an_npu_without_its_plugin_says_what_to_install():
    with pytest.raises(
        RuntimeError, match=r"'npu:0': this Paddle has no 'npu' custom device.*paddle-custom-npu"
    ):
        require_device("npu:0")


def test_layer_device_is_where_the_weights_are():
    assert layer_device(paddle.nn.Linear(2, 3)) == paddle_device(paddle.get_device())
    assert layer_device(paddle.nn.ReLU()) == "cpu"  # no weights
