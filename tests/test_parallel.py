"""CFG split and tensor parallelism: real gloo collectives on local processes, same numbers as one process.

Each (cfg, mp) replica is launched once (``tests.parallel_worker``) on tiny SD3 and SD3.5-style
checkpoints with 4 heads; the tests then compare its outputs with the single-process model and
pipeline, and read the collective counts and per-rank parameter bytes it measured.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle
import pytest

from pipelines import StableDiffusion3Pipeline
from pipelines.rank_pipeline import RankPipeline
from sd3_core import lora, lora_file
from sd3_core.collectives import CollectiveCounter, Collectives, SingleRank, single_process_groups
from sd3_core.dtypes import default_dtype
from sd3_core.folder_defaults import MAX_SEQUENCE_LENGTH_KEY
from sd3_core.tensor_parallel import (
    TensorParallelSD3Transformer,
    check_tensor_parallel,
    parameter_bytes,
    shard_slice,
)
from sd3_core.transformer import SD3Transformer2DModel
from tests.distributed import run_ranks
from tests.parallel_worker import case_arguments

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-4
NUM_LAYERS = 4
STEPS = 2
INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
# Tiny transformers whose 4 heads split over mp = 1, 2 and 4, on the fixtures' text encoders and VAE.
TINY = {
    "sd3": ("sd3-tiny", {}),
    "sd35": ("sd35-tiny", {"qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}),
}
CASES = {
    "negatives": {
        "prompt": ["a red cube", "a blue sphere on grass", "a city at night"],
        "negative_prompt": ["blurry", "", "low quality, noisy"],
        "guidance_scale": 5.0,
        "seed": [1, 2, 3],
    },
    "no_negatives": {"prompt": ["a cat", "a dog on a sofa"], "guidance_scale": 4.0, "seed": 7},
    "no_guidance": {"prompt": "a tree", "guidance_scale": 1.0, "seed": 3},
    # Active at step 1 of 2 (start * 2 < i < stop * 2): one more forward, on the positive prompts.
    "skip_layer_guidance": {
        "prompt": ["a red cube", "a dog"],
        "guidance_scale": 5.0,
        "seed": [4, 5],
        "skip_guidance_layers": [1],
        "skip_layer_guidance_start": 0.0,
        "skip_layer_guidance_stop": 1.0,
    },  # fmt: skip
    "callback": {
        "prompt": "a boat",
        "negative_prompt": "fog",
        "guidance_scale": 3.0,
        "seed": 11,
        "$callback": "halve_at_step_0",
    },  # fmt: skip
    # pipe._guidance_scale and pipe._interrupt set by a callback on rank 0 hold on every rank.
    "callback_state": {
        "prompt": ["a boat", "a cat"],
        "guidance_scale": 3.0,
        "seed": [12, 13],
        "$callback": "guidance_then_stop",
    },
    "prompt_embeds": {"$embeds": True, "guidance_scale": 5.0, "seed": [8, 9]},
    "lora": {"prompt": ["a red cube", "a cat"], "guidance_scale": 5.0, "seed": 6, "$lora": 0.7},
}
for _args in CASES.values():  # (no max_sequence_length: the folders' default, 16, applies)
    _args.update(height=64, width=64, num_inference_steps=STEPS)
CASES["callback_state"]["num_inference_steps"] = 3  # step 2 is interrupted
T5_LENGTH = 16
# Every kind of split layer (column-, row-parallel, adaLN) and replicated ones carry the LoRA.
LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "attn2.to_v",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.2", "norm1.linear", "norm1_context.linear",
    "norm_out.linear", "proj_out", "context_embedder",
)  # fmt: skip


def _randomise(model: paddle.nn.Layer, seed: int) -> None:
    # Non-zero biases everywhere, so a bias added on every rank (instead of once) would show.
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if len(p.shape) == 2:
            value = rng.standard_normal(p.shape) / np.sqrt(p.shape[0])
        elif name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name:
            value = 1 + 0.1 * rng.standard_normal(p.shape)
        else:
            value = 0.1 * rng.standard_normal(p.shape)
        p.set_value(paddle.to_tensor(value.astype(np.float32)).reshape(p.shape))


def tiny_config(**extra) -> dict:
    return dict(
        sample_size=16, patch_size=2, in_channels=16, num_layers=NUM_LAYERS, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=64,
        pooled_projection_dim=80, out_channels=16, pos_embed_max_size=12, **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory) -> dict[str, Path]:
    """Pipeline folders: the fixtures' encoders, VAE and scheduler with a 4-head transformer."""
    root = tmp_path_factory.mktemp("tp")
    folders = {}
    for seed, (name, (fixture, extra)) in enumerate(TINY.items()):
        folder = root / name
        shutil.copytree(FIXTURES / fixture, folder, ignore=shutil.ignore_patterns("transformer"))
        paddle.seed(seed)
        model = SD3Transformer2DModel(**tiny_config(**extra))
        _randomise(model, seed)
        model.save_pretrained(folder / "transformer", max_shard_size=200_000)  # sharded, as real checkpoints
        lora.inject_lora(model, "case", rank=2, targets=LORA_TARGETS)
        lora.random_lora_weights(model, "case", seed=10 + seed, std=0.3)
        lora_file.save_lora_weights(folder / "lora", model, "case")
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, MAX_SEQUENCE_LENGTH_KEY: T5_LENGTH}))
        pipe = StableDiffusion3Pipeline.from_pretrained(folder)
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            ["a lighthouse", "two birds"], negative_prompt=["rain", ""]
        )
        np.savez(
            folder / "embeds.npz", prompt_embeds=pos.numpy(), negative_prompt_embeds=neg.numpy(),
            pooled_prompt_embeds=pooled.numpy(), negative_pooled_prompt_embeds=neg_pooled.numpy(),
        )  # fmt: skip
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("inputs") / "inputs.npz"
    np.savez(
        path,
        hidden_states=rng.standard_normal((3, 16, 8, 6), dtype=np.float32),
        encoder_hidden_states=rng.standard_normal((3, 20, 128), dtype=np.float32),
        pooled_projections=rng.standard_normal((3, 80), dtype=np.float32),
        timestep=np.array([999.0, 500.0, 12.5], dtype=np.float32),
    )
    return path


