"""The training run's configuration: every field once, with its default, its flag and its checks.

Field names are the flags of diffusers' train_dreambooth_(lora_)sd3.py. A field is a flag of
``sd3 train`` of its annotation's type unless declared with :func:`not_a_flag`; :func:`flag` adds
what the command line shows (help, choices, aliases). ``jobs/train_cli.py`` builds the flags from
:func:`config_flags`, and :meth:`TrainConfig.check` checks the declared choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pipelines.training.tracking import REPORTERS
from sd3_core.devices import DEVICE_KINDS
from sd3_core.storage import StorageOptions

MODES = ("lora", "full")
MIXED_PRECISION = {None: "float32", "no": "float32", "fp16": "float16", "bf16": "bfloat16"}
# sd3_core.training.split_scheme's names (that module loads Paddle), in the reference scripts' order.
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
RUN_GROUP = "where it runs"


@dataclass(frozen=True)
class Flag:
    """How a field is spelled on the command line: ``--NAME`` plus ``aliases``, of the field's
    type unless ``type`` says otherwise; ``group``: the title of its section of ``--help``."""

    help: str | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    type: type | None = None
    group: str | None = None


@dataclass(frozen=True)
class ConfigFlag:
    """A field that is a flag: its name, value type (``X | None``: X), whether None is allowed,
    its default (``dataclasses.MISSING``: a required flag) and its :class:`Flag`."""

    name: str
    type: type
    nullable: bool
    default: Any
    flag: Flag

    @property
    def option_strings(self) -> tuple[str, ...]:
        return (f"--{self.name}", *self.flag.aliases)

    @property
    def flag_type(self) -> type:
        return self.flag.type or self.type


def flag(
    default: Any = dataclasses.MISSING,
    *,
    help: str | None = None,
    choices: typing.Iterable[str] = (),
    aliases: tuple[str, ...] = (),
    type: type | None = None,
    group: str | None = None,
) -> Any:
    """A field with ``default`` whose flag has this help, choices, aliases, type and group."""
    return field(default=default, metadata={"flag": Flag(help, tuple(choices), aliases, type, group)})


def not_a_flag(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field no flag of its own name sets (the command line sets it otherwise, or only the API does)."""
    return field(default=default, default_factory=default_factory, metadata={"flag": None})


