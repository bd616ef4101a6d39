"""Peak memory and time of decoding one large image with and without VAE tiling.

The SD3 VAE's architecture (``block_out_channels [128, 256, 512, 512]``, ``layers_per_block`` 2,
16 latent channels, ``sample_size`` 1024) with seeded random weights decodes one seeded random
``--size`` x ``--size`` latent image, once untiled and once with ``vae.enable_tiling()``
(``--tile`` pixels per tile, diffusers' default being the config's 1024; overlap 0.25). Each runs
in its own subprocess so that its peak RSS (``getrusage`` maxrss) is its own. Prints wall and
CPU seconds (CPU is what holds on a shared machine), peak RSS (and RSS before decoding: the
weights), the tiled / untiled ratios, the passes over the tiles (``sd3_core.vae_tiling``), and
the max and mean absolute pixel difference, in /255 steps.

    nice python benchmarks/vae_tiling.py [--size 2048] [--tile 1024] [--threads 1] [--init torch]
        [--vae jobs/default_model/vae] [--tolerance inf]

Random weights cost the same memory and time per pass as trained ones, but not the same number
of passes: statistics settle in a few passes for a smooth decoder and need one pass per
GroupNorm for a chaotic one. ``--init torch`` (torch's default initialisation, uniform in
+-1/sqrt(fan_in), unit norms) gives a smooth decoder; ``--init fixture`` (the tiny test
checkpoints' recipe: normal weights of std 1/sqrt(fan_in), norms 1 +- 0.1) a chaotic one. The
sensitivity line (the untiled output's change under a 1e-6 relative change of the latent) tells
which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD3_VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _initialise(vae, init: str, rng: np.random.Generator) -> None:
    """Seeded random weights (see the module docstring for the two recipes)."""
    fan_in = {}  # a bias's fan-in is its weight's
    for name, p in vae.named_parameters():
        if len(p.shape) > 1:
            fan_in[name.rsplit(".", 1)[0]] = int(np.prod(p.shape[1:]))
    for name, p in vae.named_parameters():
        layer, kind = name.rsplit(".", 1)
        norm = "norm" in layer
        if init == "torch":
            values = (np.full(p.shape, float(kind == "weight")) if norm
                      else rng.uniform(-1, 1, p.shape) / np.sqrt(fan_in[layer]))  # fmt: skip
        elif kind == "bias":
            values = 0.05 * rng.standard_normal(p.shape)
        elif norm:
            values = 1 + 0.1 * rng.standard_normal(p.shape)
        else:
            values = rng.standard_normal(p.shape) / np.sqrt(fan_in[layer])
        p.set_value(values.astype(np.float32))


def _shapes(size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` picture of random discs and boxes, [1, 3, H, W] in [-1, 1]."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (200, 220, 240))
    draw = ImageDraw.Draw(image)
    for _ in range(size // 16):
        x, y = rng.integers(0, size, 2).tolist()
        r = int(rng.integers(8, size // 6))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=tuple(rng.integers(0, 255, 3).tolist()))
    return (np.asarray(image, np.float32) / 127.5 - 1).transpose(2, 0, 1)[None]


def measure(size: int, tile: int | None, threads: int, init: str, vae_path: str | None,
            tolerance: float | None, out: str) -> dict:  # fmt: skip
    """In this process: build the VAE, decode one image (tiled when ``tile``), save it to ``out``."""
    sys.path.insert(0, ROOT)
    from sd3_core import runtime

    runtime.configure(threads=threads)
    import paddle

    from sd3_core import vae_tiling
    from sd3_core.vae import AutoencoderKL

    paddle.seed(0)
    with paddle.no_grad():
        rng = np.random.default_rng(0)
        if vae_path:
            vae = AutoencoderKL.from_pretrained(vae_path)
            z = vae.encode(paddle.to_tensor(_shapes(size, rng))).latent_dist.mode()
        else:
            vae = AutoencoderKL(**SD3_VAE)
            _initialise(vae, init, rng)
            latent = size // vae.scale_factor
            z = paddle.to_tensor(rng.standard_normal((1, 16, latent, latent)).astype(np.float32))
        del vae.encoder  # decoding only
        passes = []
        tiled = vae_tiling.tiled
        vae_tiling.tiled = lambda x, run, *rest: tiled(x, lambda t: passes.append(1) or run(t), *rest)
        if tile is not None:
            vae.enable_tiling()
            vae.tile_sample_min_size = tile
            if tolerance is not None:
                vae.tile_tolerance = tolerance
        latent = size // vae.scale_factor
        before = _rss_mib()
        start, cpu_start = time.perf_counter(), time.process_time()
        image = vae.decode(z).sample
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        result = {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "peak_rss_mib": peak,
            "rss_before_mib": before,
        }
        if tile is None:
            nudged = z * (1 + 1e-6 * paddle.to_tensor(rng.standard_normal(z.shape).astype(np.float32)))
            result["sensitivity"] = float(
                np.abs(vae.decode(nudged).sample.numpy() - image.numpy()).max() * 127.5
            )
        else:
            tiles = len(range(0, latent, vae_tiling.tile_plan(tile, tile // 8, 0.25, 8, True).step)) ** 2
            result["passes"] = len(passes) // tiles
    np.save(out, image.numpy()[0])
    return result


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (multiple of 8)")
    parser.add_argument("--tile", type=int, default=1024, help="tile_sample_min_size of the tiled run")
    parser.add_argument("--threads", type=int, default=1, help="Paddle CPU threads per run")
    parser.add_argument(
        "--init", choices=["torch", "fixture"], default="torch", help="random weights (see above)"
    )
    parser.add_argument("--vae", help="a trained VAE folder (e.g. jobs/default_model/vae) instead of random "
                        "weights; the latent is then a drawn picture's, encoded")  # fmt: skip
    parser.add_argument("--tolerance", type=float, help="vae.tile_tolerance for the tiled run "
                        "(default: the module's; inf: one stitched pass, for memory and time per pass)")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the subprocess side: "untiled" or "tiled"
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size <= 0 or args.size % 8:
        parser.error(f"--size={args.size} must be a positive multiple of 8")
    if args.size <= args.tile:
        parser.error(f"--size={args.size} must be larger than --tile={args.tile}, or nothing is tiled")
    if args.child:
        tile = args.tile if args.child == "tiled" else None
        print(
            json.dumps(measure(args.size, tile, args.threads, args.init, args.vae, args.tolerance, args.out))
        )
        return
    results, images = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("untiled", "tiled"):
            out = os.path.join(tmp, f"{run}.npy")
            cmd = [sys.executable, __file__, "--child", run, "--out", out, "--size", str(args.size),
                   "--tile", str(args.tile), "--threads", str(args.threads), "--init", args.init]  # fmt: skip
            cmd += ["--vae", args.vae] if args.vae else []
            cmd += ["--tolerance", str(args.tolerance)] if args.tolerance is not None else []
            stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[run] = json.loads(stdout.strip().splitlines()[-1])
            images[run] = np.load(out)
    diff = np.abs(images["tiled"] - images["untiled"]).max(axis=0) * 127.5  # /255 steps of [-1, 1]
    weights = (
        f"trained weights of {args.vae}"
        if args.vae
        else f"SD3 VAE architecture, random weights ({args.init} init)"
    )
    print(
        f"VAE decode of one {args.size}x{args.size} image, {weights}, float32, {args.threads} thread(s) on {_cpu()}"
    )
    for run, r in results.items():
        label = run if run == "untiled" else f"tiled ({args.tile} px tiles)"
        print(f"{label:>24}: {r['seconds']:7.1f} s ({r['cpu_seconds']:.1f} s CPU), peak RSS {r['peak_rss_mib']:7.0f} MiB "
              f"({r['rss_before_mib']:.0f} MiB before decoding)")  # fmt: skip
    untiled, tiled = results["untiled"], results["tiled"]
    print(f"ratio tiled / untiled: peak RSS {tiled['peak_rss_mib'] / untiled['peak_rss_mib']:.2f}, "
          f"CPU time {tiled['cpu_seconds'] / untiled['cpu_seconds']:.2f}")  # fmt: skip
    print(f"tiled: {tiled['passes']} passes over the tiles ({tiled['cpu_seconds'] / tiled['passes']:.1f} s CPU each); untiled output's change under a 1e-6 relative "
          f"change of the latent: max {untiled['sensitivity']:.4f}/255")  # fmt: skip
    print(f"tiled vs untiled pixels: max {diff.max():.4f}/255, mean {diff.mean():.5f}/255")


if __name__ == "__main__":
    main()
