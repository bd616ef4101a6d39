"""Whole-image seconds: text encoders + 28 denoising steps (CFG, batch 2) + VAE decode at 512x512.

The pipeline folder is the tiny test checkpoint's text encoders, tokenizers, scheduler and VAE
(tests/fixtures/sd3-tiny) with the transformer replaced by step_time.py's "small" config (8 layers,
6 heads x 64; 1024 image + 333 text tokens), so the denoiser dominates as it does in SD3. Ours
(eager float32, inference_optimize float32 and, where the CPU has it, bfloat16) and diffusers
(float32, and float32 weights under CPU autocast bfloat16) each render the same prompt with the
same initial latents at the given thread count, each of ours in a child process of its own; printed: seconds per image
(the second of two calls) and the max pixel difference from ours eager float32, in 1/255 levels.

    python benchmarks/image_time.py [--threads 2] [--steps 28] [--diffusers-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photograph of an astronaut riding a horse"

_DIFFUSERS_SIDE = r"""
import json, sys, time
import numpy as np, torch
from diffusers import StableDiffusion3Pipeline
folder, latents_file, threads, steps, out_prefix, prompt = sys.argv[1:7]
torch.set_num_threads(int(threads))
pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
latents = torch.from_numpy(np.load(latents_file))
results = {}
for i, (name, autocast) in enumerate((("float32", False), ("float32 + autocast bfloat16", True))):
    for _ in range(2):
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            image = pipe(prompt, num_inference_steps=int(steps), height=512, width=512, latents=latents,
                         guidance_scale=7.0, output_type="np").images[0]
        seconds = time.perf_counter() - start
    np.save(f"{out_prefix}-{i}.npy", image.astype(np.float32))
    results[name] = seconds
print(json.dumps({"seconds": results, "torch": torch.__version__}))
"""


def build_folder(folder: str) -> None:
    """The benchmark pipeline folder (see the module docstring)."""
    sys.path.insert(0, ROOT)
    import paddle

    from benchmarks.step_time import SMALL
    from sd3_core.transformer import SD3Transformer2DModel

    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "sd3-tiny"), folder)
    shutil.rmtree(os.path.join(folder, "transformer"))
    tiny = json.load(open(os.path.join(ROOT, "tests", "fixtures", "sd3-tiny", "transformer", "config.json")))
    paddle.seed(0)
    config = dict(SMALL, joint_attention_dim=tiny["joint_attention_dim"],
                  pooled_projection_dim=tiny["pooled_projection_dim"])  # fmt: skip
    SD3Transformer2DModel(**config).save_pretrained(os.path.join(folder, "transformer"))


#: Our variants: (name, dtype, inference_optimize). Each runs in a child process of its own: after
#: the eager transformer has run, a program in the same process took about 0.5 s a step instead of
#: 0.4 (small config, 2 threads, AMD EPYC; two OpenMP runtimes are loaded, Paddle's and MKL's).
VARIANTS = [("eager float32", "float32", False), ("optimised float32", "float32", True),
            ("optimised bfloat16", "bfloat16", True)]  # fmt: skip


def _ours(folder: str, latents_file: str, steps: int, variant: int, out: str) -> float:
    """Child process (OMP_NUM_THREADS already set): seconds of one variant's second image."""
    sys.path.insert(0, ROOT)
    from sd3_core import runtime

    runtime.configure()

    import time

    import numpy as np

    from pipelines import StableDiffusion3Pipeline

    _, dtype, optimise = VARIANTS[variant]
    latents = np.load(latents_file)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype)
    if optimise:
        pipe.enable_inference_optimize(cache_dir=os.path.join(os.path.dirname(latents_file), "programs"))
    pipe.set_progress_bar_config(disable=True)
    for _ in range(2):  # the first call exports (or loads) the program and warms up
        start = time.perf_counter()
        image = pipe(PROMPT, num_inference_steps=steps, height=512, width=512, latents=latents,
                     guidance_scale=7.0, output_type="np").images[0]  # fmt: skip
        seconds = time.perf_counter() - start
    np.save(out, image)
    return seconds


def run(threads: int, steps: int, diffusers_python: str) -> None:
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "pipeline")
        build_folder(folder)
        latents_file = os.path.join(tmp, "latents.npy")
        np.save(latents_file, np.random.default_rng(0).standard_normal((1, 16, 64, 64), dtype=np.float32))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        from sd3_core.inference_program import cpu_has_native_bfloat16

        rows = {}
        for i, (name, dtype, _) in enumerate(VARIANTS):
            if dtype == "bfloat16" and not cpu_has_native_bfloat16():
                continue
            out = os.path.join(tmp, f"ours-{i}.npy")
            proc = subprocess.run([sys.executable, __file__, "--child", folder, latents_file, str(steps), str(i), out],
                                  capture_output=True, text=True, env=env, check=False)  # fmt: skip
            if proc.returncode:
                print(f"ours ({name}) failed:\n{proc.stderr[-3000:]}")
                return
            secs = json.loads(proc.stdout.strip().splitlines()[-1])
            if i == 0:
                reference = np.load(out)
            rows[f"sd3-ray {name}"] = (secs, float(np.abs(np.load(out) - reference).max()))
        if os.path.exists(diffusers_python):
            theirs_out = os.path.join(tmp, "theirs")
            env.pop("MKL_DEBUG_CPU_TYPE", None)
            proc = subprocess.run([diffusers_python, "-c", _DIFFUSERS_SIDE, folder, latents_file, str(threads),
                                   str(steps), theirs_out, PROMPT], capture_output=True, text=True, env=env,
                                  check=False)  # fmt: skip
            if proc.returncode:
                print(f"diffusers failed:\n{proc.stderr[-2000:]}")
            else:
                theirs = json.loads(proc.stdout.strip().splitlines()[-1])
                for i, (name, secs) in enumerate(theirs["seconds"].items()):
                    diff = float(np.abs(np.load(f"{theirs_out}-{i}.npy") - reference).max())
                    rows[f"diffusers (torch {theirs['torch']}) {name}"] = (secs, diff)
        print(f"\nwhole image, 512x512, {steps} steps, CFG, {threads} thread(s): seconds per image")
        base = rows["sd3-ray eager float32"][0]
        for name, (secs, diff) in rows.items():
            print(
                f"  {name:<52} {secs:7.2f} s  x{base / secs:5.2f} vs our eager   max|diff| {diff * 255:.1f}/255"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--diffusers-python", default=os.path.join(ROOT, ".refvenv", "bin", "python"))
    parser.add_argument(
        "--child", nargs=5, metavar=("FOLDER", "LATENTS", "STEPS", "VARIANT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        folder, latents_file, steps, variant, out = args.child
        print(json.dumps(_ours(folder, latents_file, int(steps), int(variant), out)))
        return
    run(args.threads, args.steps, args.diffusers_python)


if __name__ == "__main__":
    main()
