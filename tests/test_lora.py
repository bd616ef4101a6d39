"""LoRA: parity with diffusers/peft in both directions, the file format, and adapter operations.

References (tests/fixtures/training, written by tools/reference/training_cases.py): LoRA files
saved by diffusers/peft load here and give diffusers' transformer output; LoRA files written by
our code (tests/lora_recipe.py) were loaded by diffusers, whose outputs are recorded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

from pipelines import StableDiffusion3Pipeline
from sd3_core import lora, lora_file
from sd3_core.layers import Linear
from sd3_core.lora import LoRAError, LoRALinear
from sd3_core.safetensors_io import SafetensorsFile, write_safetensors
from sd3_core.transformer import SD3Transformer2DModel
from tests.lora_recipe import OUR_LORAS, build_our_lora, write_our_lora

FIXTURES = Path(__file__).parent / "fixtures"
TRAINING = FIXTURES / "training"
LORA_DIR = TRAINING / "lora"
CASES = [c for c in json.loads((TRAINING / "cases.json").read_text())["cases"] if c["kind"] == "lora"]
TOL = 1e-4
DIFFUSERS_FILE = LORA_DIR / "diffusers_sd3-tiny_r4_alpha8_meta.safetensors"
OURS_FILE = LORA_DIR / "ours_sd3-tiny_r4_alpha6.safetensors"


def transformer(fixture: str = "sd3-tiny") -> SD3Transformer2DModel:
    return SD3Transformer2DModel.from_pretrained(FIXTURES / fixture, subfolder="transformer")


def case_data(case: dict) -> dict[str, np.ndarray]:
    with np.load(TRAINING / case["file"]) as data:
        return {k: data[k] for k in data.files}


def run(model: SD3Transformer2DModel, data: dict[str, np.ndarray]) -> np.ndarray:
    keys = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
    with paddle.no_grad():
        return model(*(paddle.to_tensor(data[f"in_{k}"]) for k in keys)).sample.numpy()


def tiny_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "in_hidden_states": rng.standard_normal((1, 16, 8, 8)).astype(np.float32),
        "in_encoder_hidden_states": rng.standard_normal((1, 12, 128)).astype(np.float32),
        "in_pooled_projections": rng.standard_normal((1, 80)).astype(np.float32),
        "in_timestep": np.array([400.0], dtype=np.float32),
    }


def weights(model: paddle.nn.Layer) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


# ---- parity with diffusers, both directions ----------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_transformer_output_matches_diffusers_with_the_same_lora(case):
    data, args = case_data(case), case["args"]
    model = transformer(case["fixture"])
    assert max_diff(run(model, data), data["out_base"]) < TOL
    before = weights(model)
    for load in args["loads"]:
        lora_file.load_lora(model, TRAINING / load["file"], adapter_name=load["adapter_name"])
    if args["set_adapters"]:
        lora.set_adapters(
            model, args["set_adapters"]["adapter_names"], args["set_adapters"]["adapter_weights"]
        )
    assert lora.active_adapters(model) == args["active_adapters"]
    out = run(model, data)
    assert max_diff(out, data["out_sample"]) < TOL
    assert max_diff(data["out_sample"], data["out_base"]) > 100 * TOL  # the LoRA does change the output
    if args["fuse"]:
        lora.fuse_lora(model, lora_scale=args["fuse"]["lora_scale"])
        assert max_diff(run(model, data), data["out_fused"]) < TOL
        lora.unfuse_lora(model)
        after = weights(model)
        assert all(np.array_equal(before[k], after[k]) for k in before)  # bit-exact base weights
        assert max_diff(run(model, data), data["out_sample"]) < TOL


@pytest.mark.parametrize("name", sorted(OUR_LORAS))
def test_our_lora_files_are_reproduced_byte_for_byte(name, tmp_path):
    path = write_our_lora(name, tmp_path)
    assert path.read_bytes() == (LORA_DIR / f"{name}.safetensors").read_bytes()


def test_pipeline_lora_methods_match_diffusers():
    case = next(c for c in CASES if c["name"] == "lora_two_adapters_sd3")
    data = case_data(case)
    pipe = StableDiffusion3Pipeline.from_pretrained(FIXTURES / "sd3-tiny")
    assert pipe.load_lora_weights(OURS_FILE, adapter_name="ours") == "ours"
    pipe.load_lora_weights(LORA_DIR, adapter_name="theirs", weight_name=DIFFUSERS_FILE.name)
    assert pipe.get_active_adapters() == ["theirs"]  # like diffusers: the last loaded one
    assert pipe.get_list_adapters() == {"transformer": ["ours", "theirs"]}
    pipe.set_adapters(["ours", "theirs"], [0.5, 1.5])
    assert max_diff(run(pipe.transformer, data), data["out_sample"]) < TOL
    pipe.fuse_lora()
    assert max_diff(run(pipe.transformer, data), data["out_fused"]) < TOL
    pipe.unfuse_lora()
    assert max_diff(run(pipe.transformer, data), data["out_sample"]) < TOL
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # fused, then unloaded: the LoRA stays baked in
    assert not any(isinstance(m, LoRALinear) for m in pipe.transformer.sublayers())
    assert max_diff(run(pipe.transformer, data), data["out_fused"]) < TOL
    assert pipe.get_list_adapters() == {}


def test_bake_is_fuse_then_unload_without_keeping_the_unfused_weights(monkeypatch):
    """bake_lora (what batch-job replicas use) gives fuse_lora + unload_lora's weights bit for bit,
    diffusers' fused output, and never holds more than one layer's pre-fuse copy."""
    case = next(c for c in CASES if c["name"] == "lora_two_adapters_sd3")
    data = case_data(case)

    def loaded() -> SD3Transformer2DModel:
        model = transformer()
        lora_file.load_lora(model, OURS_FILE, adapter_name="ours")
        lora_file.load_lora(model, DIFFUSERS_FILE, adapter_name="theirs")
        lora.set_adapters(model, ["ours", "theirs"], [0.5, 1.5])
        return model

    reference = loaded()
    lora.fuse_lora(reference)
    lora.unload_lora(reference)
    baked, copies = loaded(), []
    fuse = LoRALinear.fuse

    def counting_fuse(self, *args, **kwargs):
        fuse(self, *args, **kwargs)
        copies.append(sum(layer._unfused_weight is not None for _, layer in lora.lora_layers(baked)))

    monkeypatch.setattr(LoRALinear, "fuse", counting_fuse)
    lora.bake_lora(baked)
    assert len(copies) == 23 and max(copies) == 0  # every layer fused; no pre-fuse copy kept
    assert not any(isinstance(m, LoRALinear) for m in baked.sublayers())
    want, got = weights(reference), weights(baked)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    assert max_diff(run(baked, data), data["out_fused"]) < TOL


def test_load_scale_equals_set_adapters_weight():
    case = next(c for c in CASES if c["name"] == "lora_ours_sd3_weight03")
    data = case_data(case)
    model = transformer()
    lora_file.load_lora(model, OURS_FILE, adapter_name="ours", scale=0.3)
    assert max_diff(run(model, data), data["out_sample"]) < TOL


def test_call_scale_multiplies_adapter_weights_as_diffusers_joint_attention_scale():
    # diffusers' weight-0.3 output, reached by weight 1 times a call scale of 0.3.
    data = case_data(next(c for c in CASES if c["name"] == "lora_ours_sd3_weight03"))
    model = transformer()
    lora_file.load_lora(model, OURS_FILE, adapter_name="ours")
    unscaled = run(model, data)
    with lora.scaled_adapters(model, 0.3):
        assert max_diff(run(model, data), data["out_sample"]) < TOL
    assert max_diff(run(model, data), unscaled) == 0.0  # restored
    # Two adapters at 0.5 / 1.5: the call scale multiplies both.
    two = next(c for c in CASES if c["name"] == "lora_two_adapters_sd3")
    both = transformer()
    lora_file.load_lora(both, OURS_FILE, adapter_name="ours")
    lora_file.load_lora(both, DIFFUSERS_FILE, adapter_name="theirs")
    lora.set_adapters(both, ["ours", "theirs"], [0.25, 0.75])
    with lora.scaled_adapters(both, 2.0):
        assert max_diff(run(both, case_data(two)), case_data(two)["out_sample"]) < TOL


def test_pipeline_joint_attention_scale_is_this_calls_lora_scale():
    pipe = StableDiffusion3Pipeline.from_pretrained(FIXTURES / "sd3-tiny")
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red fox", height=64, width=64, num_inference_steps=2, guidance_scale=3.0, seed=[2],
                output_type="np")  # fmt: skip
    pipe.load_lora_weights(OURS_FILE, adapter_name="ours")
    full = pipe(**call).images
    scaled = pipe(**call, joint_attention_kwargs={"scale": 0.3}).images
    np.testing.assert_array_equal(pipe(**call).images, full)  # the scale was for that call only
    pipe.set_adapters("ours", 0.3)
    np.testing.assert_allclose(scaled, pipe(**call).images, rtol=0, atol=1e-6)
    assert max_diff(scaled, full) > 1e-3
    pipe.set_adapters("ours", 1.0)
    pipe.fuse_lora()  # as in diffusers, fused adapters are in the weights: the scale does not reach them
    np.testing.assert_allclose(pipe(**call, joint_attention_kwargs={"scale": 0.3}).images, full, atol=1e-5)


# ---- the file format ---------------------------------------------------------------------------


def test_written_file_has_diffusers_keys_pytorch_layout_and_adapter_config(tmp_path):
    model = build_our_lora("ours_sd3-tiny_r4_alpha6")
    path = lora_file.save_lora_weights(tmp_path, model)
    assert path.name == "pytorch_lora_weights.safetensors"
    with SafetensorsFile(path) as f:
        assert f.shape("transformer.transformer_blocks.0.attn.to_q.lora_A.weight") == (4, 32)  # [r, in]
        assert f.shape("transformer.transformer_blocks.0.attn.to_q.lora_B.weight") == (32, 4)  # [out, r]
        assert all(k.startswith("transformer.transformer_blocks.") for k in f.keys())
        assert len(f) == 2 * 23  # 8 targets x 3 blocks, minus the last block's absent to_add_out
        assert f.metadata["format"] == "pt"
        config = json.loads(f.metadata["lora_adapter_metadata"])
        a = f.get("transformer.transformer_blocks.1.attn.add_k_proj.lora_A.weight")
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 6
    layer = model.transformer_blocks[1].attn.add_k_proj
    np.testing.assert_array_equal(a, layer.lora_A["default"].weight.numpy().T)


def test_file_roundtrip_keeps_the_output(tmp_path):
    model = build_our_lora("ours_sd35-tiny_r2_alpha3_blocks01")
    data = tiny_inputs()
    expected = run(model, data)
    path = lora_file.save_lora_weights(tmp_path, model)
    fresh = transformer("sd35-tiny")
    lora_file.load_lora(fresh, path)
    assert max_diff(run(fresh, data), expected) < 1e-6


def test_half_precision_files_read_back_as_float32(tmp_path):
    model = build_our_lora("ours_sd3-tiny_r4_alpha6")
    path = lora_file.save_lora_weights(tmp_path, model, dtype="bfloat16")
    with SafetensorsFile(path) as f:
        assert str(f.dtype("transformer.transformer_blocks.0.attn.to_q.lora_A.weight")) == "bfloat16"
    module = lora_file.read_lora_file(path).modules["transformer_blocks.0.attn.to_q"]
    exact = model.transformer_blocks[0].attn.to_q.lora_A["default"].weight.numpy().T
    assert module.a.dtype == np.float32
    np.testing.assert_allclose(module.a, exact, rtol=1e-2, atol=1e-3)


def _rewrite(src: Path, dst: Path, rename, metadata: dict | None = None, extra: dict | None = None) -> Path:
    with SafetensorsFile(src) as f:
        tensors = {rename(k): np.array(f.get(k)) for k in f.keys()}
        meta = dict(f.metadata) if metadata is None else metadata
    tensors.update(extra or {})
    write_safetensors(dst, tensors, meta)
    return dst


KEY_VARIANTS = {
    "no_prefix": lambda k: k.removeprefix("transformer."),
    "peft_adapter_name": lambda k: k.replace(".lora_A.", ".lora_A.default.").replace(
        ".lora_B.", ".lora_B.default."
    ),
    "peft_model_prefix": lambda k: "base_model.model." + k.removeprefix("transformer."),
    "old_down_up": lambda k: k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."),
}


@pytest.mark.parametrize("variant", sorted(KEY_VARIANTS))
def test_key_variants_written_by_diffusers_and_peft_load_the_same(variant, tmp_path):
    data = tiny_inputs(1)
    reference = transformer()
    lora_file.load_lora(reference, DIFFUSERS_FILE)
    expected = run(reference, data)
    path = _rewrite(DIFFUSERS_FILE, tmp_path / "x.safetensors", KEY_VARIANTS[variant])
    model = transformer()
    lora_file.load_lora(model, path)
    assert max_diff(run(model, data), expected) < 1e-6


def test_alpha_comes_from_metadata_then_alpha_entries_then_rank(tmp_path):
    # Same tensors (r = 4): metadata alpha 8 -> scale 2; kohya-style .alpha entries of 2 -> 0.5;
    # neither -> alpha = rank (diffusers' rule).
    with_meta = lora_file.read_lora_file(DIFFUSERS_FILE)
    assert {m.alpha for m in with_meta.modules.values()} == {8.0}
    modules = list(with_meta.modules)
    alphas = {f"transformer.{m}.alpha": np.array(2.0, dtype=np.float32) for m in modules}
    kohya = lora_file.read_lora_file(_rewrite(DIFFUSERS_FILE, tmp_path / "a.safetensors", str, {}, alphas))
    assert {m.alpha for m in kohya.modules.values()} == {2.0}
    bare = lora_file.read_lora_file(_rewrite(DIFFUSERS_FILE, tmp_path / "b.safetensors", str, {}))
    assert {m.alpha for m in bare.modules.values()} == {4.0}


def test_rank_and_alpha_patterns_resolve_per_module():
    f = lora_file.read_lora_file(LORA_DIR / "diffusers_sd35-tiny_r3_alpha6_patterns_meta.safetensors")
    assert f.modules["transformer_blocks.1.attn.to_k"].rank == 2
    assert f.modules["transformer_blocks.0.attn.to_k"].rank == 3
    assert f.modules["transformer_blocks.2.attn.add_v_proj"].alpha == 1.5
    assert f.modules["transformer_blocks.2.attn.add_k_proj"].alpha == 6.0


def test_folder_with_pytorch_lora_weights_loads(tmp_path):
    shutil.copy(OURS_FILE, tmp_path / "pytorch_lora_weights.safetensors")
    assert len(lora_file.read_lora_file(tmp_path).modules) == 23


# ---- adapter operations ------------------------------------------------------------------------


def test_inject_targets_diffusers_default_set_and_leaves_output_unchanged():
    model = transformer()
    data = tiny_inputs()
    base = run(model, data)
    names = lora.inject_lora(model, rank=4)
    assert len(names) == 23 and "transformer_blocks.2.attn.to_add_out" not in names
    assert {n.split(".", 2)[2] for n in names} == set(lora.DEFAULT_TARGETS)
    assert isinstance(model.transformer_blocks[0].attn.to_out[0], LoRALinear)
    assert np.array_equal(run(model, data), base)  # B starts at zero
    assert len(lora.lora_parameters(model)) == 46


def test_inject_blocks_and_targets_are_configurable():
    model = transformer("sd35-tiny")
    names = lora.inject_lora(model, rank=2, targets=["to_q", "ff.net.2"], blocks=[1])
    assert names == [
        "transformer_blocks.1.attn.to_q",
        "transformer_blocks.1.attn2.to_q",
        "transformer_blocks.1.ff.net.2",
    ]
    with pytest.raises(LoRAError, match=r"blocks \[7\]"):
        lora.inject_lora(transformer(), blocks=[7])
    with pytest.raises(LoRAError, match="matches LoRA targets"):
        lora.inject_lora(transformer(), targets=["attn.nonexistent"])


def test_state_dict_keeps_base_names_and_adds_peft_style_adapter_keys():
    model = transformer()
    keys = set(model.state_dict())
    lora.inject_lora(model, "mine", rank=2)
    new = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert "transformer_blocks.0.attn.to_q.lora_A.mine.weight" in new and len(new) == 46


def test_fuse_unfuse_restores_base_weights_bit_for_bit():
    model = build_our_lora("ours_sd3-tiny_r4_alpha6")
    data = tiny_inputs()
    before, unfused_out = weights(model), run(model, data)
    lora.fuse_lora(model, lora_scale=0.7)
    assert not np.array_equal(
        model.transformer_blocks[0].attn.to_q.weight.numpy(), before["transformer_blocks.0.attn.to_q.weight"]
    )
    lora.fuse_lora(model)  # already fused: no double add
    lora.unfuse_lora(model)
    after = weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert np.array_equal(run(model, data), unfused_out)


def test_fused_output_equals_unfused_output_at_the_same_scale():
    model = build_our_lora("ours_sd3-tiny_r4_alpha6")
    data = tiny_inputs(2)
    lora.set_adapters(model, "default", 0.35)
    unfused = run(model, data)
    lora.set_adapters(model, "default", 0.5)
    lora.fuse_lora(model, lora_scale=0.7)  # 0.5 * 0.7 = 0.35
    assert max_diff(run(model, data), unfused) < 1e-5


def test_adapter_weight_scales_the_lora_contribution_linearly():
    model = build_our_lora("ours_sd3-tiny_r4_alpha6")
    data = tiny_inputs(3)
    lora.enable_lora(model, False)
    base = run(model, data)
    lora.enable_lora(model, True)
    full = run(model, data)
    lora.set_adapters(model, ["default"], [0.0])
    assert max_diff(run(model, data), base) < 1e-6
    # the LoRA perturbs every block, so compare a single layer's output for exact linearity
    layer = model.transformer_blocks[0].attn.to_q
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32))
    outs = {}
    for w in (0.0, 1.0, -2.5):
        lora.set_adapters(model, "default", w)
        outs[w] = layer(x).numpy()
    np.testing.assert_allclose(outs[-2.5] - outs[0.0], -2.5 * (outs[1.0] - outs[0.0]), atol=1e-5)
    assert max_diff(full, base) > 1e-2


def test_several_adapters_add_up_and_set_adapters_selects():
    model = transformer()
    data = tiny_inputs(4)
    base = run(model, data)
    lora_file.load_lora(model, OURS_FILE, adapter_name="a")
    only_a = run(model, data)
    lora_file.load_lora(model, DIFFUSERS_FILE, adapter_name="b")
    only_b = run(model, data)  # loading makes the new adapter the only active one
    lora.set_adapters(model, ["a", "b"])
    both = run(model, data)
    assert max_diff(both, base) > 1e-2 and max_diff(both, only_a) > 1e-2 and max_diff(both, only_b) > 1e-2
    layer = model.transformer_blocks[1].attn.to_v
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32))
    plain = Linear.forward(layer, x).numpy()
    lora.set_adapters(model, ["a", "b"], [0.25, 2.0])
    combined = layer(x).numpy()
    lora.set_adapters(model, "a", 0.25)
    a_part = layer(x).numpy() - plain
    lora.set_adapters(model, "b", 2.0)
    b_part = layer(x).numpy() - plain
    np.testing.assert_allclose(combined, plain + a_part + b_part, atol=1e-5)
    lora.delete_adapter(model, "a")
    assert lora.adapter_names(model) == ["b"]
    lora.unload_lora(model)
    assert max_diff(run(model, data), base) == 0.0


def test_unload_restores_plain_linears_and_state_dict():
    model = transformer()
    keys = list(model.state_dict())
    lora.inject_lora(model)
    lora.unload_lora(model)
    assert list(model.state_dict()) == keys
    assert type(model.transformer_blocks[0].attn.to_q) is Linear


def test_only_lora_parameters_get_gradients_when_the_base_is_frozen():
    model = transformer()
    lora.inject_lora(model, rank=2)
    lora.random_lora_weights(model, "default", seed=0)
    for p in model.parameters():
        p.stop_gradient = True
    for p in lora.lora_parameters(model):
        p.stop_gradient = False
    data = tiny_inputs()
    out = model(
        *(
            paddle.to_tensor(data[f"in_{k}"])
            for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
        )
    ).sample
    out.square().mean().backward()
    no_grad = [name for name, layer in lora.lora_layers(model) if layer.lora_A["default"].weight.grad is None]
    # the last block's context queries are never computed (its context output is discarded)
    assert no_grad == ["transformer_blocks.2.attn.add_q_proj"]
    assert all(float(p.grad.abs().sum()) > 0 for p in lora.lora_parameters(model) if p.grad is not None)
    assert model.transformer_blocks[0].attn.to_q.weight.grad is None


# ---- errors ------------------------------------------------------------------------------------


def test_lora_for_another_architecture_is_rejected_naming_file_and_modules():
    with pytest.raises(LoRAError) as e:
        lora_file.load_lora(
            transformer("sd3-tiny"), LORA_DIR / "ours_sd35-tiny_r2_alpha3_blocks01.safetensors"
        )
    assert "ours_sd35-tiny_r2_alpha3_blocks01.safetensors" in str(e.value)
    assert "transformer_blocks.0.attn2.to_k: no such sublayer" in str(e.value)


def test_shape_mismatch_names_module_and_expected_shape(tmp_path):
    a = np.zeros((4, 48), np.float32)
    b = np.zeros((32, 4), np.float32)
    path = tmp_path / "bad.safetensors"
    write_safetensors(
        path,
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
        },
    )
    with pytest.raises(LoRAError, match=r"bad.safetensors.*to_q: lora_A \[4, 48\].*expected \[r, 32\]"):
        lora_file.load_lora(transformer(), path)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((2, 32))},
            "needs lora_A and lora_B",
        ),
        (
            {"text_encoder.text_model.encoder.layers.0.q_proj.lora_A.weight": np.zeros((2, 32))},
            "other than the transformer",
        ),
        ({"transformer.transformer_blocks.0.attn.to_q.weight": np.zeros((32, 32))}, "not LoRA weights"),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": np.zeros(32)}, "DoRA"),
        (
            {
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((2, 32)),
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((32, 3)),
            },
            r"are not \[r, in\]",
        ),
    ],
    ids=["missing_B", "text_encoder", "not_lora", "dora", "rank_mismatch"],
)
def test_malformed_files_are_rejected_with_the_file_and_keys(tensors, message, tmp_path):
    path = tmp_path / "lora.safetensors"
    write_safetensors(path, {k: v.astype(np.float32) for k, v in tensors.items()})
    with pytest.raises(LoRAError, match=message) as e:
        lora_file.read_lora_file(path)
    assert str(path) in str(e.value)


def test_metadata_rank_must_match_the_tensors(tmp_path):
    meta = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({"transformer.r": 8, "transformer.lora_alpha": 8}),
    }
    path = _rewrite(DIFFUSERS_FILE, tmp_path / "x.safetensors", str, meta)
    with pytest.raises(LoRAError, match="metadata rank 8 but lora_A has rank 4"):
        lora_file.read_lora_file(path)


def test_missing_file_and_folder_errors(tmp_path):
    with pytest.raises(LoRAError, match="not found"):
        lora_file.read_lora_file(tmp_path / "nope.safetensors")
    with pytest.raises(LoRAError, match="no pytorch_lora_weights.safetensors"):
        lora_file.read_lora_file(tmp_path)


def test_adapter_name_errors():
    model = transformer()
    lora_file.load_lora(model, OURS_FILE, adapter_name="a")
    with pytest.raises(LoRAError, match="already loaded"):
        lora_file.load_lora(model, OURS_FILE, adapter_name="a")
    assert lora_file.load_lora(model, OURS_FILE) == "default_1"
    with pytest.raises(LoRAError, match=r"unknown adapter\(s\) \['zzz'\]"):
        lora.set_adapters(model, ["a", "zzz"])
    with pytest.raises(LoRAError, match="2 adapter names but 1 weights"):
        lora.set_adapters(model, ["a", "default_1"], [1.0])
    lora.fuse_lora(model)
    with pytest.raises(LoRAError, match="unfuse_lora"):
        lora.set_adapters(model, "default_1", 0.5)
    with pytest.raises(LoRAError, match="unfuse_lora"):
        lora.delete_adapter(model, "default_1")


def test_pipeline_rejects_text_encoder_components():
    pipe = StableDiffusion3Pipeline.__new__(StableDiffusion3Pipeline)
    pipe.transformer = transformer()
    with pytest.raises(ValueError, match=r"\['text_encoder'\] are not supported"):
        pipe.fuse_lora(components=["transformer", "text_encoder"])
