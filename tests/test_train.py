"""DreamBooth training (pipelines/training; the job, jobs/train.py) on the tiny SD3 model: learning,
exact resume, accumulation, checkpointing, prior preservation, mixed precision, tracking, object
storage and Ray actors.

Images are 32x32 crops of small generated pictures; runs are a few dozen steps at most.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

from jobs.train import train
from pipelines.training import checkpoints
from pipelines.training.config import TrainConfig
from pipelines.training.data import SampleOrder, build_entries, read_parquet_table
from pipelines.training.loss import sample_prompts
from pipelines.training.optim import LossScaler, LRSchedule
from pipelines.training.trainer import Trainer
from sd3_core import lora, lora_file
from sd3_core.storage import StorageOptions, get_fs, list_files
from sd3_core.transformer import SD3Transformer2DModel
from tests.reference_cases import fixture_path
from tests.s3_server import make_bucket

MODEL = fixture_path("sd3-tiny")
REPO = Path(__file__).resolve().parent.parent


def make_images(folder: Path, n: int = 4, seed: int = 0) -> Path:
    """Red pictures with a green square at different places (40x48: resize + crop are exercised)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.zeros((40, 48, 3), np.uint8)
        a[..., 0] = 200
        a[8:24, 6 + 5 * i : 22 + 5 * i] = (20, 220, 60)
        Image.fromarray(a).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("instance"))


def config(instance_dir: Path, output: Path | str, **kw) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=MODEL,
        output_dir=str(output),
        instance_data_dir=str(instance_dir),
        instance_prompt="a photo of sks dog",
        resolution=32,
        train_batch_size=2,
        max_train_steps=8,
        learning_rate=1e-3,
        lr_warmup_steps=0,
        seed=0,
        checkpointing_steps=1000,
        max_sequence_length=16,
        report_to="none",
    )
    base.update(kw)
    return TrainConfig(**base)


def trained_weights(trainer: Trainer) -> dict[str, np.ndarray]:
    return {n: p.numpy().copy() for n, p in trainer.models.params.items()}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# ---- learning ------------------------------------------------------------------------------------


def test_lora_training_lowers_the_fixed_evaluation_loss(instance_dir, tmp_path):
    trainer = Trainer(config(instance_dir, tmp_path / "out", max_train_steps=40, learning_rate=1e-2, rank=4))
    trainer.setup()
    before = trainer.evaluation_loss()
    result = trainer.run()
    after = trainer.evaluation_loss()
    print(f"LoRA: fixed-set loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before
    # The written file is diffusers' LoRA file; loaded in a fresh model it gives the trained output.
    assert result.weights.endswith("pytorch_lora_weights.safetensors")
    fresh = SD3Transformer2DModel.from_pretrained(MODEL, subfolder="transformer")
    lora_file.load_lora(fresh, result.weights, "trained")
    lora.fuse_lora(fresh)
    inputs = [paddle.to_tensor(np.random.default_rng(1).standard_normal(s).astype(np.float32))
              for s in ([1, 16, 4, 4], [1, 16, 128], [1, 80])]  # fmt: skip
    t = paddle.to_tensor([500.0])
    with paddle.no_grad():
        ours = trainer.models.transformer(*inputs, t).sample.numpy()
        loaded = fresh(*inputs, t).sample.numpy()
    np.testing.assert_allclose(loaded, ours, atol=1e-4)


def test_full_finetune_lowers_the_loss_and_saves_a_diffusers_transformer(instance_dir, tmp_path):
    trainer = Trainer(
        config(instance_dir, tmp_path / "out", mode="full", max_train_steps=40, learning_rate=1e-3)
    )
    trainer.setup()
    before = trainer.evaluation_loss()
    result = trainer.run()
    after = trainer.evaluation_loss()
    print(f"full: fixed-set loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before
    saved = SD3Transformer2DModel.from_pretrained(result.weights)
    assert max_diff(trained_weights(trainer), {n: p.numpy() for n, p in saved.named_parameters()}) == 0.0
    assert (
        json.loads((Path(result.weights) / "config.json").read_text())["_class_name"]
        == "SD3Transformer2DModel"
    )


_DIFFUSERS_OUTPUT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1])
    pipe.load_lora_weights(sys.argv[2], adapter_name="trained")
    d = np.load(sys.argv[3])
    with torch.no_grad():
        out = pipe.transformer(hidden_states=torch.tensor(d["h"]), encoder_hidden_states=torch.tensor(d["e"]),
                               pooled_projections=torch.tensor(d["p"]), timestep=torch.tensor(d["t"])).sample
    np.save(sys.argv[4], out.numpy())
    """
)


@pytest.mark.skipif(
    not (REPO / ".refvenv" / "bin" / "python").exists(), reason="needs the reference venv (make reference)"
)
def test_a_trained_lora_file_gives_diffusers_our_fused_output(instance_dir, tmp_path):
    result = train(config(instance_dir, tmp_path / "out", max_train_steps=20, learning_rate=1e-2, rank=4, lora_alpha=8,
                          lora_blocks="0,2"))  # fmt: skip
    model = SD3Transformer2DModel.from_pretrained(MODEL, subfolder="transformer")
    lora_file.load_lora(model, result.weights)
    lora.fuse_lora(model)
    rng = np.random.default_rng(1)
    inputs = dict(h=rng.standard_normal([2, 16, 4, 4]), e=rng.standard_normal([2, 16, 128]), p=rng.standard_normal([2, 80]),
                  t=np.array([300.0, 700.0]))  # fmt: skip
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    np.savez(tmp_path / "in.npz", **inputs)
    with paddle.no_grad():
        ours = model(*(paddle.to_tensor(inputs[k]) for k in "hept")).sample.numpy()
    subprocess.run([str(REPO / ".refvenv/bin/python"), "-c", _DIFFUSERS_OUTPUT, MODEL, result.weights,
                    str(tmp_path / "in.npz"), str(tmp_path / "out.npy")], check=True, capture_output=True)  # fmt: skip
    theirs = np.load(tmp_path / "out.npy")
    print(f"trained LoRA in diffusers vs ours fused: max diff {np.abs(theirs - ours).max():.3g}")
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


# ---- exact resume ----------------------------------------------------------------------------------

_KILLED_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    from jobs.train import train
    from pipelines.training.config import TrainConfig
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    def kill(step):
        if step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real kill
    train(cfg, on_step_end=kill)
    """
)


