"""AutoencoderKL reproduces diffusers' VAE on the tiny SD3 / SD3.5 fixtures.

References: tests/fixtures/references (kind "vae"), made by diffusers 0.42.1 in float32 from
the same `vae/` folders (16 latent channels, 4 levels, factor 8, no quant convs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from sd3_core import vae_blocks
from sd3_core.safetensors_io import open_weights
from sd3_core.torch_state import torch_state_from
from sd3_core.vae import AutoencoderKL, DiagonalGaussian, GroupNorm
from sd3_core.vae_blocks import chunked_attention

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCES = FIXTURES / "references"
TOLERANCE = 1e-4  # max abs difference to diffusers' float32 outputs


def _cases(tiled: bool = False) -> list:
    cases = json.loads((REFERENCES / "cases.json").read_text(encoding="utf-8"))
    return [
        pytest.param(c, id=c["name"])
        for c in cases
        if c["kind"] == "vae" and ("tiling" in c["args"]) == tiled
    ]


def _reference(case: dict) -> dict[str, np.ndarray]:
    with np.load(REFERENCES / case["file"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


_MODELS: dict[tuple[str, str], AutoencoderKL] = {}


def _vae(fixture: str, dtype: str = "float32") -> AutoencoderKL:
    if (fixture, dtype) not in _MODELS:
        _MODELS[fixture, dtype] = AutoencoderKL.from_pretrained(FIXTURES / fixture / "vae", dtype=dtype)
    return _MODELS[fixture, dtype]


def _max_diff(a: paddle.Tensor, b: np.ndarray) -> float:
    assert list(a.shape) == list(b.shape)
    return float(np.abs(a.astype("float32").numpy() - b).max())


def _tiny(**overrides) -> AutoencoderKL:
    config = dict(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[4, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
    )
    paddle.seed(0)
    return AutoencoderKL(**{**config, **overrides})


# ---- parity with diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases())
@paddle.no_grad()
def test_matches_diffusers_float32(case):
    ref = _reference(case)
    vae = _vae(case["fixture"])
    if case["args"]["op"] == "encode":
        posterior = vae.encode(paddle.to_tensor(ref["in_image"])).latent_dist
        for name in ("mean", "logvar", "std"):
            assert _max_diff(getattr(posterior, name), ref[f"out_{name}"]) < TOLERANCE, name
    else:
        assert _max_diff(vae.decode(paddle.to_tensor(ref["in_z"])).sample, ref["out_sample"]) < TOLERANCE


def _tiled_and_whole(vae: AutoencoderKL, op: str, x: paddle.Tensor) -> tuple[np.ndarray, np.ndarray]:
    code = (lambda t: vae.encode(t).latent_dist.mean) if op == "encode" else (lambda t: vae.decode(t).sample)
    vae.disable_tiling()
    whole = code(x).numpy()
    vae.enable_tiling()
    try:
        return code(x).numpy(), whole
    finally:
        vae.disable_tiling()


@pytest.mark.parametrize("op", ["decode", "encode"])
@paddle.no_grad()
def test_tiled_output_equals_untiled_output(op, monkeypatch):
    # Two levels with mid-block attention. The tiled part reaches <= 6 px around a pixel, less
    # than the 8 px (4 latent cells, half the overlap) between a tile's edge and the cells it owns,
    # so with whole-image GroupNorm statistics every owned cell is computed as untiled; diffusers'
    # per-tile statistics and attention differ everywhere.
    vae = _tiny(sample_size=64)  # factor 2; 64 px tiles every 48 px
    vae.tile_tolerance = 0.0  # every pass: exact by construction
    coder = vae.encoder if op == "encode" else vae.decoder
    calls, run = [], coder.high_res
    monkeypatch.setattr(coder, "high_res", lambda t: calls.append(t.shape) or run(t))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 80, 72)) if op == "decode" else rng.uniform(-1, 1, (2, 3, 160, 144))
    tiled, whole = _tiled_and_whole(vae, op, paddle.to_tensor(x.astype(np.float32)))
    assert len(calls) > 4 * 3 + 1  # untiled once, then passes of 4 x 3 tiles
    assert tiled.shape == whole.shape
    assert np.abs(tiled - whole).max() < 1e-5 * np.abs(whole).max(), np.abs(tiled - whole).max()


@pytest.mark.parametrize("case", _cases(tiled=True))
@paddle.no_grad()
def test_tiled_outputs_are_closer_to_untiled_than_diffusers_tiled_path(case):
    # diffusers' tiled reference (committed) against ours, both measured from the untiled output;
    # these 32 px tiles are smaller than the decoder's reach, so neither is exact here.
    ref = _reference(case)
    vae = AutoencoderKL.from_pretrained(FIXTURES / case["fixture"] / "vae")  # own copy: tiling is state
    for key, value in case["args"]["tiling"].items():
        setattr(vae, key, value)
    op = case["args"]["op"]
    x = paddle.to_tensor(ref["in_image"] if op == "encode" else ref["in_z"])
    tiled, whole = _tiled_and_whole(vae, op, x)
    theirs = ref["out_mean"] if op == "encode" else ref["out_sample"]
    ours_error, their_error = np.abs(tiled - whole).mean(), np.abs(theirs - whole).mean()
    assert ours_error < 0.5 * their_error, (ours_error, their_error)


@pytest.mark.parametrize("case", _cases(tiled=True))
@paddle.no_grad()
def test_tiled_encode_and_decode_methods_tile_without_the_switch(case):
    ref = _reference(case)
    vae = AutoencoderKL.from_pretrained(FIXTURES / case["fixture"] / "vae")
    for key, value in case["args"]["tiling"].items():
        setattr(vae, key, value)
    assert not vae.use_tiling
    op = case["args"]["op"]
    x = paddle.to_tensor(ref["in_image"] if op == "encode" else ref["in_z"])
    tiled, _ = _tiled_and_whole(vae, op, x)
    method = vae.tiled_encode(x).latent_dist.mean if op == "encode" else vae.tiled_decode(x).sample
    assert not vae.use_tiling
    np.testing.assert_array_equal(method.numpy(), tiled)
    if op == "decode":
        with pytest.raises(ValueError, match=r"tiled_decode: expected \[B, 16, H, W\]"):
            vae.tiled_decode(paddle.zeros([1, 4, 8, 8]))


@paddle.no_grad()
def test_statistics_passes_stop_once_settled_and_never_exceed_one_per_group_norm(monkeypatch):
    vae = _tiny(sample_size=64)
    calls = []
    run = vae.decoder.high_res
    monkeypatch.setattr(vae.decoder, "high_res", lambda t: calls.append(1) or run(t))
    z = paddle.to_tensor(np.random.default_rng(1).standard_normal((1, 4, 80, 80)).astype(np.float32))
    vae.tiled_decode(z)
    tiles = len(range(0, 80, 24)) ** 2
    norms = 2 * 2 + 1  # the second level's two resnets and the output norm
    assert len(calls) % tiles == 0 and 2 * tiles <= len(calls) <= (norms + 1) * tiles
    calls.clear()
    vae.tile_tolerance = float("inf")  # settled after the first
    fast = vae.tiled_decode(z).sample.numpy()
    assert len(calls) == 2 * tiles
    calls.clear()
    vae.tile_tolerance = 0.0  # every pass
    exact = vae.tiled_decode(z).sample.numpy()
    assert len(calls) == (norms + 1) * tiles
    assert np.abs(fast - exact).max() > 1e-4  # the first stitched pass is not yet exact


@paddle.no_grad()
def test_slicing_gives_the_same_results_as_whole_batches():
    # Same math row by row; only float rounding of batch-size-dependent kernels may differ. Tiled
    # passes stop when the whole batch has settled, so a batch may run more passes than its rows
    # alone: every pass (exact tiling) makes that moot.
    vae = _vae("sd3-tiny")
    vae.tile_tolerance = 0.0
    rng = np.random.default_rng(0)
    z = paddle.to_tensor(rng.standard_normal((3, 16, 8, 12)).astype(np.float32))
    x = paddle.to_tensor(rng.uniform(-1, 1, (3, 3, 64, 96)).astype(np.float32))
    try:
        for tiling in (False, True):
            vae.use_tiling, vae.tile_sample_min_size = tiling, 32
            vae.disable_slicing()
            whole_image, whole_mean = vae.decode(z).sample.numpy(), vae.encode(x).latent_dist.mean.numpy()
            vae.enable_slicing()
            np.testing.assert_allclose(vae.decode(z).sample.numpy(), whole_image, rtol=0, atol=1e-5)
            np.testing.assert_allclose(vae.encode(x).latent_dist.mean.numpy(), whole_mean, rtol=0, atol=1e-5)
    finally:
        vae.disable_slicing()
        vae.disable_tiling()
        vae.tile_sample_min_size = 64


def test_tiling_switches_and_sizes_use_diffusers_names():
    vae = _tiny(sample_size=64)  # factor 2
    assert (vae.use_tiling, vae.use_slicing) == (False, False)
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) == (64, 32, 0.25)
    vae.enable_tiling()
    vae.enable_slicing()
    assert (vae.use_tiling, vae.use_slicing) == (True, True)
    vae.enable_tiling(use_tiling=False)  # the older diffusers / PPDiffusers signature
    vae.disable_slicing()
    assert (vae.use_tiling, vae.use_slicing) == (False, False)
    vae.tile_latent_min_size = 16
    assert vae.tile_sample_min_size == 32
    vae.tile_sample_min_size = 48
    assert vae.tile_latent_min_size == 24


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("tile_sample_min_size", 0, "tile_sample_min_size=0 must be a positive multiple of the VAE factor 8"),
        ("tile_sample_min_size", -32, "tile_sample_min_size=-32 must be a positive"),
        ("tile_sample_min_size", 36, "tile_sample_min_size=36 must be a positive multiple"),
        ("tile_sample_min_size", 32.0, "tile_sample_min_size=32.0 must be"),
        ("tile_latent_min_size", 0, "tile_latent_min_size=0 must be a positive integer"),
        ("tile_latent_min_size", True, "tile_latent_min_size=True must be"),
        ("tile_overlap_factor", 1.0, r"tile_overlap_factor=1.0 must be a number in \[0, 1\)"),
        ("tile_overlap_factor", -0.1, "tile_overlap_factor=-0.1 must be"),
        ("tile_overlap_factor", float("nan"), "tile_overlap_factor=nan must be"),
        ("tile_overlap_factor", "0.25", "tile_overlap_factor='0.25' must be"),
        ("tile_tolerance", -1e-3, r"tile_tolerance=-0.001 must be a number >= 0 \(inf allowed\)"),
        ("tile_tolerance", float("nan"), "tile_tolerance=nan must be"),
        ("tile_tolerance", None, "tile_tolerance=None must be"),
    ],
)
def test_bad_tile_settings_are_refused_naming_the_attribute(key, value, match):
    vae = _vae("sd3-tiny")
    before = getattr(vae, key)
    with pytest.raises(ValueError, match=match):
        setattr(vae, key, value)
    assert getattr(vae, key) == before


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@paddle.no_grad()
def test_half_precision_weights_load_and_stay_close(dtype):
    case = next(c.values[0] for c in _cases() if c.values[0]["name"] == "vae_sd3-tiny_decode_h64w64")
    ref = _reference(case)
    vae = _vae("sd3-tiny", dtype)
    assert vae.dtype == getattr(paddle, dtype)
    out = vae.decode(paddle.to_tensor(ref["in_z"])).sample
    assert _max_diff(out, ref["out_sample"]) < (0.02 if dtype == "float16" else 0.1)


def test_state_dict_names_are_diffusers_and_round_trip(tmp_path):
    vae = _vae("sd3-tiny")
    index = open_weights(FIXTURES / "sd3-tiny" / "vae", AutoencoderKL.weights_name)
    try:
        assert set(torch_state_from(vae)) == set(index)
    finally:
        index.close()
    assert "encoder.down_blocks.0.downsamplers.0.conv.weight" in set(torch_state_from(vae))
    assert "decoder.mid_block.attentions.0.to_out.0.weight" in set(torch_state_from(vae))
    vae.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 16
    again = AutoencoderKL.from_pretrained(tmp_path)
    for key, value in torch_state_from(vae).items():
        np.testing.assert_array_equal(torch_state_from(again)[key], value)


# ---- posterior ---------------------------------------------------------------------------------


def test_posterior_clamps_logvar_and_samples_reproducibly():
    mean = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    logvar = np.array([-50.0, 0.0, 1.0, 40.0] * 2, np.float32).reshape(2, 1, 2, 2)
    post = DiagonalGaussian(paddle.to_tensor(np.concatenate([mean, logvar], axis=1)))
    np.testing.assert_array_equal(post.logvar.numpy().reshape(-1)[:4], [-30.0, 0.0, 1.0, 20.0])
    np.testing.assert_allclose(post.std.numpy(), np.exp(0.5 * post.logvar.numpy()), rtol=1e-6)
    np.testing.assert_array_equal(post.mode().numpy(), mean)
    noise = np.ones((2, 1, 2, 2), np.float32)
    np.testing.assert_allclose(
        post.sample(noise=paddle.to_tensor(noise)).numpy(), mean + post.std.numpy(), rtol=1e-6
    )
    a = post.sample(generator=np.random.default_rng(3)).numpy()
    b = post.sample(generator=np.random.default_rng(3)).numpy()
    np.testing.assert_array_equal(a, b)
    rows = post.sample(generator=[np.random.default_rng(3), np.random.default_rng(4)]).numpy()
    assert rows.shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="noise shape"):
        post.sample(noise=paddle.zeros([1, 1, 2, 2]))
    with pytest.raises(ValueError, match="3 generators"):
        post.sample(generator=[np.random.default_rng(i) for i in range(3)])


# ---- numerics of the building blocks ----------------------------------------------------------


@paddle.no_grad()
def test_attention_in_query_blocks_equals_full_attention(monkeypatch):
    ref = _reference(next(c.values[0] for c in _cases() if c.values[0]["args"]["op"] == "encode"))
    vae = _vae("sd3-tiny")
    x = paddle.to_tensor(ref["in_image"][:1])
    full = vae.encode(x).latent_dist.mean.numpy()
    monkeypatch.setattr(vae_blocks, "_ATTENTION_CHUNK_ELEMENTS", 20)  # 64 tokens -> blocks of 1 query
    np.testing.assert_allclose(vae.encode(x).latent_dist.mean.numpy(), full, atol=1e-6)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 3)).astype(np.float32) for _ in range(3))
    s = q @ k.transpose(0, 2, 1) / np.sqrt(3)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v
    got = chunked_attention(paddle.to_tensor(q), paddle.to_tensor(k), paddle.to_tensor(v))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


@paddle.no_grad()
def test_convolution_in_row_bands_equals_one_call(monkeypatch):
    case = next(c.values[0] for c in _cases() if c.values[0]["name"] == "vae_sd3-tiny_decode_h64w96")
    ref = _reference(case)
    vae = _vae("sd3-tiny")
    z = paddle.to_tensor(ref["in_z"])
    whole = vae.decode(z).sample.numpy()
    monkeypatch.setattr(vae_blocks, "_IM2COL_ELEMENTS", 5000)  # bands of 1-2 rows (some uneven)
    banded = vae.decode(z).sample
    np.testing.assert_allclose(banded.numpy(), whole, atol=1e-5)
    assert _max_diff(banded, ref["out_sample"]) < TOLERANCE
    image = paddle.to_tensor(np.random.default_rng(0).uniform(-1, 1, (1, 3, 40, 24)).astype(np.float32))
    banded_mean = vae.encode(image).latent_dist.mean.numpy()  # stride-2 (0, 1, 0, 1)-padded convs too
    monkeypatch.setattr(vae_blocks, "_IM2COL_ELEMENTS", 1 << 30)
    np.testing.assert_allclose(banded_mean, vae.encode(image).latent_dist.mean.numpy(), atol=1e-5)


def test_group_norm_is_accurate_for_offset_activations():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 8, 16, 16)) + 500.0).astype(np.float32)
    norm = GroupNorm(2, 8, epsilon=1e-6)
    xd = x.astype(np.float64).reshape(1, 2, -1)
    want = ((xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-6)).reshape(x.shape)
    np.testing.assert_allclose(norm(paddle.to_tensor(x)).numpy(), want, atol=1e-4)


@paddle.no_grad()
def test_odd_sizes_downsample_like_diffusers_padding():
    vae = _tiny(
        block_out_channels=[4, 8, 8],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
    )
    # pad one row/column at the bottom/right, 3x3 stride 2: out = (n - 2) // 2 + 1
    assert vae.encode(paddle.zeros([1, 3, 37, 20])).latent_dist.mean.shape == [1, 4, 9, 5]
    assert vae.decode(paddle.zeros([1, 4, 3, 5])).sample.shape == [1, 3, 12, 20]


@paddle.no_grad()
def test_quant_convs_exist_only_when_enabled_and_are_applied():
    plain = _tiny(use_quant_conv=False, use_post_quant_conv=False)
    quant = _tiny(use_quant_conv=True, use_post_quant_conv=True)
    assert "quant_conv.weight" not in torch_state_from(plain)
    state = torch_state_from(quant)
    assert state["quant_conv.weight"].shape == (8, 8, 1, 1) and state["post_quant_conv.weight"].shape == (
        4,
        4,
        1,
        1,
    )
    for conv, n in ((quant.quant_conv, 8), (quant.post_quant_conv, 4)):  # identity 1x1 convs
        conv.weight.set_value(paddle.eye(n).reshape([n, n, 1, 1]))
        conv.bias.set_value(paddle.zeros([n]))
    quant.set_state_dict({**quant.state_dict(), **plain.state_dict()})
    x = paddle.to_tensor(np.random.default_rng(0).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32))
    np.testing.assert_allclose(
        quant.encode(x).latent_dist.mean.numpy(), plain.encode(x).latent_dist.mean.numpy(), atol=1e-6
    )
    z = paddle.to_tensor(np.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(np.float32))
    np.testing.assert_allclose(quant.decode(z).sample.numpy(), plain.decode(z).sample.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        quant(x).sample.numpy(), quant.decode(quant.encode(x).latent_dist.mode()).sample.numpy(), atol=1e-6
    )


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types has 1 entries"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "AttnDownEncoderBlock2D"),
        ({"block_out_channels": [4, 6], "norm_num_groups": 4}, "multiples of norm_num_groups"),
        ({"act_fn": "tanh"}, "act_fn"),
    ],
)
def test_bad_configs_are_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**overrides)


def test_inputs_with_the_wrong_channel_count_are_rejected():
    vae = _tiny()
    with pytest.raises(ValueError, match=r"encode: expected \[B, 3, H, W\], got shape \[1, 4, 8, 8\]"):
        vae.encode(paddle.zeros([1, 4, 8, 8]))
    with pytest.raises(ValueError, match="decode"):
        vae.decode(paddle.zeros([1, 16, 2, 2]))
