"""Command lines of the training jobs: `sd3 train`, `sd3 schedule`, `sd3 nightly`.

`sd3 train dreambooth ...` / `sd3 train dreambooth-lora ...` take the flags of diffusers'
train_dreambooth_(lora_)sd3.py as written (`--instance_data_dir=dog --mixed_precision="fp16"`),
so an existing command works with the script name replaced, plus `--device gpu|npu|cpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Any

from jobs import nightly, submit
from pipelines.training.config import RUN_GROUP, TrainConfig, config_flags
from pipelines.training.devices import apply_npu_flags, select_device
from sd3_core.storage import StorageOptions, normalize_url

# Flags the reference scripts have that change nothing here (accepted so commands keep working).
_IGNORED = ("revision", "variant", "cache_dir", "dataloader_num_workers", "local_rank", "hub_token",
            "hub_model_id", "allow_tf32", "upcast_before_saving", "adam_weight_decay_text_encoder",
            "text_encoder_lr", "dataset_config_name")  # fmt: skip


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="fine-tune the SD3 transformer (DreamBooth, full or LoRA) in a Ray actor",
        description="DreamBooth fine-tuning of the SD3 transformer on a Ray node with the requested device.",
    )
    kinds = train.add_subparsers(dest="train_kind", required=True)
    for kind, help_text in (
        ("dreambooth", "full fine-tune (train_dreambooth_sd3.py flags); writes OUTPUT/transformer/"),
        (
            "dreambooth-lora",
            "LoRA (train_dreambooth_lora_sd3.py flags); writes OUTPUT/pytorch_lora_weights.safetensors",
        ),
    ):
        _add_train_flags(kinds.add_parser(kind, help=help_text, description=help_text, allow_abbrev=False))


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """A flag per TrainConfig field that is one (types from its annotations), then those that are none."""
    groups: dict[str | None, argparse._ActionsContainer] = {None: p}
    for spec in config_flags():
        if spec.flag.group not in groups:
            groups[spec.flag.group] = p.add_argument_group(spec.flag.group)
        kwargs: dict[str, Any] = {"dest": spec.name, "help": spec.flag.help}
        if spec.flag_type is bool:
            kwargs["action"] = "store_true"
        elif spec.flag_type in (int, float):
            kwargs["type"] = spec.flag_type
        elif spec.flag_type is not str:
            raise TypeError(
                f"TrainConfig.{spec.name}: a {spec.flag_type.__name__} is no flag; declare it not_a_flag"
            )
        if spec.flag.choices:
            kwargs["choices"] = spec.flag.choices
        if spec.default is dataclasses.MISSING:
            kwargs["required"] = True
        groups[spec.flag.group].add_argument(*spec.option_strings, **kwargs)
    # Not fields: the spellings of not_a_flag fields, reference flags refused or ignored, where it runs.
    a = p.add_argument
    a("--no_cache_text_embeddings", action="store_true", help="re-encode prompts every step")
    a("--use_8bit_adam", action="store_true")
    a("--train_text_encoder", action="store_true")
    run = groups[RUN_GROUP]
    run.add_argument(
        "--ray_address", default=None, help="Ray cluster (default $RAY_ADDRESS, else a local Ray)"
    )
    run.add_argument("--local", action="store_true", help="train in this process, without Ray")
    run.add_argument("--s3_endpoint_url", default=None)
    for name in _IGNORED:
        p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    # Every field's default is TrainConfig's; the command line only trains on a GPU by default.
    p.set_defaults(**{**_config_defaults(), "device": "gpu"})


def _config_defaults() -> dict:
    return {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(TrainConfig)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a parsed `sd3 train` command line (not yet checked)."""
    if args.train_text_encoder:
        raise ValueError("--train_text_encoder is not supported: only the transformer is trained")
    if args.use_8bit_adam:
        raise ValueError("--use_8bit_adam is not supported (bitsandbytes is PyTorch-only); drop the flag")
    for name in _IGNORED:
        if getattr(args, name, None) is not None:
            warnings.warn(f"--{name} has no effect here; ignored", stacklevel=2)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in vars(args).items() if name in names}
    for spec in config_flags():
        if spec.flag_type is not spec.type:  # spelled in another type (precondition_outputs: 0/1)
            values[spec.name] = spec.type(values[spec.name])
    values.update(
        mode="lora" if args.train_kind == "dreambooth-lora" else "full",
        cache_text_embeddings=not args.no_cache_text_embeddings,
        storage=StorageOptions.from_env(endpoint_url=args.s3_endpoint_url),
    )
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> int:
    if args.local and args.device == "npu":
        apply_npu_flags()  # before jobs.train imports paddle
    from jobs.train import run_on_ray, train  # loads Paddle: after the NPU flags, and only to train

    config = config_from_args(args)
    if args.local:
        select_device(config.device)
        result = train(config).as_dict()
    else:
        result = run_on_ray(config, args.ray_address)
    if result.get("skipped"):
        print(f"nothing to do: {result['skipped']} ({result['published']})", file=sys.stderr)
        return 0
    history = result["history"]
    first, last = (history[0]["loss"], history[-1]["loss"]) if history else (float("nan"), float("nan"))
    print(
        f"trained {result['global_step']} steps in {result['seconds']:.1f}s (loss {first:.4f} -> {last:.4f}); "
        f"weights {result['weights']}; {len(result['checkpoints'])} checkpoints; "
        f"{len(result['validation_images'])} validation images"
        + (f"; wandb run {result['wandb_run_dir']}" if result.get("wandb_run_dir") else "")
        + (f"; published {result['published']}" if result.get("published") else ""),
        file=sys.stderr,
    )
    print(
        json.dumps(
            {k: result[k] for k in ("output_dir", "global_step", "weights", "published", "info")}, default=str
        )
    )
    return 0


