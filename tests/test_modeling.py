"""PyTorch-checkpoint conversion and the ModelMixin config/save/load contract."""

from __future__ import annotations

import inspect
import json
import warnings

import ml_dtypes
import numpy as np
import paddle
import pytest

from sd3_core.dtypes import resolve_dtype
from sd3_core.layers import Conv2D, Linear
from sd3_core.model_config import Config, register_to_config
from sd3_core.modeling import ModelMixin
from sd3_core.safetensors_io import SafetensorsFile, open_weights, write_safetensors
from sd3_core.torch_state import WeightLoadError, load_torch_state, torch_state_from


class Toy(ModelMixin):
    """Every layout case: square and non-square Linear, conv, norm, embedding, buffer."""

    @register_to_config
    def __init__(self, width: int = 4, vocab: int = 5, extra: tuple[int, ...] = ()):
        super().__init__()
        self.square = Linear(width, width)
        self.proj = paddle.nn.Linear(width, 2 * width)
        self.conv = paddle.nn.Conv2D(2, width, 2)
        self.norm = paddle.nn.LayerNorm(width)
        self.embed = paddle.nn.Embedding(vocab, width)
        self.register_buffer(
            "table", paddle.arange(width, dtype="float32").reshape([1, width]), persistable=True
        )
        self.register_buffer("scratch", paddle.zeros([3]), persistable=False)


def torch_layout(rng: np.random.Generator, width: int = 4, vocab: int = 5) -> dict[str, np.ndarray]:
    f = np.float32
    return {
        "square.weight": rng.standard_normal((width, width)).astype(f),  # [out, in]
        "square.bias": rng.standard_normal(width).astype(f),
        "proj.weight": rng.standard_normal((2 * width, width)).astype(f),
        "proj.bias": rng.standard_normal(2 * width).astype(f),
        "conv.weight": rng.standard_normal((width, 2, 2, 2)).astype(f),
        "conv.bias": rng.standard_normal(width).astype(f),
        "norm.weight": rng.standard_normal(width).astype(f),
        "norm.bias": rng.standard_normal(width).astype(f),
        "embed.weight": rng.standard_normal((vocab, width)).astype(f),
        "table": rng.standard_normal((1, width)).astype(f),
    }


@pytest.fixture
def ckpt(tmp_path):
    state = torch_layout(np.random.default_rng(0))
    write_safetensors(tmp_path / "w.safetensors", state)
    return tmp_path, state


def test_config_is_a_dict_with_attribute_access():
    c = Config(a=1)
    c.b = 2
    assert c.a == 1 and c["b"] == 2
    with pytest.raises(AttributeError, match="'zzz'"):
        _ = c.zzz


def test_num_parameters_counts_as_diffusers_does():
    model, state = Toy(), torch_layout(np.random.default_rng(0))
    sizes = {name: value.size for name, value in state.items() if name != "table"}  # a buffer
    assert model.num_parameters() == sum(sizes.values())
    assert model.num_parameters(exclude_embeddings=True) == sum(sizes.values()) - sizes["embed.weight"]
    model.square.weight.stop_gradient = model.square.bias.stop_gradient = True
    frozen = sizes["square.weight"] + sizes["square.bias"]
    assert model.num_parameters(only_trainable=True) == sum(sizes.values()) - frozen
    assert model.num_parameters(True, True) == sum(sizes.values()) - frozen - sizes["embed.weight"]


def test_the_outermost_decorated_init_records_the_config_with_defaults_filled_in():
    class Wider(Toy):
        @register_to_config
        def __init__(self, scale: int = 2, vocab: int = 7):
            super().__init__(width=4 * scale, vocab=vocab)

    assert dict(Toy(width=3).config) == {"width": 3, "vocab": 5, "extra": ()}
    assert dict(Wider(vocab=9).config) == {"scale": 2, "vocab": 9}  # not Toy's arguments
    assert Wider.__init__.__name__ == "__init__" and "scale" in str(inspect.signature(Wider.__init__))


def test_a_model_whose_init_is_not_decorated_names_the_missing_decorator():
    class Plain(ModelMixin):
        def __init__(self, width: int = 2):
            super().__init__()
            self.proj = Linear(width, width)

    with pytest.raises(
        AttributeError, match="Plain has no config: decorate its __init__ with @.*register_to_config"
    ):
        _ = Plain().config


def test_a_subclass_whose_own_init_is_not_decorated_is_refused_not_given_its_parents_config():
    class Narrow(Toy):  # its own arguments, undecorated: Toy's would be recorded as its config
        def __init__(self, size: int = 2):
            super().__init__(width=size, vocab=3)

    with pytest.raises(
        TypeError, match="Narrow has no config: decorate its __init__ with @.*register_to_config"
    ):
        Narrow()

    class Same(Toy):  # no __init__ of its own: it is built by Toy's and has Toy's config
        pass

    assert dict(Same(width=3).config) == {"width": 3, "vocab": 5, "extra": ()}


@pytest.mark.parametrize("good", ["float32", "float16", "bfloat16", paddle.bfloat16, paddle.float16])
def test_resolve_dtype_accepts_the_three_float_types(good):
    assert resolve_dtype(good) in {"float32", "float16", "bfloat16"}


@pytest.mark.parametrize("bad", ["float64", "fp16", "int8", None, paddle.float64])
def test_resolve_dtype_rejects_anything_else(bad):
    with pytest.raises(ValueError, match="dtype=.*not supported"):
        resolve_dtype(bad)


