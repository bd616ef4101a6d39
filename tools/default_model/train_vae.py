"""Train the default model's VAE: a small 16-channel AutoencoderKL (4 levels, spatial factor 8).

Loss: mean squared reconstruction error of a posterior sample plus a small KL term (per latent
element, to N(0, I)), AdamW, a fixed number of steps over the shapes table. Afterwards the
latents of the whole table are sampled once and, as for SD3's VAE, ``shift_factor`` = their mean
and ``scaling_factor`` = 1 / their standard deviation (after the shift) go into the config, so the
transformer sees latents of mean 0 and variance 1.

    .venv/bin/python -m tools.default_model.train_vae --data out/default_model/shapes.parquet \
        --out out/default_model/vae --steps 600

A third stage (``--decoder_only --init STAGE2``) trains the decoder alone with edges weighted
``--edge_weight`` times more: the encoder, hence the latents and both factors, stay stage 2's,
and corners come out sharper (the strict square test measures them).

Progress (step, loss parts, seconds) is printed every ``--log_every`` steps; a snapshot of the
weights is written every ``--save_every`` steps (``OUT/``, with factors computed on the fly), so an
interrupted run still leaves a usable VAE.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import paddle

from sd3_core import runtime
from sd3_core.vae import AutoencoderKL

CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


def build_vae(seed: int, **overrides) -> AutoencoderKL:
    paddle.seed(seed)
    return AutoencoderKL(**{**CONFIG, **overrides})


def to_pixels(images: np.ndarray) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, H, W]`` float32 in [-1, 1]."""
    return np.ascontiguousarray((images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2))


