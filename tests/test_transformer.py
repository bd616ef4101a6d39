"""SD3Transformer2DModel: parity with diffusers' references, loading contract, config surface."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import paddle
import pytest

from sd3_core.attention import attention
from sd3_core.safetensors_io import WeightsFileError, open_weights, write_safetensors
from sd3_core.torch_state import WeightLoadError, torch_state_from
from sd3_core.transformer import SD3Transformer2DModel
from sd3_core.transformer_blocks import modulate, modulated_norm

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCES = FIXTURES / "references"
CASES = [c for c in json.loads((REFERENCES / "cases.json").read_text()) if c["kind"] == "transformer"]
INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")

_MODELS: dict[str, SD3Transformer2DModel] = {}


def fixture_model(name: str) -> SD3Transformer2DModel:
    if name not in _MODELS:
        _MODELS[name] = SD3Transformer2DModel.from_pretrained(FIXTURES / name, subfolder="transformer")
    return _MODELS[name]


def case_inputs(case: dict) -> tuple[list[paddle.Tensor], np.ndarray]:
    data = np.load(REFERENCES / case["file"])
    return [paddle.to_tensor(data[f"in_{k}"]) for k in INPUTS], data["out_sample"]


def fixture_state(name: str) -> dict[str, np.ndarray]:
    index = open_weights(FIXTURES / name / "transformer", "diffusion_pytorch_model.safetensors")
    return {k: np.array(index.get(k)) for k in index}


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    """A single-file copy of the sd3-tiny transformer that tests may damage."""
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(FIXTURES / "sd3-tiny" / "transformer" / "config.json", folder)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", fixture_state("sd3-tiny"))
    return folder


# ---- parity with diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_diffusers_reference(case):
    inputs, expected = case_inputs(case)
    out = fixture_model(case["fixture"])(*inputs, skip_layers=case["args"]["skip_layers"]).sample
    assert out.shape == list(expected.shape)
    assert np.abs(out.numpy() - expected).max() < 1e-4


def test_fixture_configs_cover_sd3_and_sd35():
    assert fixture_model("sd3-tiny").config.qk_norm is None
    sd35 = fixture_model("sd35-tiny")
    assert sd35.config.qk_norm == "rms_norm" and list(sd35.config.dual_attention_layers) == [0, 1]
    assert sd35.transformer_blocks[0].attn2 is not None and sd35.transformer_blocks[2].attn2 is None


# ---- building blocks ---------------------------------------------------------------------------


def test_attention_is_plain_softmax_attention_per_head():
    rng = np.random.default_rng(0)
    heads, dh = 3, 8
    q, k, v = (rng.standard_normal((n, heads * dh)).astype(np.float32) for n in (5, 9, 9))
    out = attention(paddle.to_tensor(q), paddle.to_tensor(k), paddle.to_tensor(v), heads).numpy()
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        scores = q[:, cols].astype(np.float64) @ k[:, cols].T / np.sqrt(dh)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[:, cols], probs @ v[:, cols], atol=1e-5)
    batched = attention(*(paddle.to_tensor(np.stack([a, a])) for a in (q, k, v)), heads).numpy()
    np.testing.assert_array_equal(batched[1], out)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_softmaxes_on_several_threads_give_the_serial_result_bit_for_bit(monkeypatch, threads):
    from sd3_core import attention as attention_module
    from sd3_core import runtime

    rng = np.random.default_rng(2)
    tokens = 260  # 67600 scores per head: at least POOL_MIN_SCORES
    q, k, v = (paddle.to_tensor(rng.standard_normal((tokens, 5 * 4)).astype(np.float32)) for _ in range(3))
    serial = attention(q, k, v, 5).numpy()  # grad mode on: never the pool
    monkeypatch.setattr(runtime, "cpu_threads", lambda: threads)
    with paddle.no_grad():
        assert (attention_module._softmax_pool(tokens * tokens) is None) == (threads == 1)
        assert attention_module._softmax_pool(attention_module.POOL_MIN_SCORES - 1) is None  # too small
        np.testing.assert_array_equal(attention(q, k, v, 5).numpy(), serial)  # 5 heads in groups of `threads`
    assert attention_module._softmax_pool(tokens * tokens) is None  # recording gradients: no pool


def test_fused_modulated_norm_equals_layer_norm_then_modulate():
    rng = np.random.default_rng(1)
    x = paddle.to_tensor(rng.standard_normal((7, 16)).astype(np.float32) * 3 + 1)
    shift, scale = (paddle.to_tensor(rng.standard_normal(16).astype(np.float32)) for _ in range(2))
    plain = modulate(paddle.nn.functional.layer_norm(x, [16], epsilon=1e-6), shift, scale)
    np.testing.assert_allclose(modulated_norm(x, shift, scale).numpy(), plain.numpy(), atol=1e-6)


# ---- state-dict contract -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd3-tiny", "sd35-tiny"])
def test_state_dict_names_and_layout_are_diffusers(name):
    ours = torch_state_from(fixture_model(name))
    theirs = fixture_state(name)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    last = len(fixture_model(name).transformer_blocks) - 1
    # the last block only contributes context keys/values
    assert not [
        k
        for k in ours
        if k.startswith(f"transformer_blocks.{last}.") and ("to_add_out" in k or "ff_context" in k)
    ]
    assert ours[f"transformer_blocks.{last}.norm1_context.linear.weight"].shape[0] == 2 * 32


def test_default_config_matches_diffusers_defaults():
    params = SD3Transformer2DModel._init_keys()
    assert params == [
        "sample_size",
        "patch_size",
        "in_channels",
        "num_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "caption_projection_dim",
        "pooled_projection_dim",
        "out_channels",
        "pos_embed_max_size",
        "dual_attention_layers",
        "qk_norm",
    ]
    cfg = SD3Transformer2DModel.from_config(
        {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "caption_projection_dim": 16}
    ).config
    assert (cfg.sample_size, cfg.pos_embed_max_size, cfg.joint_attention_dim, cfg.qk_norm) == (
        128,
        96,
        4096,
        None,
    )


def _diffusers_sincos(embed_dim: int, grid: int, base: int) -> np.ndarray:
    # diffusers' get_2d_sincos_pos_embed, written out with its meshgrid (w first) convention
    coords = np.arange(grid, dtype=np.float32) / (grid / base)
    gw, gh = np.meshgrid(coords, coords, indexing="xy")

    def one_d(pos):
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(gw), one_d(gh)], axis=1).astype(np.float32)


def test_fresh_model_has_the_standard_sincos_table():
    model = SD3Transformer2DModel(
        sample_size=8,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        caption_projection_dim=16,
        joint_attention_dim=8,
        pooled_projection_dim=8,
        pos_embed_max_size=6,
    )
    np.testing.assert_allclose(model.pos_embed.pos_embed.numpy()[0], _diffusers_sincos(16, 6, 4), atol=1e-6)


def test_pos_embed_table_is_loaded_not_recomputed():
    table = fixture_state("sd3-tiny")["pos_embed.pos_embed"]
    np.testing.assert_array_equal(fixture_model("sd3-tiny").pos_embed.pos_embed.numpy(), table)


def test_latents_larger_than_pos_embed_max_size_are_rejected():
    model = fixture_model("sd3-tiny")  # pos_embed_max_size 12 patches = 24 latent pixels
    inputs, _ = case_inputs(CASES[0])
    too_big = paddle.zeros([2, 16, 26, 16])
    with pytest.raises(ValueError, match=r"13x8 exceeds pos_embed_max_size=12"):
        model(too_big, *inputs[1:])


def test_bad_inputs_name_the_problem():
    model = fixture_model("sd3-tiny")
    (x, ctx, pooled, t), _ = case_inputs(CASES[0])
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, 16, H, W\]"):
        model(x[:, :4], ctx, pooled, t)
    with pytest.raises(ValueError, match="not a multiple of patch_size=2"):
        model(x[:, :, :15], ctx, pooled, t)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[B, L, 128\]"):
        model(x, ctx[..., :64], pooled, t)
    with pytest.raises(ValueError, match="timestep must have one value per sample"):
        model(x, ctx, pooled, paddle.to_tensor([1.0, 2.0, 3.0]))


def test_scalar_timestep_is_broadcast():
    model = fixture_model("sd3-tiny")
    (x, ctx, pooled, t), _ = case_inputs(CASES[0])
    same = paddle.full([2], 500.0)
    np.testing.assert_array_equal(
        model(x, ctx, pooled, 500.0).sample.numpy(), model(x, ctx, pooled, same).sample.numpy()
    )


# ---- loading -----------------------------------------------------------------------------------


def test_sharded_and_single_file_checkpoints_load_the_same(tiny_copy):
    assert (FIXTURES / "sd3-tiny" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    single = SD3Transformer2DModel.from_pretrained(tiny_copy)
    sharded = fixture_model("sd3-tiny")
    for k, v in torch_state_from(sharded).items():
        np.testing.assert_array_equal(torch_state_from(single)[k], v)


def _rewrite(folder: Path, edit) -> None:
    state = {k: np.array(v) for k, v in fixture_state("sd3-tiny").items()}
    edit(state)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", state)


def test_missing_key_is_reported(tiny_copy):
    _rewrite(tiny_copy, lambda s: s.pop("transformer_blocks.1.attn.to_k.bias"))
    with pytest.raises(
        WeightLoadError, match=r"missing keys \(1\): transformer_blocks\.1\.attn\.to_k\.bias"
    ) as e:
        SD3Transformer2DModel.from_pretrained(tiny_copy)
    assert str(tiny_copy) in str(e.value)


def test_unexpected_key_is_reported(tiny_copy):
    _rewrite(
        tiny_copy,
        lambda s: s.update({"transformer_blocks.2.attn.to_add_out.weight": np.zeros((32, 32), "f4")}),
    )
    with pytest.raises(
        WeightLoadError, match=r"unexpected keys \(1\): transformer_blocks\.2\.attn\.to_add_out"
    ):
        SD3Transformer2DModel.from_pretrained(tiny_copy)


def test_shape_mismatch_is_reported(tiny_copy):
    _rewrite(tiny_copy, lambda s: s.update({"proj_out.weight": np.zeros((32, 64), "f4")}))
    with pytest.raises(
        WeightLoadError,
        match=r"proj_out\.weight in diffusion_pytorch_model\.safetensors: checkpoint \[32, 64\] vs model \[64, 32\]",
    ):
        SD3Transformer2DModel.from_pretrained(tiny_copy)


def test_config_that_does_not_fit_the_weights_is_reported(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["qk_norm"] = "rms_norm"
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError, match=r"missing keys \(12\): .*norm_added_k\.weight"):
        SD3Transformer2DModel.from_pretrained(tiny_copy)


def test_truncated_file_is_reported(tiny_copy):
    path = tiny_copy / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsFileError, match=r"diffusion_pytorch_model\.safetensors: truncated"):
        SD3Transformer2DModel.from_pretrained(tiny_copy)


def test_missing_shard_is_reported(tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(FIXTURES / "sd3-tiny" / "transformer", folder)
    (folder / "diffusion_pytorch_model-00002-of-00004.safetensors").unlink()
    with pytest.raises(WeightsFileError, match=r"00002-of-00004\.safetensors: weights file not found"):
        SD3Transformer2DModel.from_pretrained(folder)


def test_bad_dtypes_are_reported(tiny_copy):
    with pytest.raises(ValueError, match="dtype='float64' is not supported"):
        SD3Transformer2DModel.from_pretrained(tiny_copy, dtype="float64")
    _rewrite(tiny_copy, lambda s: s.update({"proj_out.bias": s["proj_out.bias"].astype(np.int32)}))
    with pytest.raises(
        WeightLoadError, match=r"dtype mismatch \(1\): proj_out\.bias in diffusion_pytorch_model\.safetensors"
    ):
        SD3Transformer2DModel.from_pretrained(tiny_copy)


# ---- save / dtype round trips ------------------------------------------------------------------


def test_save_then_load_is_exact(tmp_path):
    model = fixture_model("sd35-tiny")
    model.save_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    reference = json.loads((FIXTURES / "sd35-tiny" / "transformer" / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "_diffusers_version"} == {
        k: v for k, v in reference.items() if k != "_diffusers_version"
    }
    saved = fixture_state("sd35-tiny")
    written = open_weights(tmp_path / "t", "diffusion_pytorch_model.safetensors")
    assert sorted(written) == sorted(saved)
    for k in saved:
        np.testing.assert_array_equal(written.get(k), saved[k])
    again = SD3Transformer2DModel.from_pretrained(tmp_path / "t")
    (x, ctx, pooled, t), _ = case_inputs(CASES[0])
    np.testing.assert_array_equal(
        again(x, ctx, pooled, t).sample.numpy(), model(x, ctx, pooled, t).sample.numpy()
    )


@pytest.mark.parametrize(("dtype", "np_dtype"), [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)])
def test_half_precision_loads_and_runs(tmp_path, dtype, np_dtype):
    model = SD3Transformer2DModel.from_pretrained(FIXTURES / "sd3-tiny", subfolder="transformer", dtype=dtype)
    assert model.dtype == getattr(paddle, dtype) and model.pos_embed.pos_embed.dtype == getattr(paddle, dtype)
    expected = {k: v.astype(np_dtype) for k, v in fixture_state("sd3-tiny").items()}
    for k, v in torch_state_from(model).items():
        np.testing.assert_array_equal(v, expected[k])
    # saving in that dtype and reloading is exact, and a half file loads as float32 exactly
    model.save_pretrained(tmp_path / "half")
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path / "half", dtype="float32")
    for k, v in torch_state_from(reloaded).items():
        np.testing.assert_array_equal(v, expected[k].astype(np.float32))
    inputs, reference = case_inputs(CASES[0])
    out = model(*inputs).sample
    assert out.dtype == paddle.float32  # output follows the input's dtype
    assert np.abs(out.numpy() - reference).max() < 0.1 * np.abs(reference).max()
