"""The models of a training run: the pipeline whose transformer is trained (all of it, or LoRA
layers injected into it), the frozen rest, and the trained weights' files."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from pipelines.stable_diffusion_3 import StableDiffusion3Pipeline
from pipelines.training.config import MIXED_PRECISION, TrainConfig
from pipelines.training.data import STREAM_LORA_INIT, rng_for
from sd3_core import lora, lora_file
from sd3_core.scheduler import FlowMatchEulerDiscreteScheduler
from sd3_core.transformer import SD3Transformer2DModel

log = logging.getLogger(__name__)

ADAPTER = "default"  # the name of the adapter a LoRA run trains


@dataclass
class TrainModels:
    """The loaded pipeline and what a training step needs of it."""

    pipe: StableDiffusion3Pipeline
    transformer: SD3Transformer2DModel  # pipe.transformer, the trained model
    noise_scheduler: FlowMatchEulerDiscreteScheduler
    params: dict[str, paddle.Tensor]  # the trained parameters, by name
    mode: str  # "lora" or "full"
    weight_dtype: str  # of the frozen parts (mixed precision)
    on_accelerator: bool
    lora_modules: list[str] | None = None  # the LoRA-wrapped module names

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision autocast for the forward pass (on accelerators; Paddle's CPU kernels
        have no half precision)."""
        if self.weight_dtype == "float32" or not self.on_accelerator:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.weight_dtype, level="O1")

    def write_weights(self, folder: Path) -> Path:
        """Write the trained weights into ``folder``: diffusers' LoRA file, or ``transformer/``."""
        if self.mode == "lora":
            return lora_file.save_lora_weights(folder, self.transformer, ADAPTER)
        self.transformer.save_pretrained(folder / "transformer", dtype="float32")
        return folder / "transformer"

    def load_weights(self, local: str, source: str) -> None:
        """Set the trained weights from what :meth:`write_weights` wrote into the folder ``local``
        (fetched from ``source``, named in errors)."""
        if self.mode == "lora":
            loaded = lora_file.read_lora_file(local)
            layers = dict(lora.lora_layers(self.transformer))
            if set(loaded.modules) != set(layers):
                raise ValueError(
                    f"{source}: its LoRA modules differ from this run's (--rank/--lora_layers/--lora_blocks changed?)"
                )
            with paddle.no_grad():
                for module, w in loaded.modules.items():
                    layer = layers[module]
                    layer.lora_A[ADAPTER].weight.set_value(paddle.to_tensor(np.ascontiguousarray(w.a.T)))
                    layer.lora_B[ADAPTER].weight.set_value(paddle.to_tensor(np.ascontiguousarray(w.b.T)))
        else:
            saved = SD3Transformer2DModel.from_pretrained(local, subfolder="transformer", dtype="float32")
            own = dict(self.transformer.named_parameters())
            with paddle.no_grad():
                for name, p in saved.named_parameters():
                    own[name].set_value(p)


def load_models(config: TrainConfig, model_path: str, seed: int) -> TrainModels:
    """Load the pipeline from ``model_path`` and make its transformer (or its LoRA layers) the
    only trainable part. Sets ``config.max_sequence_length`` to the model folder's when None."""
    c = config
    paddle.seed(seed)
    weight_dtype = MIXED_PRECISION[c.mixed_precision]
    on_accelerator = not paddle.get_device().startswith("cpu")
    if weight_dtype != "float32" and not on_accelerator:
        log.warning(
            "mixed_precision=%s on CPU: Paddle has no half-precision CPU kernels, so autocast does nothing "
            "there (the loss scaler and half-precision frozen weights still apply)",
            c.mixed_precision,
        )
    # The trained weights stay float32 (master weights); frozen parts use the mixed-precision dtype.
    transformer_dtype = "float32" if c.mode == "full" else weight_dtype
    transformer = SD3Transformer2DModel.from_pretrained(
        model_path, subfolder="transformer", dtype=transformer_dtype
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(model_path, dtype=weight_dtype, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    # train at the length the model is sampled at
    _, c.max_sequence_length = pipe.folder_defaults(max_sequence_length=c.max_sequence_length)
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_path, subfolder="scheduler")
    for component in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if component is not None:
            for p in component.parameters():
                p.stop_gradient = True
    lora_modules = None
    if c.mode == "lora":
        for p in transformer.parameters():
            p.stop_gradient = True
        targets = _csv(c.lora_layers) or lora.DEFAULT_TARGETS
        blocks = [int(b) for b in _csv(c.lora_blocks)] if c.lora_blocks else None
        lora_modules = lora.inject_lora(
            transformer, ADAPTER, c.rank, c.lora_alpha, targets, blocks, dtype="float32"
        )
        init_lora_deterministically(transformer, seed)
        for p in lora.lora_parameters(transformer, ADAPTER):
            p.stop_gradient = False
    else:
        for p in transformer.parameters():
            p.stop_gradient = False
    transformer.train()
    if c.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = {n: p for n, p in transformer.named_parameters() if not p.stop_gradient}
    return TrainModels(
        pipe, transformer, noise_scheduler, params, c.mode, weight_dtype, on_accelerator, lora_modules
    )


def init_lora_deterministically(model: paddle.nn.Layer, seed: int, adapter: str = ADAPTER) -> None:
    """peft's "gaussian" init (A ~ N(0, 1/r), B = 0) from a NumPy generator: the same everywhere."""
    rng = rng_for(seed, STREAM_LORA_INIT)
    for _, layer in sorted(lora.lora_layers(model), key=lambda item: item[0]):
        a = layer.lora_A[adapter].weight
        values = rng.standard_normal(a.shape).astype(np.float32) / layer.rank(adapter)
        with paddle.no_grad():
            a.set_value(paddle.to_tensor(values).astype(a.dtype))
            b = layer.lora_B[adapter].weight
            b.set_value(paddle.zeros(b.shape, b.dtype))


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