def latent_factors(vae: AutoencoderKL, pixels: np.ndarray, seed: int, batch: int = 64) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)``: mean and 1/std of posterior samples over ``pixels``."""
    rng = np.random.default_rng([seed, 99])
    values = []
    with paddle.no_grad():
        for i in range(0, len(pixels), batch):
            posterior = vae.encode(paddle.to_tensor(pixels[i : i + batch])).latent_dist
            values.append(posterior.sample(generator=rng).numpy().astype(np.float64).ravel())
    z = np.concatenate(values)
    shift = float(z.mean())
    return shift, float(1.0 / (z - shift).std())


def reconstruction_adherence(vae: AutoencoderKL, count: int = 200, seed: int = 4242) -> dict:
    """The shape classifier on reconstructions of fresh generator samples: the ceiling of what a
    transformer trained in this VAE's latent space can score (plus the reconstruction MSE)."""
    from tools.default_model import shapes_data
    from tools.default_model.shape_classifier import classify

    samples = shapes_data.generate(count, seed)
    pixels = to_pixels(np.stack([np.asarray(image) for _, image in samples]))
    with paddle.no_grad():
        rec = vae.decode(vae.encode(paddle.to_tensor(pixels)).latent_dist.mode()).sample.numpy()
    images = ((rec.transpose(0, 2, 3, 1) + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
    readings = [classify(image) for image in images]
    out = {
        a: sum(
            getattr(r, a) == getattr(s, "shape" if a.startswith("shape") else a)
            for (s, _), r in zip(samples, readings, strict=True)
        )
        / count
        for a in ("colour", "background", "shape", "shape_lenient")
    }
    return {**out, "mse": float(((rec - pixels) ** 2).mean())}


def edge_weights(x: paddle.Tensor, weight: float) -> paddle.Tensor:
    """``[N, 1, H, W]``: 1 + ``weight`` near an edge of ``x`` (``[N, 3, H, W]`` in [-1, 1]), else 1.

    Edge pixels differ from their 3x3 mean (the image border replicated) by more than 0.05 in some
    channel: the pixels either side of a boundary; the mark is then widened by one pixel."""
    import paddle.nn.functional as F

    mean = F.avg_pool2d(F.pad(x, [1, 1, 1, 1], mode="replicate"), 3, stride=1)
    local = (x - mean).abs().max(axis=1, keepdim=True)
    edges = F.max_pool2d((local > 0.05).astype(x.dtype), 3, stride=1, padding=1)
    return 1.0 + weight * edges


def save(vae: AutoencoderKL, out: str, pixels: np.ndarray, seed: int, info: dict) -> dict:
    vae.eval()
    shift, scale = latent_factors(vae, pixels, seed)
    vae.train()
    vae.config["shift_factor"] = round(shift, 6)
    vae.config["scaling_factor"] = round(scale, 6)
    vae.save_pretrained(out)
    info = {**info, "shift_factor": shift, "scaling_factor": scale}
    with open(f"{out}/training.json", "w") as f:
        json.dump(info, f, indent=2)
    return info


def train(
    data: str,
    out: str,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    log_every: int = 50,
    save_every: int = 500,
    limit: int | None = None,
    init: str | None = None,
    check_count: int = 200,
    decoder_only: bool = False,
    edge_weight: float = 0.0,
) -> dict:
    from tools.default_model.shapes_data import load_images

    images, _ = load_images(data)
    pixels = to_pixels(images[:limit] if limit else images)
    if decoder_only and not init:
        raise ValueError("decoder_only: needs init, the trained VAE whose encoder it keeps")
    vae = build_vae(seed)
    if init:  # continue from a trained VAE (fresh optimizer and schedule)
        vae.set_state_dict(AutoencoderKL.from_pretrained(init).state_dict())
    vae.train()
    params = sum(int(np.prod(p.shape)) for p in vae.parameters())
    for name, p in vae.named_parameters():
        p.stop_gradient = decoder_only and name.startswith("encoder.")
    trained = [p for p in vae.parameters() if not p.stop_gradient]
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(lr, T_max=steps, eta_min=lr * 0.05)
    opt = paddle.optimizer.AdamW(
        learning_rate=schedule,
        parameters=trained,
        weight_decay=0.0,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0),
    )
    rng = np.random.default_rng([seed, 1])
    start, history = time.time(), []
    print(f"VAE {params} parameters, {len(pixels)} images, {steps} steps of {batch_size}", flush=True)
    info = {"config": CONFIG, "parameters": params, "steps": steps, "batch_size": batch_size, "lr": lr,
            "kl_weight": kl_weight, "seed": seed, "data": data, "images": len(pixels), "init": init,
            "decoder_only": decoder_only, "edge_weight": edge_weight}  # fmt: skip
    for step in range(1, steps + 1):
        x = paddle.to_tensor(pixels[rng.integers(0, len(pixels), batch_size)])
        with paddle.set_grad_enabled(not decoder_only):
            posterior = vae.encode(x).latent_dist
        noise = rng.standard_normal(posterior.mean.shape, dtype=np.float32)
        rec = vae.decode(posterior.sample(noise=noise)).sample
        mse = paddle.mean((rec - x) ** 2)
        kl = paddle.mean(posterior.kl()) / float(np.prod(posterior.mean.shape[1:]))
        if edge_weight:
            w = edge_weights(x, edge_weight)
            loss = paddle.mean(w * (rec - x) ** 2) / paddle.mean(w)
        else:
            loss = mse
        if not decoder_only:  # the KL term shapes the latents: the encoder's business
            loss = loss + kl_weight * kl
        loss.backward()
        opt.step()
        opt.clear_grad()
        schedule.step()
        if step % log_every == 0 or step == steps:
            row = {"step": step, "mse": float(mse), "kl": float(kl), "seconds": round(time.time() - start, 1)}
            history.append(row)
            print(json.dumps(row), flush=True)
        if step % save_every == 0 and step < steps:
            save(vae, out, pixels, seed, {**info, "completed_steps": step, "history": history})
    seconds = round(time.time() - start, 1)
    vae.eval()
    adherence = reconstruction_adherence(vae, check_count)
    info = save(vae, out, pixels, seed, {**info, "completed_steps": steps, "history": history,
                                         "seconds": seconds, "reconstruction_adherence": adherence})  # fmt: skip
    print(f"classifier on reconstructions of fresh samples: {adherence}", flush=True)
    print(f"wrote {out}: shift_factor {info['shift_factor']:.4f} scaling_factor {info['scaling_factor']:.4f} "
          f"after {info['seconds']}s", flush=True)  # fmt: skip
    return info


def main(argv: list[str] | None = None) -> int:
    runtime.configure()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="shapes Parquet table (tools/default_model/shapes_data.py)")
    p.add_argument("--out", required=True, help="folder for the VAE (diffusers layout)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl_weight", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--save_every", type=int, default=200)
    p.add_argument("--init", default=None, help="start from this trained VAE folder (a second stage)")
    p.add_argument("--decoder_only", action="store_true", help="train the decoder alone (needs --init)")
    p.add_argument(
        "--edge_weight", type=float, default=0.0, help="extra loss weight near edges (0: plain MSE)"
    )
    args = p.parse_args(argv)
    train(args.data, args.out, args.steps, args.batch_size, args.lr, args.kl_weight, args.seed,
          args.log_every, args.save_every, init=args.init, decoder_only=args.decoder_only,
          edge_weight=args.edge_weight)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
