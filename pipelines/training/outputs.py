"""What a run leaves besides checkpoints: validation images, the trained weights in
``--output_dir``, and the adapter published to a LoRA registry (``--publish_to``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipelines.training.checkpoints import publish_folder
from pipelines.training.config import TrainConfig
from pipelines.training.data import save_image
from pipelines.training.model import TrainModels
from pipelines.training.tracking import Tracker
from sd3_core import lora_registry
from sd3_core.storage import join_url, write_bytes_atomic


def validate(
    config: TrainConfig,
    models: TrainModels,
    output: str,
    seed: int,
    step: int,
    tracker: Tracker,
    final: bool = False,
) -> list[str]:
    """Render the validation prompt with the model as trained so far; store and log the images
    (``OUTPUT/validation/step-<step>/`` or ``final/``); returns their URLs."""
    c = config
    images = models.pipe(
        prompt=c.validation_prompt,
        num_images_per_prompt=c.num_validation_images,
        height=c.resolution,
        width=c.resolution,
        num_inference_steps=c.validation_inference_steps,
        guidance_scale=c.validation_guidance_scale,
        seed=seed,
        max_sequence_length=c.max_sequence_length,
    ).images
    folder = join_url(output, "validation", "final" if final else f"step-{step}")
    urls = []
    for i, image in enumerate(images):
        url = join_url(folder, f"{i}.png")
        save_image(url, image, c.storage)
        urls.append(url)
    tracker.log_images("final" if final else "validation", images, c.validation_prompt, step)
    return urls


def save_weights(models: TrainModels, output: str, config: TrainConfig) -> str:
    """Store the trained weights in ``output`` (the LoRA file, or ``transformer/``); returns the URL."""
    with tempfile.TemporaryDirectory(prefix="sd3-out-") as tmp:
        written = models.write_weights(Path(tmp))
        if models.mode == "lora":
            url = join_url(output, written.name)
            write_bytes_atomic(url, written.read_bytes(), config.storage)
            return url
        url = join_url(output, "transformer")
        publish_folder(written, url, config.storage, last="config.json")
        return url


def published_already(config: TrainConfig) -> str | None:
    """Where ``--publish_to``'s version already is, or None (then the run has to train)."""
    if config.publish_to is None:
        return None
    if lora_registry.is_published(config.publish_to, config.publish_version, config.storage):
        return join_url(config.publish_to, config.publish_version)
    return None


def publish_weights(weights: str, config: TrainConfig, global_step: int) -> str:
    """Publish the trained LoRA file as ``--publish_to``'s ``--publish_version``; returns its URL."""
    c = config
    return lora_registry.publish(
        weights, c.publish_to, c.publish_version, c.storage,
        info={"base_model": c.pretrained_model_name_or_path, "global_step": global_step, "rank": c.rank},
    )  # fmt: skip
