"""The batch job's configuration and outcome, and the checks of the configuration alone."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from actors.replica import DTYPES
from jobs.work_rows import JOB_LIMITS, JobDefaults
from sd3_core.devices import DEVICE_KINDS
from sd3_core.generation_fields import GENERATION_FIELDS, MAX_SEED
from sd3_core.storage import StorageOptions

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")

IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

CONTACT_SHEET_IMAGES = 16


class JobError(ValueError):
    """A job-level problem found before any work (bad input, output, model or configuration)."""


class JobFailed(RuntimeError):
    """The job stopped part-way (e.g. the model cannot load on a replica); what is done is kept."""


@dataclass
class JobConfig:
    """Everything a batch job needs. `prompts` (a table URL) or `prompt_list` (in-memory prompts)."""

    output: str
    prompts: str | None = None
    prompt_list: Sequence[str] | None = None
    model: str = DEFAULT_MODEL
    replicas: int = 1
    device: str = "cpu"
    cpus_per_replica: float = 1.0
    mp: int = 1  # tensor-parallel shards per replica (issue 4)
    cfg_parallel: bool = False  # the two CFG halves on two devices: a replica of 2 x mp ranks
    lora: str | None = None  # a LoRA adapter for every row: file, folder, URL or REGISTRY[:VERSION]
    lora_scale: float = 1.0
    batch_size: int = 4
    dtype: str = "float32"
    inference_optimize: bool = False  # replicas run the transformer as static programs
    vae_tiling: bool = False  # replicas decode in overlapping VAE tiles (large images, bounded memory)
    vae_tile_tolerance: float | None = None  # their pipe.vae.tile_tolerance (None: the VAE's default)
    benchmark: bool = False  # warm-up, then stage timings, images/s and peak RSS (jobs.benchmark_report)
    defaults: JobDefaults = field(default_factory=JobDefaults)
    image_format: str = "png"
    ray_address: str | None = None
    storage: StorageOptions = field(default_factory=StorageOptions.from_env)
    contact_sheet_images: int = CONTACT_SHEET_IMAGES
    progress: bool = True

    def public_dict(self) -> dict[str, Any]:
        """The configuration for job.json (no credentials)."""
        d = {
            k: str(v) if isinstance(v, float) and not math.isfinite(v) else v  # strict JSON: "inf"
            for k, v in asdict(self).items()
            if k not in ("storage", "defaults", "prompt_list")
        }
        d["prompt_list"] = list(self.prompt_list) if self.prompt_list is not None else None
        d["defaults"] = asdict(self.defaults)
        d["storage"] = self.storage.public_dict()
        return d


@dataclass
class JobResult:
    """What a finished run did: counts of the merged manifest and of this run's work."""

    output: str
    manifest: str | None
    counts: dict[str, Any]
    processed_images: int  # images rendered (or error rows recorded) by this run
    skipped_rows: int  # rows already done by an earlier run
    seconds: float
    finalized: bool  # False when there was nothing to do and nothing was written
    benchmark: dict[str, Any] | None = None  # with JobConfig.benchmark: BenchmarkTally.report

    @property
    def rows_failed(self) -> int:
        return int(self.counts.get("rows_failed", 0))


def check_config(config: JobConfig) -> None:
    """JobError for the first problem of `config` itself (no storage, model or cluster read)."""
    if (config.prompts is None) == (config.prompt_list is None):
        raise JobError("give exactly one of --prompts URL or --prompt TEXT")
    if config.prompt_list is not None and not config.prompt_list:
        raise JobError("--prompt: no prompts given")
    if not isinstance(config.replicas, int) or config.replicas < 1:
        raise JobError(f"--replicas {config.replicas!r} must be an integer >= 1")
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise JobError(f"--batch-size {config.batch_size!r} must be an integer >= 1")
    if not isinstance(config.mp, int) or config.mp < 1:
        raise JobError(f"--mp {config.mp!r} must be an integer >= 1")
    if config.device not in DEVICE_KINDS:
        raise JobError(f"--device {config.device!r} must be one of {', '.join(DEVICE_KINDS)}")
    if config.dtype not in DTYPES:
        raise JobError(f"--dtype {config.dtype!r} must be one of {', '.join(DTYPES)}")
    if config.inference_optimize and config.device == "npu":
        raise JobError("--inference-optimize runs on CPU and GPU; --device npu runs eagerly")
    if config.defaults.init_image is not None and (config.mp > 1 or config.cfg_parallel):
        raise JobError("--init-image: image to image does not run on parallel replica groups "
                       "(--cfg-parallel / --mp 2); drop those flags")  # fmt: skip
    if config.inference_optimize and config.mp > 1:
        raise JobError(f"--inference-optimize runs whole transformers; --mp {config.mp} shards run eagerly "
                       "(use --mp 1; --cfg-parallel works with it)")  # fmt: skip
    if config.vae_tile_tolerance is not None:
        if not config.vae_tiling:
            raise JobError("--vae-tile-tolerance applies to tiled decoding: add --vae-tiling")
        if isinstance(config.vae_tile_tolerance, bool) or not (
            isinstance(config.vae_tile_tolerance, int | float) and config.vae_tile_tolerance >= 0
        ):
            raise JobError(
                f"--vae-tile-tolerance {config.vae_tile_tolerance!r} must be a number >= 0 (inf allowed)"
            )
    if config.image_format not in IMAGE_FORMATS:
        raise JobError(f"--image-format {config.image_format!r} must be one of {', '.join(IMAGE_FORMATS)}")
    d = config.defaults
    limits = {name: getattr(d, name) for name in JOB_LIMITS}
    for f in GENERATION_FIELDS:
        v = getattr(d, f.name, None)
        spelling = f.flags[0] if f.flags else f.name
        if v is None and f.default is not None:
            raise JobError(f"{spelling} must be given (default {f.default})")
        problem = None if v is None else f.problem(v, limits)
        if problem is None and f.name == "seed" and v is not None and not 0 <= v <= MAX_SEED:
            problem = f"seed: {v} is outside 0..2**63-1"
        if problem:
            raise JobError(f"{spelling} {problem.split(': ', 1)[1]}")
    if config.lora is not None and not config.lora.strip():
        raise JobError("--lora: empty reference")
    if not isinstance(config.lora_scale, int | float) or not math.isfinite(config.lora_scale):
        raise JobError(f"--lora-scale {config.lora_scale!r} must be a finite number")
    if config.lora is None and config.lora_scale != 1.0:
        raise JobError(f"--lora-scale {config.lora_scale:g} needs --lora")
