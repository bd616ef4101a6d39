"""The `sd3` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jobs import submit
from jobs.batch_generate import run_job
from jobs.benchmark_report import format_report
from jobs.job_config import DEFAULT_MODEL, JobConfig, JobFailed
from jobs.submit import SUBMITTABLE
from jobs.work_rows import JobDefaults
from sd3_core import runtime
from sd3_core.generation_fields import GENERATION_FIELDS
from sd3_core.storage import StorageOptions


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
    return value


def _zero_or_one(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 or 0")
    return text == "1"


def _dp_size(text: str) -> bool:
    """PPDiffusers' `--dp_size`: 2 is CFG parallelism (--cfg-parallel), 1 is none."""
    if text not in ("1", "2"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: only 1 or 2 (2 = --cfg-parallel, the two CFG halves on two devices); "
            "for more data parallelism use --replicas N"
        )
    return text == "2"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd3", description="Stable Diffusion 3 on PaddlePaddle and Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(commands)
    _add_submit_parser(commands)
    _add_training_parsers(commands)
    _add_convert_parser(commands)
    return parser


def _add_generate_parser(commands: argparse._SubParsersAction) -> None:
    """`sd3 generate`: the batch job (jobs/batch_generate.py) on a local or given Ray cluster."""
    gen = commands.add_parser(
        "generate",
        help="render a prompt table (or prompts) to images + a manifest, on Ray",
        description="Render every row of a Parquet prompt table (or the --prompt texts) to "
        "OUTPUT/images/{id}_{k}.png with a manifest (OUTPUT/manifest.parquet), OUTPUT/job.json and "
        "OUTPUT/contact_sheet.png. Rerunning on the same OUTPUT resumes: finished images are skipped. "
        "Per-row columns override the job-level defaults below. Exit status: 0 all rows ok, 1 some "
        "rows failed (see the manifest), 2 the job could not start.",
    )
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompts", metavar="URL", help="Parquet file or dataset folder (local path, file://, s3://)"
    )
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    gen.add_argument("--output", required=True, metavar="URL", help="output folder or s3:// prefix")
    gen.add_argument("--model", default=None, metavar="URI", help="diffusers SD3 folder, s3:// prefix or Hub id "
                     "(org/name; default: the embedded tiny model)")  # fmt: skip
    gen.add_argument("--lora", default=None, metavar="REF", help="a LoRA adapter for every row: a "
                     ".safetensors file, a folder holding pytorch_lora_weights.safetensors (or peft's "
                     "adapter_model.safetensors + adapter_config.json), an s3:// URL of either, or a "
                     "registry REGISTRY[:VERSION] (without VERSION: its `latest`, read once when the job "
                     "starts)")  # fmt: skip
    gen.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                     help="the adapter's weight (default 1.0)")  # fmt: skip
    run = gen.add_argument_group("execution")
    run.add_argument("--replicas", type=_positive_int, default=1, help="model replicas (actors), default 1")
    run.add_argument(
        "--device", default="cpu", choices=["cpu", "gpu", "npu"], help="device of a replica (default cpu)"
    )
    run.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1.0,
        help="CPUs (threads) per replica (per rank with --mp/--cfg-parallel), default 1",
    )
    run.add_argument("--mp", "--mp_size", "--mp-size", dest="mp", type=_positive_int, default=1,
                     help="tensor-parallel devices per replica (the transformer's heads split across "
                     "them), default 1; PPDiffusers' `--mp_size N` is the same")  # fmt: skip
    run.add_argument("--cfg-parallel", action="store_true", help="render the two CFG halves on two "
                     "devices each (a replica is then 2 x mp devices)")  # fmt: skip
    run.add_argument("--dp_size", "--dp-size", dest="cfg_parallel", type=_dp_size, default=argparse.SUPPRESS,
                     metavar="1|2", help="PPDiffusers' spelling: 2 = --cfg-parallel")  # fmt: skip
    run.add_argument("--batch-size", type=_positive_int, default=4, help="images per replica call, default 4")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    run.add_argument("--inference-optimize", "--inference_optimize", dest="inference_optimize", nargs="?",
                     const=True, default=False, type=_zero_or_one, metavar="1|0",
                     help="run the transformer as cached static Paddle Inference programs (oneDNN on CPU, "
                     "bfloat16 math with --dtype bfloat16 where the CPU has it); PPDiffusers' "
                     "`--inference_optimize 1` is the same")  # fmt: skip
    run.add_argument("--vae-tiling", "--vae_tiling", dest="vae_tiling", action="store_true",
                     help="decode images larger than the VAE's tile (its sample_size, 1024 px for SD3) in "
                     "overlapping tiles, as `pipe.vae.enable_tiling()`: memory bounded by the tile, not "
                     "the image; the tiles share whole-image GroupNorm statistics, refined pass by pass")  # fmt: skip
    run.add_argument("--vae-tile-tolerance", type=float, default=None, metavar="TOL",
                     help="with --vae-tiling: how settled the statistics must be (`pipe.vae.tile_tolerance`; "
                     "default 1e-3, 0 exact, inf the first stitched pass, fastest)")  # fmt: skip
    run.add_argument("--benchmark", action="store_true", help="each replica renders its first batch "
                     "once untimed, then every call is timed: prints seconds per stage (text encoding, "
                     "denoising per step, VAE decode), images/s and peak RSS, and writes them under "
                     "`benchmark` in job.json")  # fmt: skip
    run.add_argument("--image-format", default="png", choices=["png", "jpeg", "webp"])
    run.add_argument("--ray-address", default=None, metavar="ADDR", help="Ray cluster to use ('auto': the one "
                     "`ray start` runs here); default $RAY_ADDRESS, else a local Ray just for this job")  # fmt: skip
    run.add_argument(
        "--s3-endpoint-url",
        default=None,
        help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)",
    )
    run.add_argument(
        "--s3-region", default=None, help="S3 region (default: $AWS_REGION / $AWS_DEFAULT_REGION)"
    )
    run.add_argument("--s3-anon", action="store_true", default=None, help="anonymous S3 access")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = gen.add_argument_group("job-level defaults (a row's own non-null column wins)")
    for f in GENERATION_FIELDS:
        if f.flags:
            kind = {"text": str, "int": _positive_int, "float": float}[f.kind]
            metavar = {"text": "TEXT", "int": "N", "float": "X"}[f.kind]
            d.add_argument(*f.flags, dest=f.name, type=kind, default=f.default, metavar=metavar, help=f.help)
    d.add_argument(
        "--seed", type=int, default=0, help="job seed; a row without `seed` gets one from it and its id"
    )


