"""diffusers' ``pipe.to(...)``, ``pipe.device`` and memory switches on StableDiffusion3Pipeline."""

from __future__ import annotations

import warnings

import numpy as np
import paddle
import pytest

from pipelines import StableDiffusion3Pipeline
from sd3_core import lora, text_encoder_folder
from sd3_core.inference_program import program_precision
from sd3_core.t5_encoder import load_t5_encoder
from sd3_core.text_encoder_folder import cast_encoder
from tests.reference_cases import fixture_path

CALL = dict(prompt="a red fox", height=64, width=64, num_inference_steps=2, guidance_scale=3.0, seed=[5])


def load(**kwargs) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tensors(pipe: StableDiffusion3Pipeline) -> dict[str, tuple[str, np.ndarray]]:
    """Every parameter and buffer of every component: (dtype, float32 values)."""
    out = {}
    for name, layer in pipe._layers().items():
        for key, t in [*layer.named_parameters(), *layer.named_buffers()]:
            out[f"{name}.{key}"] = (
                str(t.dtype),
                t.astype("float32").numpy() if t.is_floating_point() else t.numpy(),
            )
    return out


def test_to_cpu_returns_the_pipeline_unchanged_and_device_says_where():
    pipe = load()
    before = pipe(**CALL, output_type="np").images
    assert pipe.to("cpu") is pipe and pipe.to(device="cpu", paddle_device="cpu:0") is pipe
    assert pipe.device == "cpu" and pipe.transformer.device == "cpu" and pipe.vae.device == "cpu"
    np.testing.assert_array_equal(pipe(**CALL, output_type="np").images, before)


@pytest.mark.parametrize(
    "args, kwargs, dtype",
    [
        (("bfloat16",), {}, "bfloat16"),
        ((paddle.float16,), {}, "float16"),
        (("cpu", "torch.bfloat16"), {}, "bfloat16"),
        ((), {"torch_dtype": "torch.float16"}, "float16"),
        ((), {"paddle_dtype": paddle.bfloat16}, "bfloat16"),
    ],
)
def test_to_a_dtype_holds_what_loading_in_that_dtype_holds(args, kwargs, dtype):
    pipe = load().to(*args, **kwargs)
    reference = load(dtype=dtype)
    got, want = tensors(pipe), tensors(reference)
    assert got.keys() == want.keys()
    for key, (kind, values) in want.items():
        assert got[key][0] == kind, key  # the text encoders stay float32 on CPU, integer buffers stay
        np.testing.assert_array_equal(got[key][1], values, err_msg=key)
    assert pipe.dtype == getattr(paddle, dtype)
    np.testing.assert_array_equal(
        pipe(**CALL, output_type="np").images, reference(**CALL, output_type="np").images
    )


def test_t5_cast_to_float16_keeps_its_feed_forward_outputs_float32_where_kernels_exist(monkeypatch):
    # Pretend the device has half kernels (GPU), as the loading test does.
    monkeypatch.setattr(text_encoder_folder, "compute_dtype", lambda d: d)
    folder = fixture_path("sd3-tiny") + "/text_encoder_3"
    cast = load_t5_encoder(folder, dtype="float32")
    cast_encoder(cast, "float16")
    loaded = load_t5_encoder(folder, dtype="float16")
    got, want = cast.state_dict(), loaded.state_dict()
    assert any(".wo." in k for k in want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype == (paddle.float32 if ".wo." in key else paddle.float16), key
        np.testing.assert_array_equal(got[key].numpy(), value.numpy(), err_msg=key)


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (("cpu", "float16", "x"), {}, TypeError, "pass at most one device and one dtype"),
        (("cpu", "gpu"), {}, TypeError, "pass at most one device and one dtype"),
        (("float16",), {"dtype": "float16"}, TypeError, "as an argument and as a keyword"),
        (("cpu",), {"device": "cpu"}, TypeError, "as an argument and as a keyword"),
        ((), {"device": "cpu", "paddle_device": "gpu"}, ValueError, "conflicting devices"),
        ((), {"dtype": "float16", "torch_dtype": "float32"}, ValueError, "conflicting dtypes"),
        (("float64",), {}, ValueError, "dtype='float64' is not supported"),
        (("mps",), {}, ValueError, "device='mps' is not a device here"),
    ],
)
def test_bad_to_arguments_are_named_and_change_nothing(args, kwargs, error, message):
    pipe = load()
    before = tensors(pipe)
    with pytest.raises(error, match=message.replace("(", r"\(")):
        pipe.to(*args, **kwargs)
    after = tensors(pipe)
    assert all(after[k][0] == v[0] and np.array_equal(after[k][1], v[1]) for k, v in before.items())


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="the CPU build's message")
def test_to_cuda_on_the_cpu_build_says_what_to_install_and_the_pipeline_still_runs():
    pipe = load()
    with pytest.raises(RuntimeError, match="CPU build.*install paddlepaddle-gpu"):
        pipe.to("cuda")
    assert pipe.device == "cpu" and paddle.get_device() == "cpu"
    assert pipe(**CALL, output_type="np").images.shape == (1, 64, 64, 3)


def test_to_a_dtype_with_fused_lora_is_refused():
    pipe = load()
    lora.inject_lora(pipe.transformer, "a", rank=2)
    pipe.fuse_lora()
    with pytest.raises(ValueError, match=r"fused into the transformer; call pipe.unfuse_lora\(\) first"):
        pipe.to("bfloat16")
    pipe.unfuse_lora()
    assert pipe.to("bfloat16").transformer.dtype == paddle.bfloat16


def test_to_a_dtype_rebuilds_the_inference_program_for_it(tmp_path):
    pipe = load()
    pipe.enable_inference_optimize(cache_dir=str(tmp_path), threads=1)
    program = pipe.transformer_program
    pipe.to("cpu")  # nothing changed: the same program
    assert pipe.transformer_program is program
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a CPU without native bfloat16 says so
        pipe.to(dtype="bfloat16")
    rebuilt = pipe.transformer_program
    assert rebuilt is not program and rebuilt.model is pipe.transformer
    assert (rebuilt.cache_dir, rebuilt.threads) == (str(tmp_path), 1)
    assert rebuilt.precision == program_precision(paddle.bfloat16)


@pytest.mark.parametrize(
    "method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_offload"]
)
def test_offloading_is_refused_with_what_to_do_instead(method):
    with pytest.raises(NotImplementedError, match=rf"{method} is not supported: .*dtype='float16'.*--mp 2"):
        getattr(load(), method)()


@pytest.mark.parametrize(
    "method",
    [
        "enable_attention_slicing",
        "disable_attention_slicing",
        "enable_xformers_memory_efficient_attention",
        "disable_xformers_memory_efficient_attention",
    ],
)
def test_attention_switches_warn_that_they_change_nothing(method):
    pipe = load()
    before = pipe(**CALL, output_type="np").images
    with pytest.warns(UserWarning, match=rf"{method}\(\) has no effect here: .*scaled_dot_product_attention"):
        getattr(pipe, method)()
    pipe.maybe_free_model_hooks()
    np.testing.assert_array_equal(pipe(**CALL, output_type="np").images, before)
