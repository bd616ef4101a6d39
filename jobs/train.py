"""DreamBooth fine-tuning of the SD3 transformer, full or LoRA (diffusers' train_dreambooth_(lora_)sd3.py).

One step, ``gradient_accumulation_steps`` micro-batches of ``train_batch_size`` samples each:

    positions -> entries (seeded order) -> pixels, prompt      (pipelines/training/data.py)
    latents = (vae.encode(x).sample(noise) - shift) * scaling  (cached posterior with --cache_latents)
    text embeddings at T5 length max_sequence_length           (cached with --cache_text_embeddings)
    u ~ density, t = schedule[u * 1000], x_t = (1 - s) x0 + s n
    loss = flow_matching_loss(...) / accumulation, backward on loss * loss_scale
    then once: finite check, unscale, global-norm clip, one AdamW update, lr from the schedule

Every random draw is keyed by (seed, purpose, sample position) instead of coming from a shared
generator, so the sample at position p sees the same image, timestep and noise whatever the
batch split (4 x 1 accumulation equals a batch of 4) and whether the run was resumed.

The reference scripts' bugs (sd3-reference.md section 7) are avoided: latents get the shift
factor, T5 runs at ``max_sequence_length`` (default: the model folder's, else 256), the loss scaler makes
one optimizer update per step, and prior preservation splits the loss weighting too.
"""

from __future__ import annotations

import sd3_core.runtime  # noqa: F401  (thread/MKL settings must precede paddle's import)

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs.ray_session import connect_ray
from pipelines.training import checkpoints
from pipelines.training.config import MIXED_PRECISION, TrainConfig
from pipelines.training.data import (
    STREAM_CAPTION,
    STREAM_NOISE,
    STREAM_VAE,
    Entry,
    SampleOrder,
    build_entries,
    fingerprint,
    image_files,
    read_image_folder,
    read_parquet_table,
    rng_for,
    save_image,
)
from pipelines.training.devices import DEVICE_OVERRIDE_ENV, NPU_FLAGS, select_device
from pipelines.training.optim import AdamW, LossScaler, LRSchedule, clip_coefficient, global_grad_norm
from sd3_core.storage import (
    check_writable,
    join_url,
    normalize_url,
    split_url,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="No ccache found")

_LOG_EVERY = 25  # steps between progress lines (logger jobs.train, INFO)


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


class TrainingInterrupted(RuntimeError):
    pass


# ---- model helpers ----------------------------------------------------------------------------


def init_lora_deterministically(model, seed: int, adapter: str = "default") -> None:
    """peft's "gaussian" init (A ~ N(0, 1/r), B = 0) from a NumPy generator: the same everywhere."""
    import paddle

    from sd3_core import lora

    rng = rng_for(seed, 6)
    for _, layer in sorted(lora.lora_layers(model), key=lambda item: item[0]):
        a = layer.lora_A[adapter].weight
        values = rng.standard_normal(a.shape).astype(np.float32) / layer.rank(adapter)
        with paddle.no_grad():
            a.set_value(paddle.to_tensor(values).astype(a.dtype))
            b = layer.lora_B[adapter].weight
            b.set_value(paddle.zeros(b.shape, b.dtype))


