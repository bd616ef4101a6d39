"""The optimizer side of a training step: AdamW, global-norm clipping, lr schedules, loss scaling.

Written out here rather than taken from ``paddle.optimizer`` so that every piece of state is keyed
by the model's own parameter names (``transformer_blocks.0.attn.to_q.lora_A.default.weight``),
which makes a checkpoint exact to resume in any process (Paddle's optimizer keys its state by
auto-generated tensor names that depend on construction order), and so that the fp16 loss
scaler's one rule is visible: one optimizer update per step, or none when the scaled gradients
overflowed (the PPDiffusers scripts call ``optimizer.step()`` after ``scaler.step()``, a second
update).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import paddle

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


# ---- learning-rate schedules (transformers' get_scheduler, as a pure function of the step) -----


@dataclass(frozen=True)
class LRSchedule:
    """``lr(step)`` of the update with 0-based index ``step``; stateless, so resuming needs only the step."""

    name: str
    base_lr: float
    warmup_steps: int = 0
    total_steps: int = 1
    num_cycles: float = 1.0  # cosine_with_restarts: hard restarts; cosine uses 0.5 (half a wave)
    power: float = 1.0  # polynomial
    lr_end: float = 1e-7  # polynomial

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler={self.name!r} is not one of {LR_SCHEDULERS}")
        if self.warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={self.warmup_steps} must be >= 0")

    def multiplier(self, step: int) -> float:
        w, total = self.warmup_steps, self.total_steps
        if self.name == "constant":
            return 1.0
        if step < w:
            return step / max(1, w)
        if self.name == "constant_with_warmup":
            return 1.0
        progress = (step - w) / max(1, total - w)
        if self.name == "linear":
            return max(0.0, (total - step) / max(1, total - w))
        if self.name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
        if self.name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((self.num_cycles * progress) % 1.0))))
        # polynomial decay to lr_end
        if step > total:
            return self.lr_end / self.base_lr
        decay = (self.base_lr - self.lr_end) * (
            1 - (step - w) / max(1, total - w)
        ) ** self.power + self.lr_end
        return decay / self.base_lr

    def lr(self, step: int) -> float:
        return self.base_lr * self.multiplier(step)


# ---- AdamW -------------------------------------------------------------------------------------


class AdamW:
    """torch.optim.AdamW (decoupled weight decay, bias-corrected moments), float32 state per
    named parameter. ``step(lr, grad_scale)`` multiplies every gradient by ``grad_scale`` first
    (loss-scale inverse times the clipping coefficient), so gradients are never rewritten."""

    def __init__(
        self,
        params: Mapping[str, paddle.Tensor],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-4,
    ) -> None:
        if not params:
            raise ValueError("AdamW got no trainable parameters")
        self.params = dict(params)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.step_count = 0  # updates applied (the bias correction's t)
        self.exp_avg = {n: paddle.zeros(p.shape, "float32") for n, p in self.params.items()}
        self.exp_avg_sq = {n: paddle.zeros(p.shape, "float32") for n, p in self.params.items()}

    @paddle.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.beta1, self.beta2
        bias1, bias2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
        for name, p in self.params.items():
            if p.grad is None:
                continue
            g = p.grad.astype("float32") * grad_scale
            m = self.exp_avg[name] * b1 + g * (1 - b1)
            v = self.exp_avg_sq[name] * b2 + g * g * (1 - b2)
            self.exp_avg[name], self.exp_avg_sq[name] = m, v
            w = p.astype("float32") * (1 - lr * self.weight_decay)
            w = w - (lr / bias1) * m / (paddle.sqrt(v) / bias2_sqrt + self.eps)
            p.set_value(w.astype(p.dtype))

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.clear_gradient(False)

    def state_tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for name in self.params:
            out[f"{name}.exp_avg"] = self.exp_avg[name].numpy()
            out[f"{name}.exp_avg_sq"] = self.exp_avg_sq[name].numpy()
        return out

    def state_json(self) -> dict:
        return {
            "type": "AdamW",
            "step_count": self.step_count,
            "betas": [self.beta1, self.beta2],
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    def load_state(self, tensors: Mapping[str, np.ndarray], state: Mapping) -> None:
        missing = [
            n for n in self.params if f"{n}.exp_avg" not in tensors or f"{n}.exp_avg_sq" not in tensors
        ]
        if missing:
            raise ValueError(
                f"optimizer state has no moments for {len(missing)} trainable parameters (e.g. {missing[:3]}); "
                "the checkpoint was written for a different model or LoRA configuration"
            )
        for name, p in self.params.items():
            for kind, store in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                arr = np.asarray(tensors[f"{name}.{kind}"], dtype=np.float32)
                if list(arr.shape) != list(p.shape):
                    raise ValueError(
                        f"optimizer state {name}.{kind} has shape {list(arr.shape)}, parameter {list(p.shape)}"
                    )
                store[name] = paddle.to_tensor(arr)
        self.step_count = int(state["step_count"])


@paddle.no_grad()
def global_grad_norm(params: Mapping[str, paddle.Tensor], grad_scale: float = 1.0) -> float:
    """The L2 norm of all gradients (times ``grad_scale``), float32 accumulation; inf/nan pass through."""
    total = paddle.zeros([], "float32")
    for p in params.values():
        if p.grad is not None:
            g = p.grad.astype("float32")
            total = total + (g * g).sum()
    return float(paddle.sqrt(total)) * grad_scale


def clip_coefficient(total_norm: float, max_norm: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: ``min(1, max_norm / (norm + 1e-6))``."""
    if max_norm is None or max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


# ---- dynamic loss scaling (fp16) ---------------------------------------------------------------


@dataclass
class LossScaler:
    """torch.amp.GradScaler's dynamic rule. Disabled (scale 1, never skips) unless ``enabled``.

    Per step: backward on ``loss * scale``; then :meth:`unscale_factor` gives ``1/scale``;
    :meth:`update` with whether the gradients were finite: a non-finite step is skipped (no
    optimizer update) and the scale backs off; ``growth_interval`` finite steps in a row double it.
    """

    enabled: bool = False
    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    growth_tracker: int = 0
    skipped_steps: int = 0

    def scale_loss(self, loss: paddle.Tensor) -> paddle.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_factor(self) -> float:
        return 1.0 / self.scale if self.enabled else 1.0

    def update(self, finite: bool) -> bool:
        """Record the step's outcome; True when the optimizer update should be applied."""
        if not self.enabled:
            return True
        if not finite:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped_steps += 1
            return False
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0
        return True

    def state_dict(self) -> dict:
        return {
            "enabled": self.enabled,
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
