"""bfloat16 against float32 images of the optimised path, on the embedded default model.

Renders every prompt of a prompt table (default: examples/prompts.parquet) with the same seeds
through inference_optimize in float32 and in bfloat16 (where the CPU has native bfloat16), prints
each image's mean and max pixel difference in 1/255 levels and their mean over all images, and
writes one picture with the float32 contact sheet on top and the bfloat16 one below.

    python benchmarks/precision_sheet.py [--prompts FILE] [--steps 28] [--out out/precision_sheet.png]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", default=os.path.join(ROOT, "examples", "prompts.parquet"))
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "precision_sheet.png"))
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    from jobs.contact_sheet import contact_sheet
    from pipelines import StableDiffusion3Pipeline
    from sd3_core.inference_program import cpu_has_native_bfloat16

    if not cpu_has_native_bfloat16():
        print("this CPU has no native bfloat16 (avx512_bf16 / amx_bf16): nothing to compare")
        return
    prompts = pq.read_table(args.prompts, columns=["prompt"]).column("prompt").to_pylist()
    seeds = list(range(len(prompts)))
    folder = os.path.join(ROOT, "jobs", "default_model")
    images = {}
    for dtype in ("float32", "bfloat16"):
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype, inference_optimize=True)
        pipe.set_progress_bar_config(disable=True)
        images[dtype] = pipe(prompts, num_inference_steps=args.steps, seed=seeds, output_type="np").images
    diff = np.abs(images["float32"].astype(np.float64) - images["bfloat16"]) * 255
    for i, prompt in enumerate(prompts):
        print(f"  {prompt:<48} mean {diff[i].mean():5.2f}  max {diff[i].max():6.1f}  (1/255 levels)")
    print(
        f"bfloat16 vs float32 over {len(prompts)} images: mean {diff.mean():.2f}/255, max {diff.max():.1f}/255"
    )
    sheets = [contact_sheet(zip(images[d], prompts, strict=True), columns=6, thumb=96) for d in images]
    label_h = 16
    out = Image.new("RGB", (sheets[0].width, sum(s.height + label_h for s in sheets)), "white")
    draw, y = ImageDraw.Draw(out), 0
    for name, sheet in zip(images, sheets, strict=True):
        draw.text((4, y + 2), f"inference_optimize, {name}", fill="black")
        out.paste(sheet, (0, y + label_h))
        y += sheet.height + label_h
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp.png"
    out.save(tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
