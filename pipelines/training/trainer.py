"""DreamBooth fine-tuning of the SD3 transformer, full or LoRA (diffusers' train_dreambooth_(lora_)sd3.py).

One step, ``gradient_accumulation_steps`` micro-batches of ``train_batch_size`` samples each:

    positions -> entries (seeded order) -> pixels, prompt      (data.py)
    latents = (vae.encode(x).latent_dist.sample(noise) - shift) * scaling  (encodings.py; cached posterior with --cache_latents)
    text embeddings at T5 length max_sequence_length           (cached with --cache_text_embeddings)
    u ~ density, t = schedule[u * 1000], x_t = (1 - s) x0 + s n
    loss = flow_matching_loss(...) / accumulation, backward on loss * loss_scale   (loss.py)
    then once: finite check, unscale, global-norm clip, one AdamW update, lr from the schedule (optim.py)

Every random draw is keyed by (seed, purpose, sample position) instead of coming from a shared
generator, so the sample at position p sees the same image, timestep and noise whatever the
batch split (4 x 1 accumulation equals a batch of 4) and whether the run was resumed.

The reference scripts' bugs (sd3-reference.md section 7) are avoided: latents get the shift
factor, T5 runs at ``max_sequence_length`` (default: the model folder's, else 256), the loss scaler makes
one optimizer update per step, and prior preservation splits the loss weighting too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.training import checkpoints
from pipelines.training.config import TrainConfig
from pipelines.training.data import Entry, load_training_data
from pipelines.training.encodings import SampleEncoder
from pipelines.training.loss import batch_loss, evaluation_loss
from pipelines.training.model import load_models
from pipelines.training.optim import AdamW, LossScaler, LRSchedule, clip_coefficient, global_grad_norm
from pipelines.training.outputs import publish_weights, published_already, save_weights, validate
from pipelines.training.tracking import Tracker
from sd3_core import runtime
from sd3_core.model_cache import local_model_path
from sd3_core.storage import check_writable, normalize_url, split_url
from sd3_core.training import FlowMatchingLoss

log = logging.getLogger(__name__)

_LOG_EVERY = 25  # steps between progress lines (logger pipelines.training.trainer, INFO)


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: str
    global_step: int
    resumed_from: str | None
    weights: str  # the LoRA file or the transformer/ folder
    checkpoints: list[str]
    validation_images: list[str]
    history: list[dict[str, float]]
    seconds: float
    wandb_run_dir: str | None = None
    published: str | None = None
    skipped: str | None = None  # why nothing was trained (e.g. already published)
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Trainer:
    """One training run: ``Trainer(config).run()``; :meth:`evaluation_loss` measures learning."""

    def __init__(self, config: TrainConfig, on_step_end: Callable[[int], None] | None = None) -> None:
        runtime.configure()
        config.check()
        self.config = config
        self.on_step_end = on_step_end
        self.output = normalize_url(config.output_dir)
        self.seed = 0 if config.seed is None else int(config.seed)
        self._ready = False

    def setup(self) -> None:
        """Load models and data, build the optimizer (no training)."""
        if self._ready:
            return
        c = self.config
        # Resolved first: a model that cannot be had (e.g. a Hub id not cached offline) writes nothing.
        model_path = local_model_path(c.pretrained_model_name_or_path, c.storage)
        check_writable(self.output, c.storage)
        self.models = load_models(c, model_path, self.seed)
        self.data = load_training_data(c, self.seed, self.models.pipe)
        self.encoder = SampleEncoder(self.models.pipe, c)
        per_step = c.train_batch_size * c.gradient_accumulation_steps
        self.max_steps = c.max_train_steps or c.num_train_epochs * math.ceil(self.data.length / per_step)
        self._setup_optimizer()
        self._ready = True

    # -- one step
    def batch_loss(self, positions: list[int]) -> FlowMatchingLoss:
        """The flow-matching loss of the samples at ``positions`` (instance half, then class half)."""
        return batch_loss(positions, self.config, self.seed, self.data, self.models, self.encoder)

    def _setup_optimizer(self) -> None:
        c = self.config
        lr = c.learning_rate
        if c.scale_lr:
            lr = lr * c.gradient_accumulation_steps * c.train_batch_size
        self.optimizer = AdamW(
            self.models.params, (c.adam_beta1, c.adam_beta2), c.adam_epsilon, c.adam_weight_decay
        )
        self.schedule = LRSchedule(
            c.lr_scheduler, lr, c.lr_warmup_steps, self.max_steps, float(c.lr_num_cycles), c.lr_power
        )
        # fp16 needs loss scaling (its range underflows small gradients); bf16 does not.
        self.scaler = LossScaler(enabled=c.mixed_precision == "fp16")

    def optimizer_step(self) -> dict[str, float]:
        """Check, unscale, clip and apply the accumulated gradients: at most one update."""
        params = self.models.params
        inv = self.scaler.unscale_factor()
        norm = global_grad_norm(params, inv)
        finite = math.isfinite(norm)
        applied = self.scaler.update(finite)
        lr = self.schedule.lr(self.optimizer.step_count)
        if applied:
            coef = clip_coefficient(norm, self.config.max_grad_norm)
            self.optimizer.step(lr, grad_scale=inv * coef)
        self.optimizer.zero_grad()
        return {"lr": lr, "grad_norm": norm, "applied": float(applied), "loss_scale": self.scaler.scale}

    def _train_step(self, step: int) -> dict[str, float]:
        """Accumulate the step's micro-batches, make the update; returns the step's history row."""
        c = self.config
        t0 = time.monotonic()
        per_step = c.train_batch_size * c.gradient_accumulation_steps
        parts = {"loss": 0.0, "instance_loss": 0.0, "prior_loss": 0.0}
        for micro in range(c.gradient_accumulation_steps):
            base = step * per_step + micro * c.train_batch_size
            out = self.batch_loss(list(range(base, base + c.train_batch_size)))
            self.scaler.scale_loss(out.loss / c.gradient_accumulation_steps).backward()
            parts["loss"] += float(out.loss) / c.gradient_accumulation_steps
            parts["instance_loss"] += float(out.instance) / c.gradient_accumulation_steps
            if out.prior is not None:
                parts["prior_loss"] += float(out.prior) / c.gradient_accumulation_steps
        stats = self.optimizer_step()
        done = step + 1
        row = {
            "step": done,
            **parts,
            **stats,
            "samples_per_second": per_step / max(time.monotonic() - t0, 1e-9),
            "epoch": done * per_step / self.data.length,
        }
        if not c.with_prior_preservation:
            row.pop("prior_loss")
        return row

    # -- the run's state (what a checkpoint holds besides weights and moments)
    def _state(self, step: int) -> dict[str, Any]:
        c = self.config
        return {
            "format": 1,
            "global_step": step,
            "mode": c.mode,
            "optimizer": self.optimizer.state_json(),
            "loss_scaler": self.scaler.state_dict(),
            "lr_schedule": dataclasses.asdict(self.schedule),
            "order": {
                "seed": self.seed,
                "train_batch_size": c.train_batch_size,
                "gradient_accumulation_steps": c.gradient_accumulation_steps,
                "with_prior_preservation": c.with_prior_preservation,
                "data_fingerprint": self.data.fingerprint,
                "dataset_length": self.data.length,
            },
            "lora": {"rank": c.rank, "alpha": c.lora_alpha, "modules": self.models.lora_modules},
        }

    # -- the fixed evaluation used to measure learning
    def evaluation_loss(
        self, entries: list[Entry] | None = None, sigmas=(0.25, 0.5, 0.75), seed: int = 1234
    ) -> float:
        """Loss on ``entries`` (default: the instance images) at fixed sigmas with fixed noise
        (posterior mean, no weighting): the same inputs before and after training, so a drop is learning."""
        entries = self.data.instances if entries is None else entries
        return evaluation_loss(entries, self.models, self.encoder, sigmas, seed)

    def _tracker(self) -> Tracker:
        c = self.config
        scheme, path = split_url(self.output)
        log_dir = c.logging_dir or (
            os.path.join(path, "logs")
            if scheme == ""
            else os.path.join(tempfile.gettempdir(), "sd3-train-logs")
        )
        return Tracker(
            c.report_to, log_dir, c.tracker_project_name or f"sd3-dreambooth-{c.mode}", c.public_dict()
        )

    def run(self) -> TrainResult:
        c = self.config
        t_start = time.monotonic()
        where = published_already(c)
        if where is not None:
            log.info("%s is already published; not training again", where)
            return TrainResult(
                self.output, 0, None, where, [], [], [], 0.0, published=where, skipped="already published"
            )
        self.setup()
        per_step = c.train_batch_size * c.gradient_accumulation_steps
        start, resumed = 0, None
        if c.resume_from_checkpoint:
            resumed = checkpoints.resolve_checkpoint(self.output, c.resume_from_checkpoint, c.storage)
            if resumed is None:
                log.info("no checkpoint in %s yet; starting a new run", self.output)
            else:
                start = checkpoints.load_checkpoint(
                    resumed, self._state(0), self.models, self.optimizer, self.scaler, c.storage
                )
                log.info("resumed from %s at step %d", resumed, start)
        tracker = self._tracker()
        history: list[dict[str, float]] = []
        saved: list[str] = []
        validation: list[str] = []
        try:
            for step in range(start, self.max_steps):
                row = self._train_step(step)
                done = row["step"]
                history.append(row)
                tracker.log({k: v for k, v in row.items() if k != "step"}, step=done)
                if done % _LOG_EVERY == 0 or done == self.max_steps:
                    log.info("step %d/%d loss %.4f lr %.2e (%.1f samples/s)", done, self.max_steps,
                             row["loss"], row.get("lr", float("nan")), row["samples_per_second"])  # fmt: skip
                if done % c.checkpointing_steps == 0:
                    saved.append(
                        checkpoints.save_checkpoint(
                            self.output,
                            done,
                            self._state(done),
                            self.models,
                            self.optimizer,
                            c.storage,
                            c.checkpoints_total_limit,
                        )  # fmt: skip
                    )
                epochs_before, epochs_after = (
                    (step * per_step) // self.data.length,
                    (done * per_step) // self.data.length,
                )
                if c.validation_prompt and any(
                    e % c.validation_epochs == 0 for e in range(epochs_before + 1, epochs_after + 1)
                ):
                    validation += validate(c, self.models, self.output, self.seed, done, tracker)
                if self.on_step_end is not None:
                    self.on_step_end(done)
            weights = save_weights(self.models, self.output, c)
            if c.validation_prompt and not c.not_validation_final:
                validation += validate(
                    c, self.models, self.output, self.seed, self.max_steps, tracker, final=True
                )
        finally:
            run_dir = tracker.run_dir
            tracker.finish()
        result = TrainResult(
            output_dir=self.output,
            global_step=self.max_steps,
            resumed_from=resumed,
            weights=weights,
            checkpoints=saved,
            validation_images=validation,
            history=history,
            seconds=time.monotonic() - t_start,
            wandb_run_dir=run_dir,
        )
        if c.publish_to is not None:
            result.published = publish_weights(weights, c, self.max_steps)
        return result