def test_lora_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(instance_dir, tmp_path):
    settings = dict(
        max_train_steps=8, train_batch_size=3, repeats=2, random_flip=True, checkpointing_steps=4,
        lr_scheduler="cosine", lr_warmup_steps=2, learning_rate=5e-3, mixed_precision="fp16",
    )  # fmt: skip
    uninterrupted = Trainer(config(instance_dir, tmp_path / "a", **settings))
    uninterrupted.run()
    killed = config(instance_dir, tmp_path / "b", **settings)
    cfg_json = json.dumps({k: v for k, v in killed.__dict__.items() if k != "storage"})
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, cfg_json, "6"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [s for s, _ in checkpoints.list_checkpoints(str(tmp_path / "b"))] == [4]
    resumed = Trainer(replace(killed, resume_from_checkpoint="latest"))
    result = resumed.run()
    assert result.resumed_from.endswith("checkpoint-4") and [h["step"] for h in result.history] == [
        5,
        6,
        7,
        8,
    ]
    diff = max_diff(trained_weights(uninterrupted), trained_weights(resumed))
    print(f"LoRA resume: max |w_resumed - w_uninterrupted| = {diff:.3g}")
    assert diff <= 1e-5
    assert resumed.optimizer.step_count == uninterrupted.optimizer.step_count == 8


class TrainingInterrupted(RuntimeError):
    """What the tests raise from ``on_step_end`` to stop a run as a crash would."""


def test_full_finetune_resumed_from_a_named_checkpoint_matches(instance_dir, tmp_path):
    settings = dict(
        mode="full", max_train_steps=6, checkpointing_steps=3, lr_scheduler="linear", lr_warmup_steps=1
    )
    uninterrupted = Trainer(config(instance_dir, tmp_path / "a", **settings))
    uninterrupted.run()

    def stop(step):
        if step == 4:
            raise TrainingInterrupted("stopped after step 4")

    with pytest.raises(TrainingInterrupted):
        train(config(instance_dir, tmp_path / "b", **settings), on_step_end=stop)
    resumed = Trainer(config(instance_dir, tmp_path / "b", resume_from_checkpoint="checkpoint-3", **settings))
    resumed.run()
    diff = max_diff(trained_weights(uninterrupted), trained_weights(resumed))
    print(f"full resume: max |w_resumed - w_uninterrupted| = {diff:.3g}")
    assert diff <= 1e-5