def enable_gradient_checkpointing(transformer) -> None:
    """Recompute each joint block's activations in backward instead of keeping them.

    Wraps every block's ``forward`` from outside (the model code is unchanged); parameter names
    stay as they are. Paddle's non-reentrant recompute takes the blocks' list arguments as is."""
    import paddle
    from paddle.distributed.fleet.utils import recompute

    for block in transformer.transformer_blocks:
        if getattr(block, "_checkpointed", False):
            continue
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if not paddle.is_grad_enabled():
                return _original(*args, **kwargs)
            return recompute(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._checkpointed = True


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


# ---- the trainer -------------------------------------------------------------------------------


class Trainer:
    """One training run. ``Trainer(config).run()``; tests also use :meth:`evaluation_loss`."""

    def __init__(self, config: TrainConfig, on_step_end: Callable[[int], None] | None = None) -> None:
        config.check()
        self.config = config
        self.storage = config.storage
        self.on_step_end = on_step_end
        self.output = normalize_url(config.output_dir)
        self.seed = 0 if config.seed is None else int(config.seed)

    # -- setup
    def _load(self) -> None:
        import paddle

        from pipelines import StableDiffusion3Pipeline
        from sd3_core import lora
        from sd3_core.scheduler import FlowMatchEulerDiscreteScheduler
        from sd3_core.transformer import SD3Transformer2DModel

        c = self.config
        paddle.seed(self.seed)
        self.weight_dtype = MIXED_PRECISION[c.mixed_precision]
        self.on_accelerator = not paddle.get_device().startswith("cpu")
        if self.weight_dtype != "float32" and not self.on_accelerator:
            log.warning(
                "mixed_precision=%s on CPU: Paddle has no half-precision CPU kernels, so autocast does nothing "
                "there (the loss scaler and half-precision frozen weights still apply)",
                c.mixed_precision,
            )
        path = self.model_path
        # The trained weights stay float32 (master weights); frozen parts use the mixed-precision dtype.
        transformer_dtype = "float32" if c.mode == "full" else self.weight_dtype
        transformer = SD3Transformer2DModel.from_pretrained(
            path, subfolder="transformer", dtype=transformer_dtype
        )
        self.pipe = StableDiffusion3Pipeline.from_pretrained(
            path, dtype=self.weight_dtype, transformer=transformer
        )
        self.pipe.set_progress_bar_config(disable=True)
        # train at the length the model is sampled at
        _, c.max_sequence_length = self.pipe.folder_defaults(max_sequence_length=c.max_sequence_length)
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        self.transformer = transformer
        for component in (
            self.pipe.vae,
            self.pipe.text_encoder,
            self.pipe.text_encoder_2,
            self.pipe.text_encoder_3,
        ):
            if component is not None:
                for p in component.parameters():
                    p.stop_gradient = True
        if c.mode == "lora":
            for p in transformer.parameters():
                p.stop_gradient = True
            targets = _csv(c.lora_layers) or lora.DEFAULT_TARGETS
            blocks = [int(b) for b in _csv(c.lora_blocks)] if c.lora_blocks else None
            self.lora_modules = lora.inject_lora(
                transformer, "default", c.rank, c.lora_alpha, targets, blocks, dtype="float32"
            )
            init_lora_deterministically(transformer, self.seed)
            for p in lora.lora_parameters(transformer, "default"):
                p.stop_gradient = False
        else:
            for p in transformer.parameters():
                p.stop_gradient = False
        transformer.train()
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(transformer)
        self.params = {n: p for n, p in transformer.named_parameters() if not p.stop_gradient}

    def _load_data(self) -> None:
        c = self.config
        if c.instance_data_dir is not None:
            items = read_image_folder(c.instance_data_dir, c.instance_prompt, self.storage)
        else:
            items = read_parquet_table(
                c.dataset, c.image_column, c.caption_column, c.instance_prompt, self.storage
            )
        self.instances = build_entries(
            items, c.resolution, self.seed, c.center_crop, c.random_flip, c.repeats
        )
        self.classes: list[Entry] = []
        if c.with_prior_preservation:
            self._generate_class_images()
            class_items = read_image_folder(c.class_data_dir, c.class_prompt, self.storage)[
                : c.num_class_images
            ]
            # Class entries get their own transform draws (offset keys), no repeats.
            self.classes = build_entries(
                class_items, c.resolution, self.seed + 1, c.center_crop, c.random_flip
            )
        self.length = max(len(self.instances), len(self.classes))
        self.order = SampleOrder(self.length, self.seed)
        self.data_fingerprint = fingerprint(self.instances + self.classes)

    def _generate_class_images(self) -> None:
        """Fill class_data_dir up to num_class_images with images the base pipeline renders from the
        class prompt (before any training, so they are the prior)."""
        c = self.config
        have = len(image_files(c.class_data_dir, self.storage))
        missing = c.num_class_images - have
        if missing <= 0:
            return
        log.info("generating %d class images for %r into %s", missing, c.class_prompt, c.class_data_dir)
        done = 0
        while done < missing:
            n = min(c.sample_batch_size, missing - done)
            index = have + done
            images = self.pipe(
                prompt=[c.class_prompt] * n,
                height=c.resolution,
                width=c.resolution,
                num_inference_steps=c.class_inference_steps,
                seed=[self.seed * 100003 + index + k for k in range(n)],
                max_sequence_length=c.max_sequence_length,
            ).images
            for k, image in enumerate(images):
                save_image(join_url(c.class_data_dir, f"class-{index + k:05d}.png"), image, self.storage)
            done += n

    # -- per-sample inputs
    def _text(self, prompts: list[str]):
        import paddle

        c = self.config
        if not hasattr(self, "_text_cache"):
            self._text_cache = {}
        todo = sorted({p for p in prompts if p not in self._text_cache})
        if todo:
            with paddle.no_grad():
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    todo, do_classifier_free_guidance=False, max_sequence_length=c.max_sequence_length
                )
            fresh = {
                p: (embeds[i].astype("float32"), pooled[i].astype("float32")) for i, p in enumerate(todo)
            }
            if not c.cache_text_embeddings:
                return (
                    paddle.stack([fresh[p][0] for p in prompts]),
                    paddle.stack([fresh[p][1] for p in prompts]),
                )
            self._text_cache.update(fresh)
        return (
            paddle.stack([self._text_cache[p][0] for p in prompts]),
            paddle.stack([self._text_cache[p][1] for p in prompts]),
        )

    def _latents(self, entries: list[tuple[str, int, Entry]], vae_noise: np.ndarray):
        """Latents of entries (keyed ("i"|"c", index)) with the given posterior noise."""
        import paddle

        c = self.config
        vae = self.pipe.vae
        shift = vae.config.get("shift_factor") or 0.0
        scale = vae.config.scaling_factor
        with paddle.no_grad():
            if c.cache_latents:
                if not hasattr(self, "_latent_cache"):
                    self._latent_cache = {}
                todo = [(k, i, e) for k, i, e in entries if (k, i) not in self._latent_cache]
                if todo:
                    posterior = vae.encode(
                        paddle.to_tensor(np.stack([e.pixels for _, _, e in todo])).astype(vae.dtype)
                    )
                    for j, (k, i, _) in enumerate(todo):
                        self._latent_cache[(k, i)] = (
                            posterior.mean[j].astype("float32"),
                            posterior.std[j].astype("float32"),
                        )
                mean = paddle.stack([self._latent_cache[(k, i)][0] for k, i, _ in entries])
                std = paddle.stack([self._latent_cache[(k, i)][1] for k, i, _ in entries])
                return ((mean + std * paddle.to_tensor(vae_noise)) - shift) * scale
            from sd3_core.training import encode_latents

            pixels = paddle.to_tensor(np.stack([e.pixels for _, _, e in entries]))
            return encode_latents(vae, pixels, noise=vae_noise).astype("float32")

    def batch_loss(self, positions: list[int]):
        """The flow-matching loss of the samples at ``positions`` (instance half, then class half)."""
        import paddle

        from sd3_core import training

        c = self.config
        density, weighting = training.split_scheme(c.weighting_scheme)
        latent_hw = c.resolution // 8
        channels = self.pipe.vae.config.latent_channels
        picked, draws, noises, vae_noises = [], [], [], []
        halves = [("i", self.instances)] + ([("c", self.classes)] if c.with_prior_preservation else [])
        for half, (kind, entries) in enumerate(halves):
            for pos in positions:
                index = self.order.entry_at(pos) % len(entries)
                picked.append((kind, index, entries[index]))
                rng = rng_for(self.seed, STREAM_NOISE, pos, half)
                draws.append(
                    training.sample_density(density, 1, rng, c.logit_mean, c.logit_std, c.mode_scale)[0]
                )
                noises.append(rng.standard_normal((channels, latent_hw, latent_hw), dtype=np.float32))
                vae_noises.append(
                    rng_for(self.seed, STREAM_VAE, pos, half).standard_normal(
                        (channels, latent_hw, latent_hw), dtype=np.float32
                    )
                )
        x0 = self._latents(picked, np.stack(vae_noises))
        embeds, pooled = self._text(self._prompts(picked, positions, len(halves)))
        noise = paddle.to_tensor(np.stack(noises))
        _, timesteps = training.timesteps_from_density(np.asarray(draws, np.float32), self.noise_scheduler)
        sigmas = self.noise_scheduler.sigmas_for_timesteps(timesteps, n_dim=4)
        noisy = training.add_noise(x0, noise, sigmas)
        with self._autocast():
            pred = self.transformer(noisy, embeds, pooled, timesteps)
        return training.flow_matching_loss(
            pred, x0, noise, noisy, sigmas, weighting, c.precondition_outputs,
            c.with_prior_preservation, c.prior_loss_weight,
        )  # fmt: skip

    def _prompts(self, picked: list[tuple[str, int, Entry]], positions: list[int], halves: int) -> list[str]:
        """The samples' prompts, each replaced by "" with probability caption_dropout (keyed by
        position, so resumed and re-batched runs drop the same ones): the unconditional
        prediction that classifier-free guidance needs."""
        p = self.config.caption_dropout
        keys = [(pos, half) for half in range(halves) for pos in positions]
        return [
            "" if p > 0 and rng_for(self.seed, STREAM_CAPTION, pos, half).random() < p else e.prompt
            for (pos, half), (_, _, e) in zip(keys, picked, strict=True)
        ]

    def _autocast(self):
        import paddle

        if self.weight_dtype == "float32" or not self.on_accelerator:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.weight_dtype, level="O1")

    # -- the optimizer side
    def _setup_optimizer(self) -> None:
        c = self.config
        lr = c.learning_rate
        if c.scale_lr:
            lr = lr * c.gradient_accumulation_steps * c.train_batch_size
        self.optimizer = AdamW(self.params, (c.adam_beta1, c.adam_beta2), c.adam_epsilon, c.adam_weight_decay)
        self.schedule = LRSchedule(
            c.lr_scheduler, lr, c.lr_warmup_steps, self.max_steps, float(c.lr_num_cycles), c.lr_power
        )
        # fp16 needs loss scaling (its range underflows small gradients); bf16 does not.
        self.scaler = LossScaler(enabled=c.mixed_precision == "fp16")

    def optimizer_step(self) -> dict[str, float]:
        """Check, unscale, clip and apply the accumulated gradients: at most one update."""
        inv = self.scaler.unscale_factor()
        norm = global_grad_norm(self.params, inv)
        finite = math.isfinite(norm)
        applied = self.scaler.update(finite)
        lr = self.schedule.lr(self.optimizer.step_count)
        if applied:
            coef = clip_coefficient(norm, self.config.max_grad_norm)
            self.optimizer.step(lr, grad_scale=inv * coef)
        self.optimizer.zero_grad()
        return {"lr": lr, "grad_norm": norm, "applied": float(applied), "loss_scale": self.scaler.scale}

    # -- checkpoints
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
                "data_fingerprint": self.data_fingerprint,
                "dataset_length": self.length,
            },
            "lora": {"rank": c.rank, "alpha": c.lora_alpha, "modules": getattr(self, "lora_modules", None)},
        }

    def _write_weights(self, folder: Path) -> Path:
        from sd3_core import lora_file

        if self.config.mode == "lora":
            return lora_file.save_lora_weights(folder, self.transformer, "default")
        self.transformer.save_pretrained(folder / "transformer", dtype="float32")
        return folder / "transformer"

    def save_checkpoint(self, step: int) -> str:
        from sd3_core.safetensors_io import write_safetensors

        url = join_url(self.output, checkpoints.checkpoint_name(step))
        with tempfile.TemporaryDirectory(prefix="sd3-ckpt-") as tmp:
            folder = Path(tmp)
            self._write_weights(folder)
            write_safetensors(
                folder / checkpoints.OPTIMIZER_NAME,
                self.optimizer.state_tensors(),
                {"format": "sd3-ray-adamw"},
            )
            (folder / checkpoints.STATE_NAME).write_text(
                json.dumps(self._state(step), indent=2, sort_keys=True)
            )
            checkpoints.publish_folder(folder, url, self.storage)
        removed = checkpoints.prune(self.output, self.config.checkpoints_total_limit, self.storage)
        for r in removed:
            log.info("removed old checkpoint %s", r)
        return url

    def load_checkpoint(self, url: str) -> int:
        import paddle

        from sd3_core import lora, lora_file
        from sd3_core.safetensors_io import SafetensorsFile
        from sd3_core.transformer import SD3Transformer2DModel

        state = checkpoints.read_state(url, self.storage)
        want = self._state(0)["order"]
        diff = {k: (state["order"].get(k), v) for k, v in want.items() if state["order"].get(k) != v}
        if state.get("mode") != self.config.mode:
            diff["mode"] = (state.get("mode"), self.config.mode)
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot resume from {url}: the run differs in what the data order and state depend on ({detail}); "
                "resume with the same settings and data, or start a fresh --output_dir"
            )
        local = checkpoints.fetch_folder(url, self.storage)
        if self.config.mode == "lora":
            loaded = lora_file.read_lora_file(local)
            layers = dict(lora.lora_layers(self.transformer))
            if set(loaded.modules) != set(layers):
                raise ValueError(
                    f"{url}: its LoRA modules differ from this run's (--rank/--lora_layers/--lora_blocks changed?)"
                )
            with paddle.no_grad():
                for module, w in loaded.modules.items():
                    layer = layers[module]
                    layer.lora_A["default"].weight.set_value(paddle.to_tensor(np.ascontiguousarray(w.a.T)))
                    layer.lora_B["default"].weight.set_value(paddle.to_tensor(np.ascontiguousarray(w.b.T)))
        else:
            saved = SD3Transformer2DModel.from_pretrained(local, subfolder="transformer", dtype="float32")
            own = dict(self.transformer.named_parameters())
            with paddle.no_grad():
                for name, p in saved.named_parameters():
                    own[name].set_value(p)
        with SafetensorsFile(Path(local) / checkpoints.OPTIMIZER_NAME) as f:
            tensors = {k: f.get(k) for k in f.keys()}
        self.optimizer.load_state(tensors, state["optimizer"])
        self.scaler.load_state_dict(state["loss_scaler"])
        return int(state["global_step"])

    # -- validation
    def validate(self, step: int, tracker, final: bool = False) -> list[str]:
        c = self.config
        images = self.pipe(
            prompt=c.validation_prompt,
            num_images_per_prompt=c.num_validation_images,
            height=c.resolution,
            width=c.resolution,
            num_inference_steps=c.validation_inference_steps,
            guidance_scale=c.validation_guidance_scale,
            seed=self.seed,
            max_sequence_length=c.max_sequence_length,
        ).images
        folder = join_url(self.output, "validation", "final" if final else f"step-{step}")
        urls = []
        for i, image in enumerate(images):
            url = join_url(folder, f"{i}.png")
            save_image(url, image, self.storage)
            urls.append(url)
        tracker.log_images("final" if final else "validation", images, c.validation_prompt, step)
        return urls

    # -- the fixed evaluation used to measure learning
    def evaluation_loss(
        self, entries: list[Entry] | None = None, sigmas=(0.25, 0.5, 0.75), seed: int = 1234
    ) -> float:
        """Loss on ``entries`` (default: the instance images) at fixed sigmas with fixed noise
        (posterior mean, no weighting): the same inputs before and after training, so a drop is learning."""
        import paddle

        from sd3_core import training

        entries = self.instances if entries is None else entries
        vae = self.pipe.vae
        rng = np.random.default_rng(seed)
        losses = []
        with paddle.no_grad():
            pixels = paddle.to_tensor(np.stack([e.pixels for e in entries]))
            mean = vae.encode(pixels.astype(vae.dtype)).mean.astype("float32")
            x0 = (mean - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor
            embeds, pooled = self._text([e.prompt for e in entries])
            for s in sigmas:
                noise = paddle.to_tensor(rng.standard_normal(x0.shape, dtype=np.float32))
                sig = paddle.full([x0.shape[0], 1, 1, 1], s, "float32")
                noisy = training.add_noise(x0, noise, sig)
                t = paddle.full([x0.shape[0]], s * 1000.0, "float32")
                pred = self.transformer(noisy, embeds, pooled, t)
                losses.append(float(training.flow_matching_loss(pred, x0, noise, noisy, sig).loss))
        return float(np.mean(losses))

    # -- outputs
    def _save_outputs(self) -> str:
        with tempfile.TemporaryDirectory(prefix="sd3-out-") as tmp:
            written = self._write_weights(Path(tmp))
            if self.config.mode == "lora":
                url = join_url(self.output, written.name)
                write_bytes_atomic(url, written.read_bytes(), self.storage)
                return url
            url = join_url(self.output, "transformer")
            checkpoints.publish_folder(written, url, self.storage, last="config.json")
            return url

    def setup(self) -> None:
        """Load models and data, build the optimizer (no training)."""
        if getattr(self, "_ready", False):
            return
        from sd3_core.model_cache import local_model_path

        c = self.config
        # Resolved first: a model that cannot be had (e.g. a Hub id not cached offline) writes nothing.
        self.model_path = local_model_path(c.pretrained_model_name_or_path, self.storage)
        check_writable(self.output, self.storage)
        self._load()
        self._load_data()
        per_step = c.train_batch_size * c.gradient_accumulation_steps
        self.max_steps = c.max_train_steps or c.num_train_epochs * math.ceil(self.length / per_step)
        self._setup_optimizer()
        self._ready = True

    def run(self) -> TrainResult:
        c = self.config
        t_start = time.monotonic()
        if c.publish_to is not None:
            from sd3_core.lora_registry import is_published

            if is_published(c.publish_to, c.publish_version, self.storage):
                where = join_url(c.publish_to, c.publish_version)
                log.info("%s is already published; not training again", where)
                return TrainResult(
                    self.output, 0, None, where, [], [], [], 0.0, published=where, skipped="already published"
                )
        self.setup()
        per_step = c.train_batch_size * c.gradient_accumulation_steps
        start, resumed = 0, None
        if c.resume_from_checkpoint:
            resumed = checkpoints.resolve_checkpoint(self.output, c.resume_from_checkpoint, self.storage)
            if resumed is None:
                log.info("no checkpoint in %s yet; starting a new run", self.output)
            else:
                start = self.load_checkpoint(resumed)
                log.info("resumed from %s at step %d", resumed, start)
        log_dir = c.logging_dir or (
            os.path.join(split_url(self.output)[1], "logs")
            if split_url(self.output)[0] == ""
            else os.path.join(tempfile.gettempdir(), "sd3-train-logs")
        )
        from pipelines.training.tracking import Tracker

        tracker = Tracker(
            c.report_to,
            log_dir,
            c.tracker_project_name or f"sd3-dreambooth-{c.mode}",
            self.config.public_dict(),
        )
        history: list[dict[str, float]] = []
        saved: list[str] = []
        validation: list[str] = []
        try:
            for step in range(start, self.max_steps):
                t0 = time.monotonic()
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
                    "epoch": done * per_step / self.length,
                }
                if not c.with_prior_preservation:
                    row.pop("prior_loss")
                history.append(row)
                tracker.log({k: v for k, v in row.items() if k != "step"}, step=done)
                if done % _LOG_EVERY == 0 or done == self.max_steps:
                    log.info("step %d/%d loss %.4f lr %.2e (%.1f samples/s)", done, self.max_steps,
                             row["loss"], row.get("lr", float("nan")), row["samples_per_second"])  # fmt: skip
                if done % c.checkpointing_steps == 0:
                    saved.append(self.save_checkpoint(done))
                epochs_before, epochs_after = (
                    (step * per_step) // self.length,
                    (done * per_step) // self.length,
                )
                if c.validation_prompt and any(
                    e % c.validation_epochs == 0 for e in range(epochs_before + 1, epochs_after + 1)
                ):
                    validation += self.validate(done, tracker)
                if self.on_step_end is not None:
                    self.on_step_end(done)
            weights = self._save_outputs()
            if c.validation_prompt and not c.not_validation_final:
                validation += self.validate(self.max_steps, tracker, final=True)
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
            from sd3_core.lora_registry import publish

            result.published = publish(
                weights, c.publish_to, c.publish_version, self.storage,
                info={"base_model": c.pretrained_model_name_or_path, "global_step": self.max_steps, "rank": c.rank},
            )  # fmt: skip
        return result