@pytest.fixture(scope="module")
def single_process(tiny_pipelines, inputs) -> dict[str, np.ndarray]:
    """The references: one process, no collectives."""
    data = np.load(inputs)
    ref = {}
    for name, folder in tiny_pipelines.items():
        pipe = StableDiffusion3Pipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        with paddle.no_grad():
            ref[f"{name}/forward"] = pipe.transformer(
                *(paddle.to_tensor(data[k]) for k in INPUT_NAMES)
            ).sample.numpy()
        ref[f"{name}/bytes"] = parameter_bytes(pipe.transformer)
        for case, case_args in CASES.items():
            with case_arguments(pipe, folder, case_args) as args:
                latents = pipe(**args, output_type="latent").images
            ref[f"{name}/{case}"] = latents.numpy()
            ref[f"{name}/{case}/images"] = pipe.decode_latents(latents, "np")  # as pipe(output_type="np")
        for case, marker in FEATURES.items():  # the same case without its feature, to show it acts
            args = {k: v for k, v in CASES[case].items() if k not in marker}
            with case_arguments(pipe, folder, args) as args:
                ref[f"{name}/{case}/without"] = pipe(**args, output_type="latent").images.numpy()
    return ref


# The cases of an optional feature and the arguments that switch it on.
FEATURES = {
    "skip_layer_guidance": ("skip_guidance_layers",),
    "callback": ("$callback",),
    "callback_state": ("$callback",),
    "lora": ("$lora",),
}


def test_each_feature_changes_the_single_process_latents(single_process):
    for name in TINY:
        for case in FEATURES:
            assert (
                _max_diff(single_process[f"{name}/{case}"], single_process[f"{name}/{case}/without"]) > 1e-2
            )


