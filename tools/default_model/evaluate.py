"""Prompt adherence of a shapes model: every caption x several seeds, read back by the classifier.

    .venv/bin/python -m tools.default_model.evaluate --model out/default_model/model --out out/default_model/eval

Samples each of the 24 captions (3 shapes x 4 colours x 2 backgrounds) with ``--seeds`` seeds at
64x64 and reports the fraction whose colour, background and shape (strict geometric test, and the
lenient nearest-shape test) match the caption, overall and per shape. T5 runs at the model folder's
default length and guidance scale unless ``--max_sequence_length`` / ``--guidance_scale`` say
otherwise; ``--first_seed`` moves the seeds (a held-out set for choosing sampling settings). Writes ``OUT/report.json`` and
``OUT/images/{shape}-{colour}-{background}-{seed}.png`` when ``--out`` is given. ``--colours orange``
samples the DreamBooth subject's captions ("a sks circle on a black background") instead, read
against the four training colours plus orange.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

ATTRIBUTES = ("colour", "background", "shape", "shape_lenient")


def evaluate(
    model: str,
    seeds: int = 4,
    steps: int = 28,
    guidance_scale: float | None = None,
    max_sequence_length: int | None = None,
    out: str | None = None,
    pipe=None,
    colours: Sequence[str] | None = None,
    palette: Sequence[str] | None = None,
    first_seed: int = 0,
    captions_per_call: int = 6,
) -> dict:
    """Adherence of ``model`` (or of ``pipe``, already loaded) over the captions of ``colours``
    (default: the four training colours), each colour read as the nearest of ``palette`` (default:
    the training colours plus ``colours``). Seeds are ``first_seed .. first_seed + seeds - 1``
    (per caption: each image's own seed, so the batching by ``captions_per_call`` does not change
    the images); ``guidance_scale=None`` is the model folder's default."""
    from pipelines import StableDiffusion3Pipeline
    from tools.default_model.shape_classifier import classify
    from tools.default_model.shapes_data import COLOURS, SIZE, all_captions

    colours = tuple(colours or COLOURS)
    palette = tuple(palette or dict.fromkeys([*COLOURS, *colours]))

    if pipe is None:
        pipe = StableDiffusion3Pipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
    if out:
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
    guidance_scale, max_sequence_length = pipe.folder_defaults(guidance_scale, max_sequence_length)
    seed_list = list(range(first_seed, first_seed + seeds))
    start, rows = time.time(), []
    captions = all_captions(colours)
    for i in range(0, len(captions), captions_per_call):
        chunk = captions[i : i + captions_per_call]
        images = pipe(
            [text for text, *_ in chunk], height=SIZE, width=SIZE, num_inference_steps=steps,
            guidance_scale=guidance_scale, num_images_per_prompt=seeds, seed=seed_list * len(chunk),
            max_sequence_length=max_sequence_length,
        ).images  # fmt: skip
        for j, (text, shape, colour, background) in enumerate(chunk):
            for seed, image in zip(seed_list, images[j * seeds : (j + 1) * seeds], strict=True):
                r = classify(image, palette)
                rows.append({"caption": text, "seed": seed, "want": {"shape": shape, "colour": colour,
                             "background": background}, "got": r.as_dict()})  # fmt: skip
                if out:
                    image.save(os.path.join(out, "images", f"{shape}-{colour}-{background}-{seed}.png"))

    def rate(selected: list[dict], attribute: str) -> float:
        want_key = "shape" if attribute.startswith("shape") else attribute
        return sum(r["got"][attribute] == r["want"][want_key] for r in selected) / max(len(selected), 1)

    report = {
        "model": model,
        "colours": list(colours),
        "palette": list(palette),
        "samples": len(rows),
        "seeds": seed_list,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "max_sequence_length": max_sequence_length,
        "seconds": round(time.time() - start, 1),
        "adherence": {a: rate(rows, a) for a in ATTRIBUTES},
        "all_three_strict": sum(
            all(r["got"][a] == r["want"][a] for a in ("colour", "background", "shape")) for r in rows
        )
        / len(rows),
        "per_shape": {
            s: {a: rate([r for r in rows if r["want"]["shape"] == s], a) for a in ATTRIBUTES}
            for s in ("circle", "square", "triangle")
        },
        "rows": rows,
    }
    if out:
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder (e.g. out/default_model/model)")
    p.add_argument("--out", default=None, help="folder for report.json and the images")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--first_seed", type=int, default=0, help="seeds first_seed .. first_seed + seeds - 1")
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the model folder's")
    p.add_argument("--max_sequence_length", type=int, default=None, help="default: the model folder's")
    p.add_argument("--colours", default=None, help="comma-separated (default: the four training colours)")
    p.add_argument("--inference-optimize", action="store_true", help="the transformer as static programs")
    args = p.parse_args(argv)
    pipe = None
    if args.inference_optimize:
        from pipelines import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(args.model, inference_optimize=True)
        pipe.set_progress_bar_config(disable=True)
    report = evaluate(
        args.model, args.seeds, args.steps, args.guidance_scale, args.max_sequence_length, args.out,
        pipe=pipe, colours=args.colours.split(",") if args.colours else None, first_seed=args.first_seed,
    )  # fmt: skip
    summary = {k: v for k, v in report.items() if k != "rows"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