def train(config: TrainConfig, on_step_end: Callable[[int], None] | None = None) -> TrainResult:
    """Run one training job in this process."""
    return Trainer(config, on_step_end).run()


# ---- on Ray --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActorSpec:
    """The Ray resources of the training actor: one device of the kind asked for, plus CPUs."""

    device: str = "cpu"
    num_cpus: float = 1.0

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "max_restarts": 0}
        env = {}
        if self.device == "gpu":
            opts["num_gpus"] = 1
        elif self.device == "npu":
            opts["resources"] = {"NPU": 1}
            env.update(NPU_FLAGS)  # must be in the environment before paddle is imported
        if os.environ.get(DEVICE_OVERRIDE_ENV):
            env[DEVICE_OVERRIDE_ENV] = os.environ[DEVICE_OVERRIDE_ENV]
        if env:
            opts["runtime_env"] = {"env_vars": env}
        return opts


class TrainingActor:
    """Holds the device for the run; ``run(config)`` trains and returns ``TrainResult.as_dict()``."""

    def run(self, config: TrainConfig) -> dict[str, Any]:
        import socket

        import paddle
        import ray

        device = select_device(config.device)
        if config.device == "cpu":
            paddle.base.core.set_num_threads(max(1, int(config.num_cpus)))
        result = train(config).as_dict()
        ctx = ray.get_runtime_context()
        result["info"] = {
            "paddle_device": device,
            "node_id": ctx.get_node_id(),
            "host": socket.gethostname(),
            "assigned_resources": ctx.get_assigned_resources(),
            "flags": {k: os.environ.get(k) for k in NPU_FLAGS},
        }
        return result


