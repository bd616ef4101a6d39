"""inference_optimize: the batched forward and the cached static programs compute the eager model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import paddle
import pytest

from pipelines import StableDiffusion3Pipeline
from sd3_core import inference_program
from sd3_core.batched_transformer import ATTENTION_LAYOUTS, BatchedSD3Transformer
from sd3_core.inference_program import TransformerProgram, cpu_has_native_bfloat16, program_precision
from sd3_core.lora import inject_lora, random_lora_weights
from sd3_core.transformer import SD3Transformer2DModel
from tests.test_transformer import CASES, FIXTURES, case_inputs, fixture_model

DEFAULT_MODEL = Path(__file__).parent.parent / "jobs" / "default_model"
NEEDS_BF16 = pytest.mark.skipif(not cpu_has_native_bfloat16(), reason="this CPU has no native bfloat16")


def _timestep(inputs: list[paddle.Tensor]) -> paddle.Tensor:
    t = inputs[3].reshape([-1])
    return t.expand([inputs[0].shape[0]]) if t.shape[0] == 1 else t


@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_batched_forward_equals_the_eager_forward(case, layout):
    model = fixture_model(case["fixture"])
    inputs, expected = case_inputs(case)
    skip = case["args"]["skip_layers"] or ()
    eager = model(*inputs, skip_layers=skip).sample.numpy()
    batched = BatchedSD3Transformer(model, skip, layout)(*inputs[:3], _timestep(inputs)).numpy()
    np.testing.assert_allclose(batched, eager, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched, expected, rtol=0, atol=2e-5)  # diffusers' own output


def test_batched_forward_shares_unfused_weights_and_folds_lora():
    model = SD3Transformer2DModel.from_pretrained(FIXTURES / "sd3-tiny", subfolder="transformer")
    batched = BatchedSD3Transformer(model)
    assert batched.blocks[0].p.out_w is model.transformer_blocks[0].attn.to_out[0].weight  # no copy
    inject_lora(model, "a", rank=2)
    random_lora_weights(model, "a", seed=3)
    inputs, _ = case_inputs(CASES[0])
    eager = model(*inputs).sample.numpy()
    with_lora = BatchedSD3Transformer(model)(*inputs[:3], _timestep(inputs)).numpy()
    np.testing.assert_allclose(with_lora, eager, rtol=0, atol=1e-5)
    assert np.abs(with_lora - BatchedSD3Transformer(model.__class__.from_pretrained(
        FIXTURES / "sd3-tiny", subfolder="transformer"))(*inputs[:3], _timestep(inputs)).numpy()).max() > 1e-3  # fmt: skip


@pytest.fixture(scope="module")
def program_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("programs"))


@pytest.mark.parametrize("case", [c for c in CASES if "b2" in c["name"]], ids=lambda c: c["name"])
def test_program_matches_diffusers_reference(case, program_cache):
    program = TransformerProgram(fixture_model(case["fixture"]), cache_dir=program_cache)
    inputs, expected = case_inputs(case)
    out = program(*inputs, skip_layers=case["args"]["skip_layers"]).sample.numpy()
    eager = fixture_model(case["fixture"])(*inputs, skip_layers=case["args"]["skip_layers"]).sample.numpy()
    np.testing.assert_allclose(out, eager, rtol=0, atol=2e-3)  # the bound; measured ~1e-5
    np.testing.assert_allclose(out, expected, rtol=0, atol=5e-5)


def test_programs_are_exported_once_and_reused_from_disk(tmp_path):
    model = fixture_model("sd3-tiny")
    inputs, expected = case_inputs(CASES[0])
    first = TransformerProgram(model, cache_dir=str(tmp_path))
    first(*inputs)
    first(*inputs)
    assert first.exports == 1
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["key"]["hidden_states"] == list(inputs[0].shape)
    assert meta["key"]["paddle"] == paddle.__version__
    second = TransformerProgram(model, cache_dir=str(tmp_path))  # another process, same node
    np.testing.assert_allclose(second(*inputs).sample.numpy(), expected, rtol=0, atol=5e-5)
    assert second.exports == 0
    other_shape = case_inputs(CASES[1])[0]
    second(*other_shape)
    assert second.exports == 1


@pytest.mark.parametrize("damage", ["truncate", "delete_meta", "garbage_meta"])
def test_a_corrupt_cache_entry_is_rebuilt_not_trusted(tmp_path, damage):
    model = fixture_model("sd3-tiny")
    inputs, expected = case_inputs(CASES[0])
    TransformerProgram(model, cache_dir=str(tmp_path))(*inputs)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    if damage == "truncate":
        params = entry / "model.pdiparams"
        params.write_bytes(params.read_bytes()[:100])
    elif damage == "delete_meta":
        (entry / "meta.json").unlink()
    else:
        (entry / "meta.json").write_text("{not json")
    program = TransformerProgram(model, cache_dir=str(tmp_path))
    np.testing.assert_allclose(program(*inputs).sample.numpy(), expected, rtol=0, atol=5e-5)
    assert program.exports == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]  # no half-written entry


def test_lora_changes_select_another_program(tmp_path):
    model = SD3Transformer2DModel.from_pretrained(FIXTURES / "sd3-tiny", subfolder="transformer")
    program = TransformerProgram(model, cache_dir=str(tmp_path))
    inputs, _ = case_inputs(CASES[0])
    base = program(*inputs).sample.numpy()
    inject_lora(model, "a", rank=2)
    random_lora_weights(model, "a", seed=3)
    with_lora = program(*inputs).sample.numpy()
    np.testing.assert_allclose(with_lora, model(*inputs).sample.numpy(), rtol=0, atol=1e-4)
    assert np.abs(with_lora - base).max() > 1e-3
    from sd3_core.lora import enable_lora

    enable_lora(model, False)
    np.testing.assert_allclose(
        program(*inputs).sample.numpy(), base, rtol=0, atol=1e-6
    )  # the first entry again
    assert program.exports == 2


@NEEDS_BF16
def test_cpu_programs_run_the_fused_attention_kernel_in_both_precisions(tmp_path):
    model = fixture_model("sd35-tiny")  # qk-norm, dual attention and a context_pre_only block
    inputs, expected = case_inputs(next(c for c in CASES if c["fixture"] == "sd35-tiny"))
    f32 = TransformerProgram(model, "float32", str(tmp_path))
    bf16 = TransformerProgram(model, "bfloat16", str(tmp_path))
    assert f32.attention_layout == bf16.attention_layout == "cpu_fused"
    out = bf16(*inputs).sample.numpy()
    assert 0 < np.abs(out - expected).max() < 0.1  # bfloat16 math, near the float32 reference
    np.testing.assert_allclose(f32(*inputs).sample.numpy(), expected, rtol=0, atol=5e-5)
    # One exported float32 program serves both: bfloat16 is the predictor's oneDNN pass.
    assert (f32.exports, bf16.exports) == (0, 1)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    program = (entry / "model.json").read_text()
    dual = len(model.config.dual_attention_layers)
    assert program.count("self_dp_attention") == len(model.transformer_blocks) + dual


def test_tensor_parallel_shards_and_cpu_float16_are_refused():
    with pytest.raises(ValueError, match="float16"):
        TransformerProgram(fixture_model("sd3-tiny"), precision="float16")

    class Shard(SD3Transformer2DModel):
        def tensor_parallel_shards(self) -> int:
            return 2

    shard = Shard(num_layers=1, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
                  joint_attention_dim=32, pooled_projection_dim=16, sample_size=8, pos_embed_max_size=8)  # fmt: skip
    with pytest.raises(ValueError, match="tensor-parallel"):
        TransformerProgram(shard)


def test_half_precision_without_cpu_support_runs_float32_with_a_warning(monkeypatch):
    monkeypatch.setattr(inference_program, "_cpu_flags", lambda: {"avx2", "fma"})
    with pytest.warns(
        UserWarning, match=r"dtype='bfloat16'.* runs in float32: this CPU has no native bfloat16"
    ):
        assert program_precision("bfloat16") == "float32"
    with pytest.raises(ValueError, match="no native bfloat16"):
        TransformerProgram(fixture_model("sd3-tiny"), precision="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert program_precision("float32") == "float32"
    monkeypatch.setattr(inference_program, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert program_precision("bfloat16") == "bfloat16"


@pytest.fixture(scope="module")
def default_pipes(program_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(inference_program.PROGRAM_CACHE_ENV, program_cache)  # the default cache folder
        eager = StableDiffusion3Pipeline.from_pretrained(DEFAULT_MODEL)
        optimised = StableDiffusion3Pipeline.from_pretrained(DEFAULT_MODEL, inference_optimize=True)
    assert optimised.transformer_program.cache_dir == program_cache
    return eager, optimised


PROMPTS = ["a red circle on a white background", "a blue triangle on a black background"]


def test_optimised_pipeline_images_equal_eager_in_float32(default_pipes):
    eager, optimised = default_pipes
    assert optimised.transformer_program is not None and optimised.transformer_program.precision == "float32"
    kwargs = dict(num_inference_steps=8, seed=[1, 2], output_type="np")
    a = eager(PROMPTS, **kwargs).images
    b = optimised(PROMPTS, **kwargs).images
    assert np.abs(a - b).max() <= 2 / 255


@NEEDS_BF16
def test_bfloat16_images_are_within_4_levels_of_float32_on_the_default_model(default_pipes):
    eager, _ = default_pipes
    bf16 = StableDiffusion3Pipeline.from_pretrained(DEFAULT_MODEL, dtype="bfloat16")
    bf16.enable_inference_optimize(cache_dir=default_pipes[1].transformer_program.cache_dir)
    assert bf16.transformer_program.precision == "bfloat16"
    kwargs = dict(num_inference_steps=8, seed=[1, 2], output_type="np")
    a = eager(PROMPTS, **kwargs).images
    b = bf16(PROMPTS, **kwargs).images
    assert np.abs(a - b).mean() <= 4 / 255
    assert np.abs(a - b).max() > 0  # it really ran in bfloat16