def _generate(args: argparse.Namespace) -> int:
    defaults = JobDefaults(
        **{f.name: getattr(args, f.name) for f in GENERATION_FIELDS if f.flags}, job_seed=args.seed
    )
    config = JobConfig(
        output=args.output,
        prompts=args.prompts,
        prompt_list=args.prompt,
        model=args.model or DEFAULT_MODEL,
        replicas=args.replicas,
        device=args.device,
        cpus_per_replica=args.cpus_per_replica,
        mp=args.mp,
        cfg_parallel=args.cfg_parallel,
        lora=args.lora,
        lora_scale=args.lora_scale,
        batch_size=args.batch_size,
        dtype=args.dtype,
        inference_optimize=args.inference_optimize,
        vae_tiling=args.vae_tiling,
        vae_tile_tolerance=args.vae_tile_tolerance,
        benchmark=args.benchmark,
        defaults=defaults,
        image_format=args.image_format,
        ray_address=args.ray_address,
        storage=StorageOptions.from_env(
            endpoint_url=args.s3_endpoint_url, region=args.s3_region, anon=args.s3_anon
        ),
        progress=not args.no_progress,
    )
    try:
        result = run_job(config)
    except JobFailed as e:
        print(f"sd3 generate: {e}", file=sys.stderr)
        return 1
    c = result.counts
    if not result.finalized:
        print(f"nothing to do: {args.output} is complete ({c.get('images_ok', 0)} images)", file=sys.stderr)
    else:
        print(
            f"{c.get('rows', 0)} rows, {c.get('images_ok', 0)} images ok ({result.processed_images} "
            f"processed now, {result.skipped_rows} rows done before) in {result.seconds:.1f}s; "
            f"manifest {result.manifest}",
            file=sys.stderr,
        )
    if result.benchmark is not None:
        print(format_report(result.benchmark), file=sys.stderr)
    if result.rows_failed:
        examples = "; ".join(e["error"] for e in c.get("error_examples", [])[:3])
        print(
            f"sd3 generate: {result.rows_failed} row(s) failed ({c.get('images_error', 0)} images); "
            f"see the rows with status 'error' in {result.manifest}. First: {examples}",
            file=sys.stderr,
        )
        return 1
    return 0


def _add_submit_parser(commands: argparse._SubParsersAction) -> None:
    """`sd3 submit [options] COMMAND ARGS...`: run an `sd3` command as a Ray job (owner: ray-jobs)."""
    sub = commands.add_parser(
        "submit",
        help="run a command as a Ray job on a cluster (Ray Jobs)",
        description="Submit `sd3 COMMAND ARGS...` to a Ray cluster through Ray Jobs and print the "
        "submission id and how to follow it. Options of `submit` come before COMMAND; everything "
        "after COMMAND is passed to it unchanged (and checked here first).",
        allow_abbrev=False,
    )
    sub.add_argument(
        "--address",
        default=None,
        help="Ray dashboard address (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or http://127.0.0.1:8265)",
    )
    sub.add_argument("--submission-id", default=None, help="id for the job (default: Ray makes one)")
    sub.add_argument("--working-dir", default=None, help="local directory uploaded as the job's working dir")
    env = sub.add_mutually_exclusive_group()
    env.add_argument("--runtime-env", metavar="FILE", default=None, help="a runtime_env YAML file")
    env.add_argument("--runtime-env-json", metavar="JSON", default=None, help="a runtime_env as JSON")
    sub.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's logs until it ends; exit 0 only if it succeeded",
    )
    sub.add_argument(
        "job",
        metavar="COMMAND",
        choices=sorted(SUBMITTABLE),
        help="; ".join(f"{name}: {text}" for name, text in sorted(SUBMITTABLE.items())),
    )
    sub.add_argument("job_args", nargs=argparse.REMAINDER, metavar="ARGS", help="the arguments of COMMAND")


