"""The training actor: one training run (pipelines.training) on a Ray node with the device asked for."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import ray

from pipelines.training.config import TrainConfig
from pipelines.training.devices import DEVICE_OVERRIDE_ENV, NPU_FLAGS, select_device
from pipelines.training.trainer import Trainer
from sd3_core import runtime


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
        runtime.configure(threads=config.num_cpus if config.device == "cpu" else None)
        device = select_device(config.device)
        result = Trainer(config).run().as_dict()
        ctx = ray.get_runtime_context()
        result["info"] = {
            "paddle_device": device,
            "node_id": ctx.get_node_id(),
            "host": socket.gethostname(),
            "assigned_resources": ctx.get_assigned_resources(),
            "flags": {k: os.environ.get(k) for k in NPU_FLAGS},
        }
        return result
