"""Replica groups on a real local Ray: cfg x mp shard-worker actors, real gloo collectives, and
the same images as the single-process pipeline.

One Ray start for the module (8 logical GPUs: the GPU-kind bundles' actors compute on the CPU)
and three group launches that cover cfg in {1, 2} x mp in {1, 2, 4}; the groups of a launch start
and run side by side, each with its own placement group and collective world. Every group renders every case of
``tests.test_parallel`` with both tiny 4-head checkpoints (SD3 and SD3.5-style), loading the
second into the same ranks.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import paddle
import pytest

from actors.parallel_pipeline import ParallelStableDiffusion3Pipeline
from actors.replica import ReplicaSpec
from actors.replica_group import ReplicaGroup, ReplicaGroupBroken
from pipelines.stable_diffusion_3 import OUTPUT_TYPES, StableDiffusion3Pipeline
from sd3_core.inference_program import PROGRAM_CACHE_ENV
from tests import test_parallel
from tests.parallel_worker import case_arguments
from tests.test_parallel import CASES, NUM_LAYERS, STEPS, TINY, TOL

# test_parallel's fixtures: the tiny 4-head pipeline folders and the single-process references.
tiny_pipelines = test_parallel.tiny_pipelines
inputs = test_parallel.inputs
single_process = test_parallel.single_process

ray = pytest.importorskip("ray")

# Launched one after another; the groups of one launch run side by side. (device kind, cfg, mp)
LAUNCHES = [
    [("gpu", 1, 2), ("gpu", 2, 1), ("cpu", 1, 1)],
    [("gpu", 1, 4), ("gpu", 2, 2)],  # all 8 logical GPUs
    [("cpu", 2, 4)],  # 8 ranks, CPU-kind bundles
]
SHAPES = [(cfg, mp) for launch in LAUNCHES for _, cfg, mp in launch]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray.data  # noqa: F401  (its log handler binds stderr now, not a test's captured stream)

    programs = tempfile.mkdtemp(prefix="sd3-programs-")  # inference_optimize's cache, for the ranks
    ray.init(address="local", num_cpus=8, num_gpus=8, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {PROGRAM_CACHE_ENV: programs}})  # fmt: skip
    yield programs
    ray.shutdown()
    shutil.rmtree(programs, ignore_errors=True)


def _render_all(pipe: ParallelStableDiffusion3Pipeline, folders: dict) -> dict:
    """Every case with both models on one group: images, per-rank bytes and stats."""
    out = {}
    for name, folder in folders.items():
        if str(folder) != pipe.group.spec.model:
            pipe.group.load(str(folder))
        out[f"{name}/bytes"] = list(pipe.group.parameter_bytes)
        for case, case_args in CASES.items():  # LoRA loading, embeddings and callbacks included
            with case_arguments(pipe, folder, case_args) as args:
                out[f"{name}/{case}"] = pipe(**args, output_type="np").images
                out[f"{name}/{case}/adapters"] = pipe.get_list_adapters()  # rank 0's answer
            out[f"{name}/{case}/stats"] = pipe.group.last_stats
    return out


def _error_of(pipe: ParallelStableDiffusion3Pipeline, **overrides) -> Exception | None:
    try:
        pipe(**{**CASES["no_negatives"], "output_type": "np", **overrides})
    except Exception as e:
        return e
    return None


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_pipelines) -> dict[tuple[int, int], dict]:
    first = str(tiny_pipelines["sd3"])
    results = {}
    for launch in LAUNCHES:
        pipes = []
        try:
            with ThreadPoolExecutor(len(launch)) as pool:  # the launch's groups start concurrently
                starts = [
                    pool.submit(ParallelStableDiffusion3Pipeline.from_pretrained, first, cfg=cfg, mp=mp,
                                device=device, compute_device="cpu")
                    for device, cfg, mp in launch
                ]  # fmt: skip
            pipes = [f.result() for f in starts if f.exception() is None]  # closed below, whatever fails
            for f in starts:
                f.result()
            if launch is LAUNCHES[0]:
                results["bad_argument"] = _error_of(pipes[0], height=70)  # before the renders below
                results["pt"] = _error_of(pipes[0], output_type="pt")
                results["output_types"] = {
                    kind: pipes[0](**CASES["no_negatives"], output_type=kind).images for kind in OUTPUT_TYPES
                }
            with ThreadPoolExecutor(len(pipes)) as pool:  # the launch's groups render concurrently
                outs = pool.map(_render_all, pipes, [tiny_pipelines] * len(pipes))
                for pipe, out in zip(pipes, outs, strict=True):
                    results[(pipe.group.spec.cfg, pipe.group.spec.mp)] = out
            if launch is LAUNCHES[0]:
                group = pipes[0].group
                group.grace_seconds = 2.0
                ray.kill(group.workers[1])  # rank 0 will wait for it in the first collective
                results["dead_rank"] = _error_of(pipes[0])
                results["dead_rank_workers"] = len(group.workers)
        finally:
            for pipe in pipes:
                pipe.close()
    return results


@pytest.fixture(params=SHAPES, ids=[f"cfg{c}-mp{m}" for c, m in SHAPES])
def shape(request):
    return request.param


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def test_group_images_equal_the_single_process_pipeline(runs, single_process, shape):
    for name in TINY:
        for case in CASES:
            diff = _max_diff(runs[shape][f"{name}/{case}"], single_process[f"{name}/{case}/images"])
            assert diff < TOL, (shape, name, case, diff)


def test_lora_methods_run_on_every_rank(runs, shape):
    for name in TINY:
        for case, args in CASES.items():
            expected = {"transformer": ["case"]} if "$lora" in args else {}
            assert runs[shape][f"{name}/{case}/adapters"] == expected, case


def test_group_reports_per_rank_transformer_bytes(runs, single_process, shape):
    cfg, mp = shape
    for name in TINY:
        per_rank = runs[shape][f"{name}/bytes"]
        assert len(per_rank) == cfg * mp
        ratio = max(per_rank) / single_process[f"{name}/bytes"]
        assert ratio <= {1: 1.0, 2: 0.55, 4: 0.32}[mp], ratio


def test_group_collectives_per_denoising_step(runs, shape):
    cfg, mp = shape
    per_forward = 2 * NUM_LAYERS + 1 if mp > 1 else 0
    for name in TINY:
        for stats in runs[shape][f"{name}/no_negatives/stats"]:
            assert stats["steps"] == STEPS
            calls = stats["denoise_collectives"]["calls"]
            assert sum(calls.values()) == STEPS * (per_forward + (cfg == 2))
            # With mp > 1 only mp rank 0 of each half encodes: one all-reduce shares the embeddings.
            assert sum(stats["encode_collectives"]["calls"].values()) == (mp > 1)


def test_an_error_every_rank_raises_reaches_the_caller_and_the_group_stays_usable(runs):
    error = runs["bad_argument"]
    assert isinstance(error, ValueError) and "height=70 is not a multiple of 16" in str(error)
    assert (1, 2) in runs  # the same group rendered every case afterwards


def test_every_output_type_comes_back_in_the_single_pipelines_form(runs):
    error, images = runs["pt"], runs["output_types"]
    assert isinstance(error, ValueError) and "write output_type='pd'" in str(error)
    array = images["np"]
    assert (
        images["pd"].shape == [array.shape[0], 3, *array.shape[1:3]] and images["pd"].dtype == paddle.float32
    )
    np.testing.assert_array_equal(images["pd"].numpy().transpose(0, 2, 3, 1), array)
    assert [np.asarray(p).tolist() for p in images["pil"]] == [
        np.asarray(p).tolist() for p in StableDiffusion3Pipeline.numpy_to_pil(array)
    ]
    assert images["latent"].shape == [array.shape[0], 16, array.shape[1] // 8, array.shape[2] // 8]


def test_a_dead_rank_breaks_the_group_instead_of_hanging_its_peers(runs):
    error = runs["dead_rank"]
    assert isinstance(error, ReplicaGroupBroken) and "of 2 ranks failed" in str(error), error
    assert runs["dead_rank_workers"] == 0  # torn down: actors and placement group released


def test_heads_not_divisible_by_mp_fail_before_any_actor_starts(ray_cluster, tiny_pipelines):
    groups_before = len(ray.util.placement_group_table())
    spec = ReplicaSpec(model=str(tiny_pipelines["sd3"]), device="gpu", mp=3)
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not divisible by mp=3.*\[1, 2, 4\]"):
        ReplicaGroup(spec)
    assert len(ray.util.placement_group_table()) == groups_before


def test_batch_job_rejects_an_mp_the_heads_do_not_divide(tiny_pipelines, tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "job"
    argv = ["generate", "--prompt", "a cat", "--output", str(out), "--model", str(tiny_pipelines["sd3"])]
    assert main([*argv, "--mp", "3", "--cfg-parallel"]) == 2
    assert "--mp 3: model" in capsys.readouterr().err and not out.exists()


def test_the_call_takes_exactly_the_single_pipelines_arguments():
    import inspect

    from pipelines import StableDiffusion3Pipeline

    single = inspect.signature(StableDiffusion3Pipeline.__call__)
    assert inspect.signature(ParallelStableDiffusion3Pipeline.__call__) == single
    pipe = ParallelStableDiffusion3Pipeline(group=None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'guidance'"):
        pipe("a cat", guidance=3.0)


def test_to_asks_for_the_groups_own_device_and_dtype_or_says_how_to_build_another():
    class Group:
        spec = ReplicaSpec(model="m", device="gpu", dtype="float16", cfg=2)

    pipe = ParallelStableDiffusion3Pipeline(group=Group())
    assert pipe.device == "gpu"
    for args, kwargs in [(("cuda",), {}), (("gpu:0", "float16"), {}), ((), {"torch_dtype": "torch.float16"}),
                         ((), {"paddle_device": "gpu", "silence_dtype_warnings": True})]:  # fmt: skip
        assert pipe.to(*args, **kwargs) is pipe
    for args in [("cpu",), ("cuda", "bfloat16")]:
        with pytest.raises(
            ValueError, match=r"compute on gpu in float16, fixed when it is built; close\(\) it"
        ):
            pipe.to(*args)
    with pytest.raises(ValueError, match="device='mps' is not a device here"):
        pipe.to("mps")


def test_the_lora_methods_are_the_single_pipelines_each_forwarded_to_every_rank():
    import inspect

    from pipelines.lora_loading import LORA_METHODS, SD3LoraLoaderMixin

    class Group:  # what ParallelStableDiffusion3Pipeline asks of its ReplicaGroup
        def call_pipeline(self, name, *args, **kwargs):
            calls.append((name, args, kwargs))
            return name

    public = {
        n for n, v in vars(ParallelStableDiffusion3Pipeline).items() if callable(v) and not n.startswith("_")
    }
    assert public - {"from_pretrained", "close", "to"} == set(LORA_METHODS)
    assert "save_lora_weights" not in LORA_METHODS  # a rank holds slices, not the whole adapter
    pipe = ParallelStableDiffusion3Pipeline(group=Group())
    for name in LORA_METHODS:
        single = inspect.signature(getattr(SD3LoraLoaderMixin, name))
        assert inspect.signature(getattr(ParallelStableDiffusion3Pipeline, name)) == single, name
        # Every parameter filled with a distinct value: each must reach the ranks, in its place.
        params = list(single.parameters.values())[1:]
        values = {p.name: f"{name}.{p.name}" for p in params if p.kind is not p.VAR_KEYWORD}
        keywords = {"revision": f"{name}.revision"} if any(p.kind is p.VAR_KEYWORD for p in params) else {}
        calls = []
        returned = getattr(pipe, name)(**values, **keywords)
        assert returned == (None if single.return_annotation == "None" else name), name  # rank 0's
        assert calls == [(name, tuple(values.values()), keywords)], name


def test_a_group_replica_runs_only_in_a_placed_pool_actor(ray_cluster, tiny_pipelines):
    from actors.parallel_pipeline import GroupReplica

    spec = ReplicaSpec(model=str(tiny_pipelines["sd3"]), device="gpu", cfg=2)
    groups_before = len(ray.util.placement_group_table())
    with pytest.raises(RuntimeError, match="PoolPlacementGroups"):
        GroupReplica(spec)  # here, in the driver: no placement group to take bundles from
    assert len(ray.util.placement_group_table()) == groups_before


def test_report(runs, single_process):
    """Figures for the closing note (run with -s)."""
    lines = ["shape       model  max|image diff|  bytes/full per rank  collectives/step (rank 0)"]
    for shape in SHAPES:
        for name in TINY:
            out = runs[shape]
            diff = max(_max_diff(out[f"{name}/{c}"], single_process[f"{name}/{c}/images"]) for c in CASES)
            full = single_process[f"{name}/bytes"]
            ratios = " ".join(f"{b / full:.3f}" for b in out[f"{name}/bytes"])
            stats = out[f"{name}/no_negatives/stats"][0]
            calls = {k: v / stats["steps"] for k, v in stats["denoise_collectives"]["calls"].items()}
            lines.append(f"cfg{shape[0]}-mp{shape[1]}  {name:5}  {diff:.2e}  {ratios}  {calls}")
    print("\n" + "\n".join(lines))


# ---- the batch job on replica groups ----------------------------------------------------------


def test_batch_job_renders_on_a_cfg_parallel_mp2_group(ray_cluster, tiny_pipelines, tmp_path, capsys):
    """`sd3 generate --mp 2 --cfg-parallel --device cpu --lora ...`: one pool actor holding a 2 x 2
    group whose ranks bake their slices of the adapter in; its PNGs are the single-process
    pipeline's images (adapter loaded, unfused) for the manifest's seeds."""
    import hashlib
    import io

    from PIL import Image

    from jobs import manifest
    from jobs.cli import main
    from pipelines import StableDiffusion3Pipeline
    from sd3_core.storage import read_bytes

    model, out = str(tiny_pipelines["sd3"]), str(tmp_path / "job")
    prompts = ["a red cube", "a blue sphere on grass", "a city at night"]
    argv = ["generate", *(a for p in prompts for a in ("--prompt", p)), "--output", out, "--model", model]
    argv += ["--mp", "2", "--cfg-parallel", "--device", "cpu", "--height", "64", "--width", "64"]
    argv += ["--steps", "2", "--guidance-scale", "5", "--negative-prompt", "blurry", "--no-progress"]
    lora_file = tiny_pipelines["sd3"] / "lora" / "pytorch_lora_weights.safetensors"
    argv += ["--lora", str(lora_file.parent), "--lora-scale", "0.7"]  # every kind of split layer
    groups_before = set(ray.util.placement_group_table())
    assert main(argv) == 0, capsys.readouterr().err
    deadline = time.monotonic() + 30  # the driver removes the pool's placement groups at the end
    while any(pg["state"] != "REMOVED" for pg in ray.util.placement_group_table().values()):
        assert time.monotonic() < deadline, ray.util.placement_group_table()
        time.sleep(0.5)
    made = [pg for pid, pg in ray.util.placement_group_table().items() if pid not in groups_before]
    assert len(made) == 1, made  # one per pool actor (--replicas 1), though Ray Data asks more often
    # Bundle r holds rank r (--device cpu: one CPU each); the last, the pool actor's token share.
    assert list(made[0]["bundles"].values()) == [{"CPU": 1.0}] * 4 + [{"CPU": 0.01}], made[0]
    assert made[0]["strategy"] == "STRICT_PACK"
    rows = [r for r in manifest.read_manifest(out).to_pylist() if r["status"] == "ok"]
    assert sorted(r["prompt"] for r in rows) == sorted(prompts)
    assert all("cfg2xmp2@" in r["replica"] for r in rows)
    identity = f"{lora_file}#sha256:{hashlib.sha256(lora_file.read_bytes()).hexdigest()}"
    assert {(r["lora"], r["lora_scale"]) for r in rows} == {(identity, 0.7)}
    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_file.parent, scale=0.7)
    expected = pipe(
        prompt=[r["prompt"] for r in rows], negative_prompt="blurry", seed=[r["seed"] for r in rows],
        height=64, width=64, num_inference_steps=2, guidance_scale=5.0, output_type="pil",
    ).images  # fmt: skip
    for row, image in zip(rows, expected, strict=True):
        got = np.asarray(Image.open(io.BytesIO(read_bytes(row["image"]))), dtype=np.int16)
        assert np.abs(got - np.asarray(image, dtype=np.int16)).max() <= 1, row["id"]


def test_a_cfg_parallel_group_with_inference_optimize_draws_the_same_images(
    ray_cluster, tiny_pipelines, single_process
):
    folder = str(tiny_pipelines["sd3"])
    pipe = ParallelStableDiffusion3Pipeline.from_pretrained(
        folder, cfg=2, mp=1, device="gpu", compute_device="cpu", inference_optimize=True
    )
    try:
        with case_arguments(pipe, folder, CASES["no_negatives"]) as args:
            images = pipe(**args, output_type="np").images
    finally:
        pipe.close()
    assert _max_diff(images, single_process["sd3/no_negatives/images"]) < 1e-3
    assert [p for p in os.listdir(ray_cluster) if not p.endswith(".lock")]  # both ranks ran programs
    with pytest.raises(ValueError, match="mp=2 shards run eagerly"):
        ReplicaSpec(model=folder, mp=2, inference_optimize=True)


def test_a_cfg_parallel_group_with_vae_tiling_decodes_in_tiles(ray_cluster, tiny_pipelines):
    from pipelines import StableDiffusion3Pipeline

    folder = str(tiny_pipelines["sd3"])
    spec = ReplicaSpec(model=folder, cfg=2, mp=1, device="gpu", vae_tiling=True)
    pipe = ParallelStableDiffusion3Pipeline(ReplicaGroup(spec, compute_device="cpu"))
    kwargs = dict(prompt="a lighthouse", negative_prompt="rain", height=96, width=96, num_inference_steps=1,
                  guidance_scale=4.0, seed=[5], output_type="np")  # 64 px VAE tiles: 2 x 2  # fmt: skip
    placement = pipe.group.placement_group
    try:
        images = pipe(**kwargs).images
    finally:
        pipe.close()
    assert ray.util.placement_group_table(placement)["state"] == "REMOVED"  # the group made it: it goes
    single = StableDiffusion3Pipeline.from_pretrained(folder)
    single.set_progress_bar_config(disable=True)
    untiled = single(**kwargs).images
    single.vae.enable_tiling()
    assert _max_diff(images, single(**kwargs).images) < 1e-3
    assert _max_diff(images, untiled) > 1e-2  # rank 0 really decoded in tiles
