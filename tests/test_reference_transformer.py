"""reference_forward (the plain one-sample MM-DiT) is what the optimised forwards compute."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from sd3_core.batched_transformer import ATTENTION_LAYOUTS, BatchedSD3Transformer
from sd3_core.lora import DEFAULT_TARGETS, inject_lora, random_lora_weights
from sd3_core.reference_transformer import reference_forward
from sd3_core.transformer import SD3Transformer2DModel
from tests.test_transformer import CASES, case_inputs, fixture_model

#: Largest allowed max |difference| as a fraction of max |reference output|. The forwards differ
#: only in float32 rounding (op order: fused LayerNorm affine, addmm, [image, context] vs
#: [context, image] attention rows, per-head vs batched matmuls): measured at most 5e-7 between
#: our forwards and 2.2e-6 against diffusers' PyTorch outputs. 1e-5 leaves room for other BLAS
#: builds and is still 10x below what any one misread tensor moves
#: (test_every_parameter_reaches_the_output: at least 2e-4).
TOLERANCE = 1e-5

_BASE = dict(
    sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=32,
    pooled_projection_dim=80, out_channels=16, pos_embed_max_size=12,
)  # fmt: skip
# Odd everything: patch 3, 3 heads of 4, channels 3 -> 5, a 4x6 grid cropped off-centre from 7x7,
# dual attention in a middle block and in the last (context_pre_only) one.
_ODD = dict(
    sample_size=9, patch_size=3, in_channels=3, num_layers=4, attention_head_dim=4,
    num_attention_heads=3, joint_attention_dim=7, caption_projection_dim=12,
    pooled_projection_dim=5, out_channels=5, pos_embed_max_size=7, qk_norm="rms_norm",
    dual_attention_layers=(1, 3),
)  # fmt: skip
#: name -> (model config, latent height and width, text tokens)
CONFIGS = {
    "sd3": (_BASE, (16, 24), 9),
    "sd35": ({**_BASE, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}, (24, 16), 7),
    "odd": (_ODD, (12, 18), 5),
}
TIMESTEPS = (0.0, 537.5, 1000.0)


def random_model(name: str, seed: int = 0) -> SD3Transformer2DModel:
    """A model of CONFIGS[name] with every parameter and the position table random (non-zero
    biases, non-unit norms), so a weight the reference misreads shows in the output."""
    paddle.seed(seed)
    model = SD3Transformer2DModel(**CONFIGS[name][0])
    rng = np.random.default_rng(seed)
    for pname, p in [*model.named_parameters(), ("pos_embed", model.pos_embed.pos_embed)]:
        if len(p.shape) == 2:
            value = rng.standard_normal(p.shape) / np.sqrt(p.shape[0])
        elif "norm" in pname and "linear" not in pname:
            value = 1 + 0.3 * rng.standard_normal(p.shape)
        else:
            value = 0.3 * rng.standard_normal(p.shape)
        p.set_value(paddle.to_tensor(value.astype(np.float32)).reshape(p.shape))
    return model


def random_inputs(name: str, batch: int = 3, seed: int = 1) -> list[paddle.Tensor]:
    config, (h, w), tokens = CONFIGS[name]
    rng = np.random.default_rng(seed)
    arrays = [
        rng.standard_normal((batch, config["in_channels"], h, w)),
        rng.standard_normal((batch, tokens, config["joint_attention_dim"])),
        rng.standard_normal((batch, config["pooled_projection_dim"])),
        np.array(TIMESTEPS[:batch]),
    ]
    return [paddle.to_tensor(a.astype(np.float32)) for a in arrays]


def reference_batch(model: SD3Transformer2DModel, inputs: list[paddle.Tensor]) -> np.ndarray:
    """The reference run sample by sample, stacked."""
    x, c, pooled, t = inputs
    samples = range(x.shape[0])
    return np.stack([reference_forward(model, x[i], c[i], pooled[i], t[i]).numpy() for i in samples])


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    assert actual.shape == reference.shape
    return float(np.abs(actual - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("name", CONFIGS)
def test_reference_equals_the_eager_forward(name):
    model, inputs = random_model(name), random_inputs(name)
    assert relative_error(model(*inputs).sample.numpy(), reference_batch(model, inputs)) <= TOLERANCE


@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
@pytest.mark.parametrize("name", CONFIGS)
def test_reference_equals_the_batched_forward(name, layout):
    model, inputs = random_model(name), random_inputs(name)
    batched = BatchedSD3Transformer(model, attention_layout=layout)(*inputs).numpy()
    assert relative_error(batched, reference_batch(model, inputs)) <= TOLERANCE


DIFFUSERS_CASES = [c for c in CASES if not c["args"]["skip_layers"]]


@pytest.mark.parametrize("case", DIFFUSERS_CASES, ids=[c["name"] for c in DIFFUSERS_CASES])
def test_reference_equals_diffusers_output_on_the_fixtures(case):
    inputs, expected = case_inputs(case)
    inputs[3] = inputs[3].reshape([-1]).expand([inputs[0].shape[0]])
    assert relative_error(reference_batch(fixture_model(case["fixture"]), inputs), expected) <= TOLERANCE


def _last_block_context_queries(model: SD3Transformer2DModel) -> set[str]:
    last = len(model.transformer_blocks) - 1
    return {f"transformer_blocks.{last}.attn.{n}" for n in ("add_q_proj.weight", "add_q_proj.bias", "norm_added_q.weight")}  # fmt: skip


@pytest.mark.parametrize("name", ["sd35", "odd"])
def test_every_parameter_reaches_the_output(name):
    """Each parameter and the position table, perturbed alone, moves the reference output by more
    than 10x the tolerance, and the eager forward follows; only the last block's context queries
    are dead (their attention outputs are discarded)."""
    model, inputs = random_model(name), random_inputs(name, batch=1)
    base = reference_batch(model, inputs)
    dead = _last_block_context_queries(model)
    tensors = [*model.named_parameters(), ("pos_embed.pos_embed", model.pos_embed.pos_embed)]
    assert len(tensors) > 60
    rng = np.random.default_rng(2)
    for pname, p in tensors:
        original = p.numpy().copy()
        # Random, not constant: LayerNorm erases a shift shared by all features of a token.
        noise = rng.standard_normal(original.shape).astype(np.float32)
        p.set_value(paddle.to_tensor(original + (original.std() + 0.1) * noise))
        ref = reference_batch(model, inputs)
        moved = relative_error(ref, base)
        assert relative_error(model(*inputs).sample.numpy(), ref) <= TOLERANCE, pname
        p.set_value(paddle.to_tensor(original))
        assert (moved == 0) if pname in dead else (moved >= 10 * TOLERANCE), (pname, moved)


def test_lora_layers_compute_with_their_effective_weight():
    model, inputs = random_model("sd35"), random_inputs("sd35")
    without = reference_batch(model, inputs)
    targets = (*DEFAULT_TARGETS, "attn2.to_q", "ff.net.2", "norm1.linear", "context_embedder", "proj_out")
    inject_lora(model, "a", rank=2, targets=targets)
    random_lora_weights(model, "a", seed=3, std=0.3)
    ref = reference_batch(model, inputs)
    assert relative_error(ref, without) >= 1e-2
    assert relative_error(model(*inputs).sample.numpy(), ref) <= TOLERANCE
    assert relative_error(BatchedSD3Transformer(model)(*inputs).numpy(), ref) <= TOLERANCE


def test_a_tensor_parallel_shard_is_refused():
    model, (x, c, pooled, t) = random_model("sd3"), random_inputs("sd3", batch=1)
    model.tensor_parallel_shards = lambda: 2
    with pytest.raises(ValueError, match="not a tensor-parallel shard"):
        reference_forward(model, x[0], c[0], pooled[0], t[0])


@pytest.mark.parametrize("max_size, latent", [(12, (16, 26)), (None, (16, 16))])
def test_a_grid_outside_the_position_table_is_refused(max_size, latent):
    model = SD3Transformer2DModel(**{**_BASE, "pos_embed_max_size": max_size})
    x = paddle.zeros([16, *latent])
    with pytest.raises(ValueError, match=f"pos_embed_max_size={max_size}"):
        reference_forward(model, x, paddle.zeros([3, 128]), paddle.zeros([80]), 500.0)
