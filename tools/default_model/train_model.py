"""Train the default model's transformer with the project's own training job, and assemble the model.

1. ``assemble``: a pipeline folder OUT/base: the trained VAE, the tiny frozen CLIP-L/CLIP-G/T5 and
   tokenizers of the embedded model (jobs/default_model, made by tools/reference with seed 7), a
   randomly initialised SD3Transformer2DModel (``TRANSFORMER``, ~3.5 M parameters), the flow-match
   scheduler with shift 1 (64 image tokens: a 64x64 image is already destroyed at moderate noise,
   so no shift towards high noise), and ``_max_sequence_length: 32`` and ``_guidance_scale`` in
   model_index.json.
2. ``train``: ``sd3 train dreambooth --local`` full training of that transformer on the shapes
   table: rectified flow, logit-normal timesteps, 10 % caption dropout to "" (for CFG), T5 at 32
   tokens, cached latents; a checkpoint every ``--checkpointing_steps`` (resumable).
3. ``finish``: OUT/model = OUT/base with the trained transformer: the folder to ship.

    nice -n 19 .venv/bin/python -m tools.default_model.train_model --vae out/default_model/vae \\
        --data out/default_model/shapes-8192.parquet --out out/default_model --steps 5000 --batch_size 16
    (then the same with --steps 8000 and --steps 14000: the run extended, as
    tools/default_model/train_all.sh does)

Rerunning the same command resumes from the latest checkpoint (``--resume_from_checkpoint latest``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FROZEN = os.path.join(ROOT, "jobs", "default_model")  # tiny text encoders + tokenizers (seed 7)
T5_LENGTH = 32
TRANSFORMER = {
    "sample_size": 8,  # latent side of a 64x64 image
    "patch_size": 1,  # 64 image tokens of 8x8 pixels (patch 2 gave 16 tokens and blobby shapes)
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 128,  # the tiny T5's width
    "caption_projection_dim": 128,
    "pooled_projection_dim": 80,  # tiny CLIP-L 32 + CLIP-G 48
    "pos_embed_max_size": 32,  # a 32x32 patch grid: images up to 256x256 (trained at 64x64 only)
    "dual_attention_layers": [],
    "qk_norm": None,
}
SCHEDULER_SHIFT = 1.0
# The folder's default guidance (model_index.json ``_guidance_scale``), chosen after training on
# held-out seeds: ``evaluate --first_seed 4 --guidance_scale G`` for G in 1.5, 2, 3, 4, 7.
GUIDANCE_SCALE = 2.0


def assemble(vae: str, base: str, seed: int) -> None:
    """Write the untrained pipeline folder ``base`` (whole or not at all)."""
    import paddle

    from sd3_core.folder_defaults import GUIDANCE_SCALE_KEY, MAX_SEQUENCE_LENGTH_KEY
    from sd3_core.transformer import SD3Transformer2DModel

    staging = base + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for name in (
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    ):
        shutil.copytree(os.path.join(FROZEN, name), os.path.join(staging, name))
    os.makedirs(os.path.join(staging, "vae"))
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(os.path.join(vae, name), os.path.join(staging, "vae", name))
    with open(os.path.join(FROZEN, "scheduler", "scheduler_config.json")) as f:
        scheduler = json.load(f)
    scheduler["shift"] = SCHEDULER_SHIFT
    os.makedirs(os.path.join(staging, "scheduler"))
    with open(os.path.join(staging, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2, sort_keys=True)
    with open(os.path.join(FROZEN, "model_index.json")) as f:
        index = json.load(f)
    index[MAX_SEQUENCE_LENGTH_KEY] = T5_LENGTH
    index[GUIDANCE_SCALE_KEY] = GUIDANCE_SCALE
    with open(os.path.join(staging, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    paddle.seed(seed)
    SD3Transformer2DModel(**TRANSFORMER).save_pretrained(os.path.join(staging, "transformer"))
    os.replace(staging, base)


def train_args(base: str, data: str, run: str, steps: int, seed: int, batch_size: int, lr: float,
               checkpointing_steps: int) -> list[str]:  # fmt: skip
    """The `sd3` command line of the training run (what the README quotes)."""
    return [
        "train", "dreambooth", f"--pretrained_model_name_or_path={base}", f"--dataset={data}",
        "--caption_column=caption", f"--output_dir={run}", "--resolution=64", f"--train_batch_size={batch_size}",
        f"--max_train_steps={steps}", f"--learning_rate={lr}", "--lr_scheduler=cosine", "--lr_warmup_steps=200",
        "--weighting_scheme=logit_normal", "--caption_dropout=0.1", f"--max_sequence_length={T5_LENGTH}",
        "--cache_latents", "--adam_weight_decay=0.0", f"--checkpointing_steps={checkpointing_steps}",
        "--checkpoints_total_limit=2", "--resume_from_checkpoint=latest", f"--seed={seed}",
        "--report_to=none", "--device=cpu", "--local",
    ]  # fmt: skip


def stale_base(base: str) -> str | None:
    """What in ``base``'s transformer config differs from ``TRANSFORMER`` (None: nothing), so a
    work folder of an older recipe is not resumed (its run/ would continue the old model)."""
    with open(os.path.join(base, "transformer", "config.json")) as f:
        config = json.load(f)
    diffs = [f"{k} {config.get(k)!r} != {v!r}" for k, v in TRANSFORMER.items() if config.get(k) != v]
    return ", ".join(diffs) or None


def finish(base: str, run: str, model: str) -> None:
    """``model`` = ``base`` with the trained transformer."""
    staging = model + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base, staging, ignore=shutil.ignore_patterns("transformer"))
    shutil.copytree(os.path.join(run, "transformer"), os.path.join(staging, "transformer"))
    shutil.rmtree(model, ignore_errors=True)
    os.replace(staging, model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="trained VAE folder (tools/default_model/train_vae.py)")
    p.add_argument("--data", required=True, help="shapes Parquet table (tools/default_model/shapes_data.py)")
    p.add_argument("--out", required=True, help="work folder: base/, run/ (checkpoints), model/ (the result)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpointing_steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    base, run, model = (os.path.join(args.out, n) for n in ("base", "run", "model"))
    if not os.path.isdir(base):
        assemble(args.vae, base, args.seed)
    stale = stale_base(base)
    if stale:
        print(f"{base} was assembled by another recipe ({stale}); use a new --out, or remove {base} "
              f"and {run}", file=sys.stderr)  # fmt: skip
        return 2
    from jobs.cli import main as sd3

    command = train_args(
        base, args.data, run, args.steps, args.seed, args.batch_size, args.lr, args.checkpointing_steps
    )
    print("sd3 " + " ".join(command), file=sys.stderr, flush=True)
    start = time.time()
    code = sd3(command)
    if code:
        return code
    finish(base, run, model)
    print(f"wrote {model} ({time.time() - start:.0f}s of training in this call)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
