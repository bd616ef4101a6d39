"""Seconds per denoising step (one transformer forward, batch 2 for CFG) at the "small" config.

Small config: 8 layers, 6 heads x 64, a 512x512 image (64x64 latents, 1024 image tokens) plus
333 text tokens (77 CLIP + 256 T5), float32, a fixed thread count. The same random weights are
written once as a diffusers folder; ours runs them in this process and, when a Python with
diffusers is available (default: the reference venv `.refvenv`), diffusers runs them on torch CPU
in a subprocess with the same inputs. Prints both timings, the ratio, and the max difference of
the outputs (a timing of wrong numbers is worthless).

    python benchmarks/step_time.py [--threads 1] [--repeats 5] [--diffusers-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = dict(
    sample_size=64,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=8,
    attention_head_dim=64,
    num_attention_heads=6,
    joint_attention_dim=4096,
    caption_projection_dim=384,
    pooled_projection_dim=2048,
    pos_embed_max_size=64,
)

_DIFFUSERS_SIDE = r"""
import json, sys, time
import numpy as np, torch
from diffusers import SD3Transformer2DModel
folder, inputs, threads, repeats, out = sys.argv[1:6]
torch.set_num_threads(int(threads))
model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
data = np.load(inputs)
args = {k: torch.from_numpy(data[k]) for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")}
times = []
with torch.no_grad():
    for _ in range(int(repeats) + 1):
        start = time.perf_counter()
        y = model(**args, return_dict=False)[0]
        times.append(time.perf_counter() - start)
np.save(out, y.numpy())
print(json.dumps({"seconds": times[1:], "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--diffusers-python", default=os.path.join(ROOT, ".refvenv", "bin", "python"))
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before paddle loads
    sys.path.insert(0, ROOT)

    import sd3_core.runtime  # noqa: F401

    import numpy as np
    import paddle

    from sd3_core.transformer import SD3Transformer2DModel

    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = SD3Transformer2DModel(**SMALL)
    model.eval()
    inputs = {
        "hidden_states": rng.standard_normal((2, 16, 64, 64), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 333, 4096), dtype=np.float32),
        "pooled_projections": rng.standard_normal((2, 2048), dtype=np.float32),
        "timestep": np.array([500.0, 500.0], dtype=np.float32),
    }
    tensors = [paddle.to_tensor(inputs[k]) for k in inputs]
    times = []
    with paddle.no_grad():
        for _ in range(args.repeats + 1):  # the first call warms up allocators and kernels
            start = time.perf_counter()
            ours = model(*tensors).numpy()
            times.append(time.perf_counter() - start)
    ours_s = float(np.median(times[1:]))
    n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
    print(f"config: {json.dumps(SMALL)}  ({n_params / 1e6:.1f} M parameters)")
    print(f"threads: {args.threads}  MKL_DEBUG_CPU_TYPE={os.environ.get('MKL_DEBUG_CPU_TYPE', '')}")
    print(f"sd3-ray (paddle {paddle.__version__}): {ours_s:.3f} s/step (median of {args.repeats})")

    if not os.path.exists(args.diffusers_python):
        print(f"diffusers: not run ({args.diffusers_python} not found; `make reference` builds it)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "transformer")
        model.save_pretrained(folder)
        np.savez(os.path.join(tmp, "inputs.npz"), **inputs)
        out = os.path.join(tmp, "out.npy")
        env = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE",)}
        env["OMP_NUM_THREADS"] = str(args.threads)
        proc = subprocess.run(
            [args.diffusers_python, "-c", _DIFFUSERS_SIDE, folder, os.path.join(tmp, "inputs.npz"),
             str(args.threads), str(args.repeats), out],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        if proc.returncode:
            print(f"diffusers: failed\n{proc.stderr[-2000:]}")
            return
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        theirs_s = float(np.median(result["seconds"]))
        diff = float(np.abs(np.load(out) - ours).max())
    print(f"diffusers (torch {result['torch']}, {result['threads']} threads): {theirs_s:.3f} s/step")
    print(f"ratio diffusers/sd3-ray: {theirs_s / ours_s:.2f}x  (>1 means we are faster)")
    print(f"max |ours - diffusers| on the same weights and inputs: {diff:.2e}")


if __name__ == "__main__":
    main()