@dataclass
class TrainConfig:
    """Everything a training run needs; field names are the reference scripts' flags."""

    pretrained_model_name_or_path: str = flag(
        help="diffusers SD3 folder, s3:// prefix or Hugging Face Hub id (org/name)"
    )
    output_dir: str = flag(help="folder or s3:// prefix for checkpoints, outputs and validation images")
    instance_prompt: str | None = None
    instance_data_dir: str | None = flag(None, help="folder or s3:// prefix of instance images")
    dataset: str | None = flag(
        None, help="Parquet table (file/folder URL) of images + captions", aliases=("--dataset_name",)
    )
    image_column: str = "image"
    caption_column: str | None = None
    mode: str = not_a_flag("lora")  # the sub-command: dreambooth-lora or dreambooth (full)
    # prior preservation
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    sample_batch_size: int = 4
    class_inference_steps: int = flag(28, help="denoising steps for generated class images")
    prior_generation_precision: str | None = flag(
        None,
        choices=("no", "fp32", "fp16", "bf16"),
        help="accepted for compatibility; class images are rendered in the --mixed_precision dtype",
    )
    # data
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    repeats: int = 1
    max_sequence_length: int | None = flag(
        None, help="T5 tokens in training (default: the model folder's _max_sequence_length, else 256)"
    )
    caption_dropout: float = flag(
        0.0,
        help="probability of replacing a caption by the empty prompt (trains the unconditional branch of CFG)",
    )
    cache_latents: bool = False
    cache_text_embeddings: bool = not_a_flag(True)  # --no_cache_text_embeddings
    # schedule
    seed: int | None = None
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = 1
    max_train_steps: int | None = None
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    weighting_scheme: str = flag("logit_normal", choices=WEIGHTING_SCHEMES)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = flag(False, type=int, help="1: train the preconditioned x0 estimate")
    # optimizer
    optimizer: str = "AdamW"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str | None = flag(None, choices=(k for k in MIXED_PRECISION if k is not None))
    # LoRA
    rank: int = 4
    lora_alpha: float | None = flag(None, help="default: the rank")
    lora_layers: str | None = flag(
        None, help="comma-separated module suffixes (default: the attention projections)"
    )
    lora_blocks: str | None = flag(None, help="comma-separated transformer block indices (default: all)")
    # checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = flag(None, help='"latest", "checkpoint-N" or a checkpoint URL')
    # validation and tracking
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_epochs: int = 50
    validation_inference_steps: int = 28
    validation_guidance_scale: float = not_a_flag(7.0)  # not a flag of the reference scripts
    not_validation_final: bool = False
    report_to: str = flag("wandb", choices=REPORTERS)
    logging_dir: str | None = None
    tracker_project_name: str | None = None
    # where it runs
    device: str = flag(
        "cpu", choices=DEVICE_KINDS, group=RUN_GROUP, help="device of the training actor (default gpu)"
    )
    num_cpus: float = flag(1.0, group=RUN_GROUP, help="CPUs of the training actor")
    storage: StorageOptions = not_a_flag(default_factory=StorageOptions)  # --s3_endpoint_url, AWS_*
    # nightly publishing (sd3_core/lora_registry.py)
    publish_to: str | None = flag(None, help="LoRA registry to publish the adapter in (nightly runs)")
    publish_version: str | None = None

    def check(self) -> None:
        """Raise ValueError naming the flag and the fix for an unusable combination."""
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        for spec in config_flags():
            value = getattr(self, spec.name)
            if spec.flag.choices and value not in spec.flag.choices and not (value is None and spec.nullable):
                raise ValueError(f"--{spec.name}={value!r} must be one of {', '.join(spec.flag.choices)}")
        if (self.instance_data_dir is None) == (self.dataset is None):
            raise ValueError(
                "pass exactly one of --instance_data_dir (a folder/prefix of images) or --dataset (a Parquet table)"
            )
        if self.instance_data_dir is not None and not self.instance_prompt:
            raise ValueError("--instance_prompt is required with --instance_data_dir")
        if self.with_prior_preservation:
            if not self.class_data_dir or not self.class_prompt:
                raise ValueError("--with_prior_preservation needs --class_data_dir and --class_prompt")
        if self.optimizer.lower() != "adamw":
            raise ValueError(f"--optimizer={self.optimizer!r}: only AdamW is supported")
        for name in (
            "train_batch_size",
            "gradient_accumulation_steps",
            "resolution",
            "checkpointing_steps",
            "rank",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")
        if self.resolution % 16:
            raise ValueError(
                f"--resolution={self.resolution} is not a multiple of 16 (VAE factor 8 x patch 2)"
            )
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"--max_train_steps={self.max_train_steps} must be >= 1")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            raise ValueError(f"--max_sequence_length={self.max_sequence_length} must be in [1, 512]")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"--caption_dropout={self.caption_dropout} must be in [0, 1)")
        if (self.publish_to is None) != (self.publish_version is None):
            raise ValueError("--publish_to and --publish_version go together")
        if self.publish_to is not None and self.mode != "lora":
            raise ValueError("--publish_to publishes LoRA adapters; it needs dreambooth-lora")

    def public_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "storage"}
        out["storage"] = self.storage.public_dict()
        return out


def config_flags() -> tuple[ConfigFlag, ...]:
    """The fields that are flags, in declaration order, with their types read from the annotations."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        if "flag" in f.metadata and f.metadata["flag"] is None:
            continue
        hint = hints[f.name]
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        (value_type,) = (t for t in options if t is not type(None))
        out.append(
            ConfigFlag(f.name, value_type, type(None) in options, f.default, f.metadata.get("flag", Flag()))
        )
    return tuple(out)