# (cfg, mp) shapes; (1, 1) is the plain pipeline. Two launches: 8 processes hosting the larger
# shapes in turn (two cfg=1 x mp=4 replicas side by side, carved from the world by slots, as
# gloo replicas with cfg=2 are anyway), and 2 processes that are exactly one replica, where the
# mp and CFG collectives use the world group itself.
# world8 also shares text encoding: only mp rank 0 of each half holds the text encoders.
LAUNCHES = {"world8": (8, [(2, 4), (1, 4), (2, 2)], True), "world2": (2, [(1, 2), (2, 1)], False)}
PARAMS = [(launch, shape) for launch, (_, shapes, _) in LAUNCHES.items() for shape in shapes]
_RUNS: dict[str, tuple[list[dict], list[dict]]] = {}


def launch_run(launch: str, folders: dict[str, Path], inputs: Path, tmp: Path):
    """(per-rank arrays, per-rank reports) of one launch (cached for the module)."""
    if launch not in _RUNS:
        world_size, shapes, share = LAUNCHES[launch]
        out = tmp / launch
        out.mkdir()
        spec = {
            "shapes": shapes,
            "out": str(out),
            "inputs": str(inputs),
            "input_names": INPUT_NAMES,
            "models": {k: str(v) for k, v in folders.items()},
            "cases": CASES,
            "share_text_encoding": share,
        }
        run_ranks(world_size, "tests.parallel_worker", spec)
        arrays = [dict(np.load(out / f"rank{r}.npz")) for r in range(world_size)]
        reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
        _RUNS[launch] = arrays, reports
    return _RUNS[launch]


@dataclass
class Replica:
    cfg: int
    mp: int
    arrays: list[dict]  # per rank
    reports: list[dict]  # per rank
    keys: dict[str, str]  # model name -> key prefix in arrays and reports
    shared_text_encoding: bool


@pytest.fixture(params=PARAMS, ids=[f"{launch}-cfg{c}-mp{m}" for launch, (c, m) in PARAMS])
def replica(request, tiny_pipelines, inputs, tmp_path_factory):
    launch, (cfg, mp) = request.param
    arrays, reports = launch_run(launch, tiny_pipelines, inputs, tmp_path_factory.getbasetemp())
    keys = {name: f"cfg{cfg}-mp{mp}/{name}" for name in TINY}
    return Replica(cfg, mp, arrays, reports, keys, LAUNCHES[launch][2])


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


# ---- behaviour ---------------------------------------------------------------------------------


def test_every_rank_gets_the_single_process_velocity(replica, single_process):
    arrays, keys = replica.arrays, replica.keys
    for name, key in keys.items():
        for rank_arrays in arrays:
            assert _max_diff(rank_arrays[f"{key}/forward"], single_process[f"{name}/forward"]) < TOL


@pytest.mark.parametrize("case", CASES)
def test_every_rank_ends_with_the_single_process_latents(replica, single_process, case):
    arrays, keys = replica.arrays, replica.keys
    for name, key in keys.items():
        expected = single_process[f"{name}/{case}"]
        for rank_arrays in arrays:
            assert _max_diff(rank_arrays[f"{key}/{case}"], expected) < TOL
        assert _max_diff(arrays[0][f"{key}/{case}/images"], single_process[f"{name}/{case}/images"]) < TOL


def test_collectives_per_forward_are_two_per_block_plus_one_gather(replica):
    mp, reports, keys = replica.mp, replica.reports, replica.keys
    for report in reports:
        for key in keys.values():
            calls = report[key]["forward"]["calls"]
            expected = {"all_reduce": 2 * NUM_LAYERS, "all_gather": 1} if mp > 1 else {}
            assert calls == expected


def _calls(report: dict, case: str, phase: str = "denoise") -> dict[str, int]:
    return report[case][f"{phase}_collectives"]["calls"]