def test_linear_weights_are_transposed_by_module_type_not_shape(ckpt):
    folder, state = ckpt
    model = Toy()
    load_torch_state(model, open_weights(folder, "w.safetensors"), "float32", str(folder))
    # square Linear: transposed even though the shape would fit either way
    np.testing.assert_array_equal(model.square.weight.numpy(), state["square.weight"].T)
    np.testing.assert_array_equal(model.proj.weight.numpy(), state["proj.weight"].T)
    # conv / norm / embedding / buffers keep their layout
    np.testing.assert_array_equal(model.conv.weight.numpy(), state["conv.weight"])
    np.testing.assert_array_equal(model.embed.weight.numpy(), state["embed.weight"])
    np.testing.assert_array_equal(model.table.numpy(), state["table"])
    # and the inverse gives back the checkpoint exactly, without non-persistent buffers
    back = torch_state_from(model)
    assert back.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_loading_casts_to_the_requested_dtype(ckpt, dtype):
    folder, state = ckpt
    model = Toy()
    load_torch_state(model, open_weights(folder, "w.safetensors"), dtype, str(folder))
    assert model.square.weight.dtype == getattr(paddle, dtype)
    assert model.table.dtype == getattr(paddle, dtype)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    back = torch_state_from(model)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k].astype(np_dtype))
    # a Linear with half weights still runs on a device without half kernels (upcast per call)
    y = model.square(paddle.ones([1, 4]))
    assert y.dtype == paddle.float32


def _error(folder, state, **kwargs) -> str:
    write_safetensors(folder / "w.safetensors", state)
    with pytest.raises(WeightLoadError) as info:
        load_torch_state(Toy(), open_weights(folder, "w.safetensors"), "float32", f"{folder}", **kwargs)
    return str(info.value)


def test_missing_keys_are_listed_with_the_source(ckpt):
    folder, state = ckpt
    del state["proj.bias"], state["table"]
    msg = _error(folder, state)
    assert str(folder) in msg and "missing keys (2): proj.bias, table" in msg


def test_unexpected_keys_are_listed_unless_ignored(ckpt):
    folder, state = ckpt
    state["extra.weight"] = np.zeros(2, np.float32)
    assert "unexpected keys (1): extra.weight" in _error(folder, state)
    load_torch_state(
        Toy(), open_weights(folder, "w.safetensors"), "float32", "x", ignore_unexpected=[r"^extra\."]
    )


def test_shape_mismatch_reports_both_shapes(ckpt):
    folder, state = ckpt
    state["proj.weight"] = state["proj.weight"].T.copy()  # a Paddle-layout file
    msg = _error(folder, state)
    assert "shape mismatch (1): proj.weight in w.safetensors: checkpoint [4, 8] vs model [8, 4]" in msg


def test_integer_tensor_for_a_float_parameter_is_a_dtype_mismatch(ckpt):
    folder, state = ckpt
    state["norm.bias"] = np.arange(4, dtype=np.int64)
    assert "dtype mismatch (1): norm.bias" in _error(folder, state)


def test_many_missing_keys_are_summarised(tmp_path):
    write_safetensors(tmp_path / "w.safetensors", {f"k{i:02d}": np.zeros(1, np.float32) for i in range(15)})
    msg = _error(tmp_path, {f"k{i:02d}": np.zeros(1, np.float32) for i in range(15)})
    assert "unexpected keys (15)" in msg and "(+5 more)" in msg


def test_key_map_renames_checkpoint_keys(ckpt):
    folder, state = ckpt
    state["encoder.table"] = state.pop("table")
    write_safetensors(folder / "w.safetensors", state)
    model = Toy()
    load_torch_state(
        model, open_weights(folder, "w.safetensors"), None, str(folder), key_map={"table": "encoder.table"}
    )
    np.testing.assert_array_equal(model.table.numpy(), state["encoder.table"])


def test_from_config_ignores_private_keys_and_warns_about_unknown_ones():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = Toy.from_config({"_class_name": "Toy", "_diffusers_version": "0", "width": 6})
    assert model.config == {"width": 6, "vocab": 5, "extra": ()}
    assert model.config.width == 6
    with pytest.warns(UserWarning, match=r"unknown config keys \['bogus'\]"):
        Toy.from_config({"bogus": 1})


def test_save_pretrained_then_from_pretrained_is_exact(tmp_path):
    model = Toy(width=6)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["_class_name"] == "Toy" and config["width"] == 6 and "_diffusers_version" in config
    f = SafetensorsFile(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    assert f.metadata == {"format": "pt"}
    assert f.shape("proj.weight") == (12, 6)  # PyTorch layout on disk
    assert "scratch" not in f.keys()
    loaded = Toy.from_pretrained(tmp_path / "m")
    for k, v in torch_state_from(model).items():
        np.testing.assert_array_equal(torch_state_from(loaded)[k], v)


def test_sharded_save_round_trips(tmp_path):
    model = Toy(width=8)
    model.save_pretrained(tmp_path, max_shard_size=400)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all(s.startswith("diffusion_pytorch_model-0000") for s in shards)
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = Toy.from_pretrained(tmp_path, dtype="bfloat16")
    assert loaded.proj.weight.dtype == paddle.bfloat16
    expected = {k: v.astype(ml_dtypes.bfloat16) for k, v in torch_state_from(model).items()}
    for k, v in torch_state_from(loaded).items():
        np.testing.assert_array_equal(v, expected[k])


def test_from_pretrained_reports_a_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Toy.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype='int8'"):
        Toy.from_pretrained(tmp_path, dtype="int8")


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_half_precision_conv_runs_on_float32_inputs(padding_mode):
    conv = Conv2D(3, 4, 3, padding=1, padding_mode=padding_mode)
    x = paddle.randn([1, 3, 6, 6])
    reference = conv(x).numpy()
    conv.to(dtype="bfloat16")
    out = conv(x)
    assert out.dtype == paddle.float32
    np.testing.assert_allclose(out.numpy(), reference, atol=0.05)
