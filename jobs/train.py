"""The fine-tuning job (`sd3 train`): one training run in this process, or in a Ray actor placed
on a node with the device asked for. The training itself is pipelines.training."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray

from actors.training_actor import ActorSpec, TrainingActor
from jobs.ray_session import connect_ray
from pipelines.training.config import TrainConfig
from pipelines.training.trainer import Trainer, TrainResult
from sd3_core.storage import normalize_url


def train(config: TrainConfig, on_step_end: Callable[[int], None] | None = None) -> TrainResult:
    """Run one training job in this process."""
    return Trainer(config, on_step_end).run()


def run_on_ray(config: TrainConfig, ray_address: str | None = None) -> dict[str, Any]:
    """Train in an actor placed on a node with the requested device; returns the result dict.

    Connects to ``ray_address`` / ``$RAY_ADDRESS`` or starts a private local Ray (stopped after)."""
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