def test_collectives_per_denoising_step(replica):
    mp = replica.mp
    per_forward = 2 * NUM_LAYERS + 1 if mp > 1 else 0
    exchange = 1 if replica.cfg == 2 else 0
    per_generation = 1 if replica.shared_text_encoding and mp > 1 else 0  # embeddings to the mp group
    for report in replica.reports:
        for key in replica.keys.values():
            calls = functools.partial(_calls, report[key])
            assert sum(calls("no_negatives").values()) == STEPS * (per_forward + exchange)
            assert calls("no_negatives").get("all_gather", 0) == STEPS * ((mp > 1) + exchange)
            assert sum(calls("no_negatives", "encode").values()) == per_generation
            # Without guidance there is nothing to exchange: each half renders the same batch.
            assert sum(calls("no_guidance").values()) == STEPS * per_forward
            # Skip-layer guidance at one step: one more forward (without the skipped block's two
            # all-reduces) and, split, one more exchange.
            skipping = per_forward - 2 * len(CASES["skip_layer_guidance"]["skip_guidance_layers"]) * (mp > 1)
            expected = STEPS * (per_forward + exchange) + skipping + exchange
            assert sum(calls("skip_layer_guidance").values()) == expected
            # The callback runs on rank 0; its latents reach the others in one all-reduce per step.
            shared = STEPS if replica.cfg * mp > 1 else 0
            assert sum(calls("callback").values()) == STEPS * (per_forward + exchange) + shared
            # Precomputed embeddings: nothing to encode or share.
            assert sum(calls("prompt_embeds", "encode").values()) == 0


def test_mp2_ranks_hold_at_most_055_of_the_transformer(replica, single_process):
    mp, reports, keys = replica.mp, replica.reports, replica.keys
    for name, key in keys.items():
        ratios = [r[key]["param_bytes"] / single_process[f"{name}/bytes"] for r in reports]
        assert max(ratios) <= {1: 1.0, 2: 0.55, 4: 0.32}[mp], ratios


# ---- pieces ------------------------------------------------------------------------------------


def test_heads_must_divide_by_mp_before_anything_starts():
    check_tensor_parallel({"num_attention_heads": 24}, 4)
    with pytest.raises(ValueError, match=r"num_attention_heads=24 is not divisible by mp=5.*\[1, 2, 3, 4, 6"):
        check_tensor_parallel({"num_attention_heads": 24}, 5)


def test_shards_split_heads_hidden_units_and_adaln_outputs():
    # PyTorch layout: Linear weights are [out, in].
    assert shard_slice("transformer_blocks.0.attn.to_q.weight", (64, 64), 1, 2) == (
        slice(32, 64),
        slice(None),
    )
    assert shard_slice("transformer_blocks.3.attn.to_add_out.weight", (64, 64), 1, 2) == (
        slice(None),
        slice(32, 64),
    )
    assert shard_slice("transformer_blocks.3.attn.to_add_out.bias", (64,), 1, 2) is None
    assert shard_slice("transformer_blocks.0.norm1_context.linear.bias", (384,), 0, 4) == (slice(0, 96),)
    assert shard_slice("norm_out.linear.weight", (128, 64), 1, 2) == (slice(64, 128), slice(None))
    assert shard_slice("transformer_blocks.0.ff_context.net.2.weight", (64, 256), 0, 2) == (
        slice(None),
        slice(0, 128),
    )
    assert shard_slice("transformer_blocks.0.attn.norm_q.weight", (16,), 1, 2) is None
    assert shard_slice("context_embedder.weight", (64, 128), 1, 2) is None


def test_a_shard_keeps_its_slices_of_a_lora_file_and_cannot_save_one(tiny_pipelines):
    comm = Collectives(1, 2)  # rank 1 of 2; building a shard sends nothing
    with default_dtype("float32"):
        shard = TensorParallelSD3Transformer._build(tiny_config(), comm)
    whole = lora_file.read_lora_file(tiny_pipelines["sd3"] / "lora")
    local = shard.local_lora(whole).modules
    column, row = "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0"
    np.testing.assert_array_equal(local[column].b, whole.modules[column].b[32:])  # output rows 32..63
    np.testing.assert_array_equal(local[column].a, whole.modules[column].a)
    np.testing.assert_array_equal(local[row].a, whole.modules[row].a[:, 32:])  # input columns 32..63
    np.testing.assert_array_equal(local[row].b, whole.modules[row].b)
    assert local["proj_out"] is whole.modules["proj_out"]  # replicated layers keep the whole adapter
    lora_file.load_lora(shard, whole, adapter_name="case")
    with pytest.raises(lora.LoRAError, match="holds only its slices"):
        lora_file.lora_state_dict(shard, "case")