def _submit(args: argparse.Namespace) -> int:
    # Check the job's arguments here with the command's own parser, so a typo fails now, not on the
    # cluster (argparse exits with its usage message, as `sd3 COMMAND` itself would).
    parsed = build_parser().parse_args([args.job, *args.job_args])
    for note in submit.relative_path_warnings(parsed):
        print(note, file=sys.stderr)
    runtime_env = submit.build_runtime_env(args.runtime_env, args.runtime_env_json, args.working_dir)
    job = None
    try:
        client = submit.connect(args.address)
        job = submit.submit(
            args.job,
            args.job_args,
            submission_id=args.submission_id,
            runtime_env=runtime_env,
            client=client,
        )
        print(job.follow_hint(), flush=True)
        if not args.follow:
            return 0
        status = submit.follow(job, client)
    except ConnectionError as e:
        print(f"sd3 submit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if job is not None:
            print(f"\nstopped following; the job keeps running ({job.submission_id})", file=sys.stderr)
        return 130
    print(f"Ray job {job.submission_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _add_training_parsers(commands: argparse._SubParsersAction) -> None:
    """`sd3 train`, `sd3 schedule`, `sd3 nightly` (jobs/train_cli.py; owner: train-job)."""
    # pipelines.training is imported on building the parser, not on importing jobs.cli.
    from jobs import train_cli

    train_cli.add_train_parser(commands)
    train_cli.add_schedule_parser(commands)
    train_cli.add_nightly_parser(commands)


def _training_command(args: argparse.Namespace) -> int:
    from jobs import train_cli  # as in _add_training_parsers

    run = {"train": train_cli.run_train, "schedule": train_cli.run_schedule, "nightly": train_cli.run_nightly}
    return run[args.command](args)


def _add_convert_parser(commands: argparse._SubParsersAction) -> None:
    """`sd3 convert`: diffusers folder <-> original-layout single file (sd3_core/single_file_convert.py)."""
    conv = commands.add_parser(
        "convert",
        help="convert a diffusers SD3 folder to a single .safetensors file (Stability layout) or back",
        description="--to single-file SRC_FOLDER OUT.safetensors writes the transformer and VAE (and with "
        "--include-text-encoders CLIP-L/G and T5) in the layout of Stability's sd3_medium*.safetensors. "
        "--to diffusers SRC.safetensors OUT_FOLDER writes a diffusers folder; tokenizers, scheduler and "
        "models the file lacks come from --config FOLDER. The output must not exist; it appears whole "
        "or not at all.",
    )
    conv.add_argument("--to", required=True, choices=["single-file", "diffusers"], help="output format")
    conv.add_argument("source", metavar="SRC", help="diffusers folder (--to single-file) or .safetensors "
                      "file, local path or fsspec URL (--to diffusers)")  # fmt: skip
    conv.add_argument("output", metavar="OUT", help="output .safetensors file or folder (local path)")
    conv.add_argument("--include-text-encoders", action="store_true",
                      help="--to single-file: also write CLIP-L, CLIP-G and T5 (when SRC has it)")  # fmt: skip
    conv.add_argument("--t5-fp8", action="store_true",
                      help="--to single-file: store T5's matrices as float8_e4m3fn (needs --include-text-encoders)")  # fmt: skip
    conv.add_argument("--config", metavar="FOLDER", default=None,
                      help="--to diffusers: diffusers SD3 folder for tokenizers, scheduler, missing models and "
                      "configs the file does not record")  # fmt: skip


def _convert(args: argparse.Namespace) -> int:
    from sd3_core import single_file_convert  # loads Paddle, which the other commands' drivers never need

    if args.to == "single-file":
        if args.config is not None:
            raise ValueError("--config applies to --to diffusers only")
        written = single_file_convert.write_single_file(
            args.source, args.output, include_text_encoders=args.include_text_encoders, t5_fp8=args.t5_fp8
        )
    else:
        if args.include_text_encoders or args.t5_fp8:
            raise ValueError("--include-text-encoders and --t5-fp8 apply to --to single-file only")
        written = single_file_convert.write_diffusers_folder(args.source, args.output, config=args.config)
    print(f"wrote {args.output} ({', '.join(written)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sd3` console script."""
    runtime.configure()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "submit":
            return _submit(args)
        if args.command in ("train", "schedule", "nightly"):
            return _training_command(args)
        if args.command == "convert":
            return _convert(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"sd3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