def test_resuming_with_different_order_settings_is_refused(instance_dir, tmp_path):
    train(config(instance_dir, tmp_path, max_train_steps=2, checkpointing_steps=2))
    with pytest.raises(ValueError, match="train_batch_size: checkpoint 2 vs now 1"):
        train(
            config(
                instance_dir, tmp_path, max_train_steps=4, train_batch_size=1, resume_from_checkpoint="latest"
            )
        )


# ---- accumulation, checkpointing of activations ------------------------------------------------------


def test_accumulating_4_batches_of_1_equals_one_batch_of_4(instance_dir, tmp_path):
    runs = {}
    for name, (batch, accum) in {"4x1": (1, 4), "1x4": (4, 1)}.items():
        t = Trainer(config(instance_dir, tmp_path / name, mode="full", train_batch_size=batch,
                           gradient_accumulation_steps=accum, max_train_steps=3, learning_rate=1e-4))  # fmt: skip
        result = t.run()
        runs[name] = (t, result)
    diff = max_diff(trained_weights(runs["4x1"][0]), trained_weights(runs["1x4"][0]))
    losses = [[h["loss"] for h in r.history] for _, r in runs.values()]
    print(f"accumulation: max |w_4x1 - w_1x4| = {diff:.3g}; losses {losses}")
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert diff <= 1e-5


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(instance_dir, tmp_path, mode):
    grads = []
    for checkpointing in (False, True):
        t = Trainer(
            config(
                instance_dir, tmp_path / str(checkpointing), mode=mode, gradient_checkpointing=checkpointing
            )
        )
        t.setup()
        t.batch_loss([0, 1]).loss.backward()
        grads.append({n: p.grad.numpy() for n, p in t.models.params.items() if p.grad is not None})
    assert any(n.startswith("transformer_blocks.1.") for n in grads[1])  # recomputed blocks get gradients
    assert max_diff(*grads) <= 1e-6
    assert t.models.transformer.is_gradient_checkpointing


def test_cached_latents_and_text_embeddings_change_nothing_and_t5_runs_at_max_sequence_length(
    instance_dir, tmp_path
):
    runs = []
    for cached in (False, True):
        t = Trainer(config(instance_dir, tmp_path / str(cached), max_train_steps=3, random_flip=True,
                           cache_latents=cached, cache_text_embeddings=cached))  # fmt: skip
        t.run()
        runs.append(t)
    assert max_diff(trained_weights(runs[0]), trained_weights(runs[1])) <= 1e-5
    assert len(runs[1].encoder.latent_cache) == 4 and not runs[0].encoder.latent_cache
    embeds, _ = runs[1].encoder.text(["a photo of sks dog"])
    assert embeds.shape[1] == 77 + 16  # CLIP tokens + T5 at max_sequence_length


# ---- prior preservation -------------------------------------------------------------------------------


def test_prior_preservation_generates_class_images_and_keeps_the_class_prior(instance_dir, tmp_path):
    class_dir = tmp_path / "class"
    common = dict(mode="full", max_train_steps=25, learning_rate=1e-3, class_prompt="a photo of a cat",
                  class_data_dir=str(class_dir), num_class_images=2, class_inference_steps=2)  # fmt: skip
    with_pp = Trainer(config(instance_dir, tmp_path / "pp", with_prior_preservation=True, **common))
    with_pp.setup()
    assert len(list_files(str(class_dir), suffix=".png")) == 2  # rendered by the base pipeline
    class_before = with_pp.evaluation_loss(with_pp.data.classes)
    result = with_pp.run()
    assert all("prior_loss" in h for h in result.history)
    without = Trainer(config(instance_dir, tmp_path / "plain", **common))
    without.run()
    with_after, without_after = (
        with_pp.evaluation_loss(with_pp.data.classes),
        without.evaluation_loss(with_pp.data.classes),
    )
    print(
        f"prior preservation: class-set loss {class_before:.4f} -> with PP {with_after:.4f}, without {without_after:.4f}"
    )
    assert with_after < without_after


# ---- mixed precision ------------------------------------------------------------------------------------