def test_sd3_medium_shard_bytes_for_mp2():
    """The real SD3-medium shapes, built lazily (nothing allocated)."""
    config = dict(
        sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )  # fmt: skip

    def state_numel(model):
        return sum(int(np.prod(t.shape)) for t in model.state_dict().values())

    with default_dtype("float32"), paddle.LazyGuard():
        full = state_numel(SD3Transformer2DModel(**config))
        shard = state_numel(TensorParallelSD3Transformer._build(config, Collectives(0, 2)))
    print(f"SD3-medium: full {full / 1e9:.3f} G values, mp=2 shard {shard / full:.3f} of it")
    assert shard / full <= 0.55


def test_all_reduce_sends_one_collective_for_many_tensors():
    counter = CollectiveCounter()

    class Doubling(Collectives):  # two ranks holding the same values
        def _all_reduce(self, flat):
            flat.scale_(2.0)

    tensors = [paddle.ones([2, 3]), paddle.full([4], 3.0), paddle.zeros([1, 1, 2])]
    out = Doubling(0, 2, counter).all_reduce_sum(tensors)
    assert [list(t.shape) for t in out] == [[2, 3], [4], [1, 1, 2]]
    assert float(out[1][0]) == 6.0
    assert counter.snapshot() == {"calls": {"all_reduce": 1}, "bytes": {"all_reduce": 4 * 12}}
    assert SingleRank(counter).all_reduce_sum(tensors) == tensors and counter.total_calls == 1


def test_rank_callbacks_share_call_state_and_refuse_what_cannot_be_shared():
    pipe = StableDiffusion3Pipeline.from_pretrained(FIXTURES / "sd3-tiny")
    rank = RankPipeline.of(pipe, single_process_groups())
    tensors = {"latents": paddle.ones([1, 2]), "prompt_embeds": paddle.ones([2, 3]),
               "pooled_prompt_embeds": paddle.ones([2, 4])}  # fmt: skip
    t = paddle.to_tensor([500.0])

    def stop(p, i, t, given):
        p._guidance_scale, p._interrupt = 2.0, True
        return given  # the tensors it was given: nothing to share but the latents

    rank._guidance_scale, rank._interrupt, rank._split = 4.0, False, False
    out = rank._shared_callback(stop, ("latents", "prompt_embeds"))(rank, 0, t, tensors)
    assert set(out) == {"latents"} and (rank._guidance_scale, rank._interrupt) == (2.0, True)

    def new_embeds(p, i, t, given):
        return {"prompt_embeds": given["prompt_embeds"] * 2}

    with pytest.raises(ValueError, match="may return only latents"):
        rank._shared_callback(new_embeds, ("prompt_embeds",))(rank, 0, t, tensors)

    def guidance_off(p, i, t, given):
        p._guidance_scale = 1.0

    rank._split = True
    with pytest.raises(ValueError, match=r"switched guidance off .* under the CFG split \(cfg=2\)"):
        rank._shared_callback(guidance_off, ("latents",))(rank, 0, t, tensors)


def test_report(tiny_pipelines, inputs, tmp_path_factory, single_process):
    """Prints the figures for the closing note (run with -s)."""
    lines = [
        "launch  shape      model  max|forward diff|  max|latent diff|  bytes/full  collectives/step (bytes)"
    ]
    for launch, shape in PARAMS:
        arrays, reports = launch_run(launch, tiny_pipelines, inputs, tmp_path_factory.getbasetemp())
        cfg, mp = shape
        for name in TINY:
            key = f"cfg{cfg}-mp{mp}/{name}"
            fwd = max(_max_diff(a[f"{key}/forward"], single_process[f"{name}/forward"]) for a in arrays)
            lat = max(
                _max_diff(a[f"{key}/{c}"], single_process[f"{name}/{c}"]) for a in arrays for c in CASES
            )
            ratio = max(r[key]["param_bytes"] for r in reports) / single_process[f"{name}/bytes"]
            step = reports[0][key]["no_negatives"]["denoise_collectives"]
            calls = {k: v / STEPS for k, v in step["calls"].items()}
            nbytes = sum(step["bytes"].values()) / STEPS
            lines.append(
                f"{launch:7} cfg{cfg}-mp{mp}  {name:5}  {fwd:.2e}  {lat:.2e}  {ratio:.3f}  {calls} ({nbytes:.0f} B)"
            )
    print("\n" + "\n".join(lines))
