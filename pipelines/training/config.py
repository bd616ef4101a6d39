"""The training run's configuration: every field once, with its default, and its checks.

Field names are the flags of diffusers' train_dreambooth_(lora_)sd3.py; `jobs/train_cli.py`
takes its flags' defaults from here and builds a `TrainConfig` by those names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipelines.training.devices import DEVICES
from sd3_core.storage import StorageOptions

MODES = ("lora", "full")
MIXED_PRECISION = {None: "float32", "no": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class TrainConfig:
    """Everything a training run needs; field names are the reference scripts' flags."""

    pretrained_model_name_or_path: str
    output_dir: str
    instance_prompt: str | None = None
    instance_data_dir: str | None = None
    dataset: str | None = None  # Parquet table (file or folder URL) of images + captions
    image_column: str = "image"
    caption_column: str | None = None
    mode: str = "lora"
    # prior preservation
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    sample_batch_size: int = 4
    class_inference_steps: int = 28
    prior_generation_precision: str | None = None
    # data
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    repeats: int = 1
    max_sequence_length: int | None = None  # None: the model folder's default (256 unless it declares one)
    caption_dropout: float = 0.0  # probability of training a sample on the empty prompt (for CFG)
    cache_latents: bool = False
    cache_text_embeddings: bool = True
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
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    # optimizer
    optimizer: str = "AdamW"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    # LoRA
    rank: int = 4
    lora_alpha: float | None = None
    lora_layers: str | None = None  # comma-separated module-name suffixes (peft target_modules)
    lora_blocks: str | None = None  # comma-separated transformer block indices
    # checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    # validation and tracking
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_epochs: int = 50
    validation_inference_steps: int = 28
    validation_guidance_scale: float = 7.0
    not_validation_final: bool = False
    report_to: str = "wandb"
    logging_dir: str | None = None
    tracker_project_name: str | None = None
    # where it runs
    device: str = "cpu"
    num_cpus: float = 1.0
    storage: StorageOptions = field(default_factory=StorageOptions)
    # nightly publishing (sd3_core/lora_registry.py)
    publish_to: str | None = None
    publish_version: str | None = None

    def check(self) -> None:
        """Raise ValueError naming the flag and the fix for an unusable combination."""
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        if (self.instance_data_dir is None) == (self.dataset is None):
            raise ValueError(
                "pass exactly one of --instance_data_dir (a folder/prefix of images) or --dataset (a Parquet table)"
            )
        if self.instance_data_dir is not None and not self.instance_prompt:
            raise ValueError("--instance_prompt is required with --instance_data_dir")
        if self.with_prior_preservation:
            if not self.class_data_dir or not self.class_prompt:
                raise ValueError("--with_prior_preservation needs --class_data_dir and --class_prompt")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed_precision={self.mixed_precision!r} must be one of no, fp16, bf16")
        if self.device not in DEVICES:
            raise ValueError(f"--device={self.device!r} must be one of {DEVICES}")
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