def test_fp16_loss_scaling_makes_exactly_the_unscaled_update(instance_dir, tmp_path):
    runs = []
    for scaling in (False, True):
        t = Trainer(
            config(
                instance_dir,
                tmp_path / str(scaling),
                max_train_steps=4,
                mixed_precision="fp16",
                max_grad_norm=0.01,
            )
        )
        t.setup()
        t.scaler.enabled = scaling
        runs.append((t, t.run()))
    (plain, _), (scaled, result) = runs
    assert {h["loss_scale"] for h in result.history} == {2.0**16}
    assert scaled.optimizer.step_count == 4  # one AdamW update per step, not two
    diff = max_diff(trained_weights(plain), trained_weights(scaled))
    print(f"fp16 loss scale 65536 vs none: max weight diff {diff:.3g}")
    assert diff <= 1e-6
    # fp16 keeps the frozen base weights in half precision; the LoRA weights stay float32
    assert scaled.models.transformer.proj_out.weight.dtype == paddle.float16
    assert all(p.dtype == paddle.float32 for p in scaled.models.params.values())


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off(instance_dir, tmp_path):
    t = Trainer(config(instance_dir, tmp_path, mixed_precision="fp16"))
    t.setup()
    before = trained_weights(t)
    t.scaler.scale_loss(t.batch_loss([0, 1]).loss).backward()
    name, p = next(iter(t.models.params.items()))
    p.grad.set_value(paddle.full(p.grad.shape, float("inf"), p.grad.dtype))
    stats = t.optimizer_step()
    assert stats["applied"] == 0.0 and t.scaler.scale == 2.0**15 and t.optimizer.step_count == 0
    assert max_diff(before, trained_weights(t)) == 0.0
    t.scaler.scale_loss(t.batch_loss([2, 3]).loss).backward()
    assert t.optimizer_step()["applied"] == 1.0 and t.optimizer.step_count == 1
    scaler = LossScaler(enabled=True, growth_interval=2)
    assert [scaler.update(True), scaler.update(True)] == [True, True] and scaler.scale == 2.0**17


def test_bf16_trains_lora_on_half_precision_frozen_weights(instance_dir, tmp_path):
    t = Trainer(
        config(instance_dir, tmp_path, max_train_steps=20, learning_rate=1e-2, mixed_precision="bf16")
    )
    t.setup()
    assert t.models.transformer.proj_out.weight.dtype == paddle.bfloat16 and not t.scaler.enabled
    before = t.evaluation_loss()
    t.run()
    assert t.evaluation_loss() < 0.9 * before


# ---- schedules, data ------------------------------------------------------------------------------------


def test_lr_schedules():
    def lrs(name, **kw):
        s = LRSchedule(name, 1.0, total_steps=10, **kw)
        return [round(s.lr(i), 4) for i in (0, 2, 5, 10)]

    assert lrs("constant", warmup_steps=4) == [1, 1, 1, 1]
    assert lrs("constant_with_warmup", warmup_steps=4) == [0, 0.5, 1, 1]
    assert lrs("linear", warmup_steps=0) == [1, 0.8, 0.5, 0]
    assert lrs("cosine", warmup_steps=0) == [1, 0.9045, 0.5, 0]
    with pytest.raises(ValueError, match="lr_scheduler='step' is not one of"):
        LRSchedule("step", 1.0)


