"""The `sd3` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd3", description="Stable Diffusion 3 on PaddlePaddle and Ray")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="render prompts to PNG files")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    source.add_argument("--prompts", help="a Parquet prompt table with a `prompt` column")
    gen.add_argument("--output", required=True, help="output folder; images go to OUTPUT/images/")
    gen.add_argument(
        "--model", default=None, help="diffusers-format SD3 folder (default: the embedded tiny model)"
    )
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--height", type=_positive_int, default=None)
    gen.add_argument("--width", type=_positive_int, default=None)
    gen.add_argument("--steps", type=_positive_int, default=28, help="denoising steps (default 28)")
    gen.add_argument("--guidance-scale", type=float, default=7.0)
    gen.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt")
    gen.add_argument("--seed", type=int, default=0, help="job seed; per-row seeds derive from it and the id")
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--max-sequence-length", type=_positive_int, default=None, help="T5 tokens (<= 512)")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from jobs.local_generate import DEFAULT_MODEL, PromptRow, generate_to_folder, read_prompt_table

    if args.prompts:
        rows = read_prompt_table(args.prompts)
    else:
        rows = [PromptRow(f"prompt{i:04d}", p, args.negative_prompt) for i, p in enumerate(args.prompt)]
        empty = [r.id for r in rows if not r.prompt.strip()]
        if empty:
            raise ValueError(f"--prompt: empty prompt(s) {empty}")
    written = generate_to_folder(
        rows,
        args.output,
        args.model or DEFAULT_MODEL,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_images=args.num_images,
        seed=args.seed,
        dtype=args.dtype,
        max_sequence_length=args.max_sequence_length,
    )
    print(f"wrote {len(written)} image(s) to {args.output}/images")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sd3` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"sd3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