def run_on_ray(config: TrainConfig, ray_address: str | None = None) -> dict[str, Any]:
    """Train in an actor placed on a node with the requested device; returns the result dict.

    Connects to ``ray_address`` / ``$RAY_ADDRESS`` or starts a private local Ray (stopped after)."""
    import ray

    config.check()
    config.output_dir = normalize_url(config.output_dir)  # the actor does not share our cwd
    for name in (
        "instance_data_dir",
        "dataset",
        "class_data_dir",
        "pretrained_model_name_or_path",
        "logging_dir",
    ):
        value = getattr(config, name)
        if value and (os.path.exists(value) or name != "pretrained_model_name_or_path"):
            setattr(config, name, normalize_url(value))
    started = connect_ray(ray_address)
    try:
        spec = ActorSpec(config.device, config.num_cpus)
        available = ray.cluster_resources()
        need = {"gpu": "GPU", "npu": "NPU"}.get(config.device)
        if need and available.get(need, 0) < 1:
            raise ValueError(
                f"--device {config.device}: the Ray cluster offers no {need} resource "
                f"(cluster resources: {sorted(k for k in available if '.' not in k and not k.startswith('node:'))})"
            )
        actor = ray.remote(TrainingActor).options(**spec.options()).remote()
        try:
            return ray.get(actor.run.remote(config))
        finally:
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