def add_schedule_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "schedule",
        help="print cron / systemd / KubeRay RayCronJob lines for a nightly LoRA spec",
        description="Print the crontab line, systemd service + timer and KubeRay RayCronJob manifest that "
        "run `sd3 nightly trigger SPEC` on the spec's schedule (UTC).",
    )
    p.add_argument("spec", metavar="SPEC", help="nightly spec file (YAML/JSON; local path or URL)")
    p.add_argument("--sd3", default="sd3", help="the sd3 executable the lines call (default: sd3 on PATH)")


def run_schedule(args: argparse.Namespace) -> int:
    spec_url = normalize_url(args.spec)
    spec = nightly.load_spec(spec_url)
    sd3 = args.sd3
    if sd3 == "sd3":
        candidate = os.path.join(os.path.dirname(sys.executable), "sd3")
        sd3 = candidate if os.path.exists(candidate) else "sd3"
    print(nightly.schedule_text(spec, spec_url, sd3))
    return 0


def add_nightly_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("nightly", help="nightly LoRA fine-tunes (what `sd3 schedule` lines run)")
    sub = p.add_subparsers(dest="nightly_command", required=True)
    t = sub.add_parser("trigger", help="submit today's run through Ray Jobs unless it was submitted already")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("spec", nargs="?", metavar="SPEC", default=None)
    src.add_argument("--spec-json", default=None, help="the spec inline (as the RayCronJob passes it)")
    t.add_argument("--date", default=None, help="run date YYYY-MM-DD (default: today, UTC)")
    t.add_argument(
        "--address", default=None, help="Ray dashboard (default: the spec's ray.address, $RAY_ADDRESS)"
    )
    t.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")


def run_nightly(args: argparse.Namespace) -> int:
    spec = (
        nightly.parse_spec(args.spec_json, "--spec-json") if args.spec_json else nightly.load_spec(args.spec)
    )
    client = submit.connect(args.address or spec.ray.get("address"))
    out = nightly.trigger(spec, args.date, client=client)
    if out["submitted"]:
        print(f"submitted {out['submission_id']}", file=sys.stderr)
    else:
        print(
            f"{out['submission_id']} was already submitted (status {out['status']}); not training twice",
            file=sys.stderr,
        )
    if args.follow:
        job = submit.Submission(client.get_address(), out["submission_id"], "")
        status = submit.follow(job, client)
        return 0 if status == "SUCCEEDED" else 1
    return 0
