"""Experiment tracking for training jobs: wandb, offline unless the user configured otherwise.

``WANDB_MODE`` defaults to ``offline`` (no account, no network): the run lands in
``<dir>/wandb/offline-run-*/`` and can be pushed later with ``wandb sync``. A user who sets
``WANDB_MODE=online`` (and is logged in) gets an online run instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

REPORTERS = ("wandb", "none", "tensorboard", "all")


class Tracker:
    """Logs scalars and images for one training run (a no-op unless ``report_to`` names wandb)."""

    def __init__(
        self,
        report_to: str | None,
        log_dir: str,
        project: str,
        config: Mapping[str, Any],
        name: str | None = None,
    ):
        self.run = None
        self.log_dir = log_dir
        report_to = report_to or "none"
        if report_to not in REPORTERS:
            raise ValueError(f"report_to={report_to!r} is not one of {REPORTERS}")
        if report_to == "tensorboard":
            log.warning(
                "report_to=tensorboard is not supported here; metrics go nowhere (use --report_to wandb)"
            )
        if report_to not in ("wandb", "all"):
            return
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        os.makedirs(log_dir, exist_ok=True)
        self.run = wandb.init(
            project=project, dir=log_dir, config=dict(config), name=name, reinit="create_new"
        )

    @property
    def run_dir(self) -> str | None:
        """The run's own folder (``.../wandb/offline-run-*``), or None without wandb."""
        return os.path.dirname(self.run.dir) if self.run is not None else None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_images(self, key: str, images: Sequence[Any], caption: str, step: int) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log(
            {key: [wandb.Image(im, caption=f"{i}: {caption}") for i, im in enumerate(images)]}, step=step
        )

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