def test_parquet_table_of_bytes_and_uris_with_captions(instance_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = sorted(instance_dir.glob("*.png"))
    table = pa.table({
        "image": [images[0].read_bytes(), None, images[2].read_bytes()],
        "uri": [None, str(images[1]), None],
        "text": ["sks dog on grass", "", "sks dog, side view"],
    })  # fmt: skip
    table = table.set_column(0, "image", pa.array([{"bytes": b, "path": u} for b, u in
                                                     zip(table["image"].to_pylist(), table["uri"].to_pylist(), strict=True)]))  # fmt: skip
    pq.write_table(table, tmp_path / "data.parquet")
    items = read_parquet_table(
        str(tmp_path / "data.parquet"), "image", "text", default_prompt="a photo of sks dog"
    )
    assert [p for _, p, _ in items] == ["sks dog on grass", "a photo of sks dog", "sks dog, side view"]
    entries = build_entries(items, 32, seed=0, center_crop=True, random_flip=True, repeats=2)
    assert len(entries) == 6 and entries[0].pixels.shape == (3, 32, 32)
    assert -1.0 <= min(e.pixels.min() for e in entries) and max(e.pixels.max() for e in entries) <= 1.0
    order = SampleOrder(6, seed=0)
    assert sorted(order.entry_at(p) for p in range(6)) == list(range(6))  # each epoch is a permutation
    assert [order.entry_at(p) for p in range(6, 12)] != [order.entry_at(p) for p in range(6)]


# ---- tracking -------------------------------------------------------------------------------------------


def test_wandb_offline_run_holds_metrics_and_validation_images(instance_dir, tmp_path, monkeypatch):
    from tests.wandb_offline import read_offline_history

    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = train(config(instance_dir, tmp_path, max_train_steps=4, train_batch_size=2, report_to="wandb",
                          validation_prompt="sks dog in a bucket", validation_epochs=1, num_validation_images=1,
                          validation_inference_steps=2))  # fmt: skip
    run_dir = Path(result.wandb_run_dir)
    assert run_dir.name.startswith("offline-run-") and run_dir.parent.parent == tmp_path / "logs"
    rows = read_offline_history(str(run_dir))
    metrics = [r for r in rows if "loss" in r]
    assert [r["_step"] for r in metrics] == [1, 2, 3, 4]
    assert all(r["lr"] == 1e-3 and r["samples_per_second"] > 0 for r in metrics)
    logged_images = [f for r in rows for key, files in r.items() if key.endswith("/filenames") for f in files]
    # 4 images / batch 2: an epoch every 2 steps -> validation at steps 2 and 4, plus the final one
    assert len(logged_images) == 3 and all((run_dir / "files" / f).is_file() for f in logged_images)
    assert sorted(Path(u).parent.name for u in result.validation_images) == ["final", "step-2", "step-4"]


# ---- object storage ------------------------------------------------------------------------------------


def test_data_and_checkpoints_on_object_storage(instance_dir, tmp_path, s3_endpoint):
    bucket = make_bucket(s3_endpoint)
    options = StorageOptions.from_env()
    fs, _ = get_fs(f"s3://{bucket}", options)
    for f in sorted(instance_dir.glob("*.png")):
        fs.put_file(str(f), f"{bucket}/dog/{f.name}")
    output = f"s3://{bucket}/runs/dog"
    cfg = config(instance_dir, output, instance_data_dir=f"s3://{bucket}/dog/", max_train_steps=6,
                 checkpointing_steps=2, checkpoints_total_limit=2, storage=options)  # fmt: skip
    first = Trainer(cfg)
    first.run()
    assert [s for s, _ in checkpoints.list_checkpoints(output, options)] == [4, 6]  # keep the last 2
    assert fs.exists(f"{bucket}/runs/dog/pytorch_lora_weights.safetensors")
    resumed = Trainer(replace(cfg, max_train_steps=8, resume_from_checkpoint="latest"))
    result = resumed.run()
    assert [h["step"] for h in result.history] == [7, 8]
    local = Trainer(config(instance_dir, tmp_path, max_train_steps=8))
    local.run()
    assert max_diff(trained_weights(local), trained_weights(resumed)) <= 1e-5


# ---- on Ray ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_with_devices():
    """A local Ray whose node offers one (logical) NPU and one GPU; actors compute on CPU."""
    import ray

    os.environ["SD3_TRAIN_PADDLE_DEVICE"] = "cpu"
    ray.init(address="local", num_cpus=2, num_gpus=1, resources={"NPU": 1}, include_dashboard=False, logging_level="WARNING",
             configure_logging=False)  # fmt: skip
    yield
    ray.shutdown()
    os.environ.pop("SD3_TRAIN_PADDLE_DEVICE", None)


@pytest.mark.parametrize("device,resource", [("npu", "NPU"), ("gpu", "GPU")])
def test_training_runs_as_a_ray_actor_on_a_node_with_the_device(
    ray_with_devices, instance_dir, tmp_path, device, resource
):
    from jobs.train import run_on_ray
    from pipelines.training.devices import NPU_FLAGS

    result = run_on_ray(config(instance_dir, tmp_path, max_train_steps=2, device=device))
    info = result["info"]
    assert info["assigned_resources"].get(resource) == 1.0
    assert result["global_step"] == 2 and Path(result["weights"]).is_file()
    if device == "npu":
        assert info["flags"] == NPU_FLAGS  # PaddleMIX's NPU settings, set before paddle loaded
    else:
        assert all(v is None for v in info["flags"].values())


def test_cli_accepts_the_reference_command_and_submit_checks_it(capsys):
    from jobs.cli import build_parser, main
    from jobs.train_cli import config_from_args

    command = """train dreambooth-lora --pretrained_model_name_or_path=m --instance_data_dir=dog --output_dir=out
      --mixed_precision=fp16 --instance_prompt=a_photo_of_sks_dog --resolution=512 --train_batch_size=1
      --gradient_accumulation_steps=4 --learning_rate=5e-5 --report_to=wandb --lr_scheduler=constant
      --lr_warmup_steps=0 --max_train_steps=500 --validation_prompt=x --validation_epochs=25 --seed=0
      --checkpointing_steps=250 --not_validation_final --rank 8 --device npu""".split()
    cfg = config_from_args(build_parser().parse_args(command))
    assert (cfg.mode, cfg.mixed_precision, cfg.gradient_accumulation_steps, cfg.rank, cfg.device) == (
        "lora",
        "fp16",
        4,
        8,
        "npu",
    )
    assert cfg.not_validation_final and cfg.max_sequence_length is None  # None: the model folder's default
    assert cfg.caption_dropout == 0.0
    # `sd3 submit train ...`: the arguments are checked, then Ray is contacted (closed port here).
    assert main(["submit", "--address", "http://127.0.0.1:9", *command]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err


def test_sd3_train_local_writes_the_lora(instance_dir, tmp_path, capsys):
    from jobs.cli import main

    argv = ["train", "dreambooth-lora", f"--pretrained_model_name_or_path={MODEL}", f"--instance_data_dir={instance_dir}",
            "--instance_prompt", "a photo of sks dog", f"--output_dir={tmp_path}", "--resolution=32", "--train_batch_size=2",
            "--max_train_steps=2", "--max_sequence_length=16", "--report_to=none", "--device=cpu", "--local"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["global_step"] == 2 and out["weights"] == str(tmp_path / "pytorch_lora_weights.safetensors")


def test_sd3_train_names_an_unwritable_output_dir(instance_dir, capsys):
    from jobs.cli import main

    # /sys refuses new entries even to root (EPERM): the job's PermissionError, not a traceback.
    argv = ["train", "dreambooth-lora", f"--pretrained_model_name_or_path={MODEL}", f"--instance_data_dir={instance_dir}",
            "--instance_prompt", "a photo of sks dog", "--output_dir=/sys/sd3-train-out", "--resolution=32",
            "--max_train_steps=1", "--report_to=none", "--device=cpu", "--local"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sd3 train: error: output /sys/sd3-train-out is not writable" in err and "Traceback" not in err


def test_caption_dropout_replaces_a_seeded_fraction_of_prompts_by_the_empty_prompt(instance_dir, tmp_path):
    from pipelines.training.data import Entry

    entries = [("i", k, Entry(np.zeros((2, 2, 3), np.uint8), f"prompt {k}", "x")) for k in range(400)]
    positions = list(range(400))
    dropped = sample_prompts(entries, positions, 1, seed=0, caption_dropout=0.25)
    assert 0.18 < dropped.count("") / 400 < 0.32
    assert all(p in ("", f"prompt {k}") for k, p in enumerate(dropped))
    # keyed by position: the same samples are dropped in another run and in another batch split
    again = sample_prompts(entries[:7], positions[:7], 1, seed=0, caption_dropout=0.25)
    assert again == dropped[:7]
    assert sample_prompts(entries, positions, 1, seed=0, caption_dropout=0.0) == [
        e.prompt for _, _, e in entries
    ]
    with pytest.raises(ValueError, match="caption_dropout"):
        Trainer(config(instance_dir, tmp_path, caption_dropout=1.0))


def test_t5_length_defaults_to_the_model_folders_own(instance_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_max_sequence_length": 12}))
    trainer = Trainer(config(instance_dir, tmp_path / "out", pretrained_model_name_or_path=str(folder),
                             max_sequence_length=None, max_train_steps=1))  # fmt: skip
    trainer.setup()
    assert trainer.config.max_sequence_length == 12
    embeds, _ = trainer.encoder.text(["a photo of sks dog"])
    assert embeds.shape[1] == 77 + 12


def test_the_command_line_takes_every_default_from_train_config():
    import dataclasses

    from jobs.cli import build_parser
    from jobs.train_cli import config_from_args

    command = ["train", "dreambooth", "--pretrained_model_name_or_path=m", "--dataset=d", "--output_dir=o"]
    cfg = config_from_args(build_parser().parse_args(command))
    reference = TrainConfig(
        pretrained_model_name_or_path="m", dataset="d", output_dir="o", mode="full", device="gpu"
    )
    # The command line's only own default: it trains on a GPU (storage: from the environment).
    assert dataclasses.replace(cfg, storage=reference.storage) == reference
    # Every field but the derived ones is a flag of the same name.
    parser = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in parser._subparsers._group_actions[0].choices["dreambooth"]._actions}
    derived = {"mode", "storage", "cache_text_embeddings", "validation_guidance_scale"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - derived <= flags
