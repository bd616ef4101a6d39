"""Flow-matching Euler scheduler (diffusers `FlowMatchEulerDiscreteScheduler`, version 0.42.1).

The schedule is computed in NumPy with exactly the float32/float64 steps diffusers takes, so
`.sigmas` and `.timesteps` are bit-identical to diffusers' tensors; they are exposed as paddle
float32 tensors. Unlike diffusers, `step` keeps no hidden step counter: the step index is
passed in or looked up from the timestep, so one scheduler can serve many concurrent loops.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import paddle

from sd3_core.hub import LoadOptions, model_folder
from sd3_core.model_config import Config
from sd3_core.modeling import DIFFUSERS_VERSION
from sd3_core.outputs import FlowMatchEulerDiscreteSchedulerOutput, component_return

DIFFUSERS_CLASS_NAME = "FlowMatchEulerDiscreteScheduler"

# diffusers' __init__ keywords and their defaults; the config is exactly these keys.
DEFAULT_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}

TimestepLike = float | np.floating | np.ndarray | paddle.Tensor


class FlowMatchEulerDiscreteScheduler:
    """Euler sampler for rectified-flow models: `x_next = x + (sigma_next - sigma) * v`.

    Construct it from diffusers' config keys (see `DEFAULT_CONFIG`). Before `set_timesteps` the
    schedule is the training one (`num_train_timesteps` entries, no final zero), which is what
    `sigmas_for_timesteps` and `scale_noise` use during training.
    """

    config_name = "scheduler_config.json"
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ) -> None:
        config = dict(locals())
        del config["self"]
        self.config = Config(_validated(config))
        n = self.config.num_train_timesteps

        # Same float32 steps as diffusers: linspace in float32, then float32 tensor arithmetic.
        train_t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
        sigmas = train_t / np.float32(n)
        if not self.config.use_dynamic_shifting:
            sigmas = _shift_sigmas(sigmas, self.config.shift)
        self._shift = float(self.config.shift)
        self.num_inference_steps: int | None = None
        self._set_schedule(sigmas, sigmas * np.float32(n))
        # diffusers stores these *after* the shift; set_timesteps shifts them again (bug #13243).
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self._unshifted_sigma_min = float(train_t[-1] / np.float32(n))
        self._unshifted_sigma_max = float(train_t[0] / np.float32(n))

    # ---------------------------------------------------------------- config and files
    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> FlowMatchEulerDiscreteScheduler:
        """Build from a diffusers config dict; `_`-keys are ignored, unknown keys warned about."""
        merged = {**config, **overrides}
        unknown = sorted(k for k in merged if not k.startswith("_") and k not in DEFAULT_CONFIG)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown config keys {unknown} "
                f"(not keyword arguments of diffusers {DIFFUSERS_VERSION})",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in merged.items() if k in DEFAULT_CONFIG})

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> FlowMatchEulerDiscreteScheduler:
        """Load `scheduler_config.json` from a folder or Hub id (or its `subfolder`); `revision=` and
        the other Hub keywords of diffusers apply (``sd3_core.hub``)."""
        where = f"{cls.__name__}.from_pretrained"
        options = LoadOptions.take(kwargs, where)
        if kwargs:
            raise TypeError(f"{where} got unexpected keyword argument(s) {sorted(kwargs)}")
        folder = model_folder(pretrained_model_name_or_path, subfolder, options, [cls.config_name])
        file = os.path.join(folder, cls.config_name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {cls.config_name} in scheduler folder {folder!r}")
        try:
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read scheduler config {file!r}: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(
                f"scheduler config {file!r} must hold a JSON object, got {type(config).__name__}"
            )
        return cls.from_config(config)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `scheduler_config.json` in diffusers' format (readable by diffusers)."""
        os.makedirs(path, exist_ok=True)
        payload = {
            "_class_name": DIFFUSERS_CLASS_NAME,
            "_diffusers_version": DIFFUSERS_VERSION,
            **self.config,
        }
        file = os.path.join(os.fspath(path), self.config_name)
        tmp = file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, file)

    # ---------------------------------------------------------------- schedule
    @property
    def shift(self) -> float:
        """The static shift used by `set_timesteps` (the config value unless `set_shift` changed it)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Change the static shift for later `set_timesteps` calls (like diffusers)."""
        self._shift = _positive_float("shift", shift)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def mu_for_image_seq_len(self, image_seq_len: int) -> float:
        """The resolution-dependent `mu` the SD3 pipeline passes when `use_dynamic_shifting` is on.

        Linear in the number of image tokens, from (`base_image_seq_len`, `base_shift`) to
        (`max_image_seq_len`, `max_shift`) - diffusers' `calculate_shift`.
        """
        c = self.config
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        b = c.base_shift - m * c.base_image_seq_len
        return image_seq_len * m + b

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | np.ndarray | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | np.ndarray | None = None,
        *,
        shift_sigma_range_once: bool = False,
    ) -> None:
        """Compute the inference schedule: `.sigmas` (N + 1 values, final 0) and `.timesteps` (N).

        By default this reproduces diffusers 0.42.1 exactly, including its shifting of the
        already-shifted `sigma_min`/`sigma_max` (diffusers bug #13243); `shift_sigma_range_once`
        starts from the unshifted training range instead, so the shift is applied once.
        Custom `sigmas` (or `timesteps`) are shifted too, as in diffusers.
        """
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError(
                "set_timesteps: `mu` is required because the config sets use_dynamic_shifting=True"
            )
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(
                f"set_timesteps: sigmas ({len(sigmas)} values) and timesteps ({len(timesteps)} values) differ in length"
            )
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise ValueError("set_timesteps: give num_inference_steps, sigmas or timesteps")
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise ValueError(f"set_timesteps: num_inference_steps={num_inference_steps!r} is not an integer")
        if num_inference_steps < 1:
            raise ValueError(f"set_timesteps: num_inference_steps={num_inference_steps} must be at least 1")
        for name, values in (("sigmas", sigmas), ("timesteps", timesteps)):
            if values is not None and len(values) != num_inference_steps:
                raise ValueError(
                    f"set_timesteps: {name} has {len(values)} values but num_inference_steps={num_inference_steps}"
                )
        n_train = c.num_train_timesteps
        self.num_inference_steps = int(num_inference_steps)

        given_t = None if timesteps is None else np.asarray(timesteps).astype(np.float32)
        if sigmas is None:
            if given_t is None:
                hi, lo = (
                    (self._unshifted_sigma_max, self._unshifted_sigma_min)
                    if shift_sigma_range_once
                    else (self.sigma_max, self.sigma_min)
                )
                # float64 from here on, as diffusers' np.linspace is
                s = np.linspace(hi * n_train, lo * n_train, num_inference_steps) / n_train
            else:
                s = given_t / np.float32(n_train)
        else:
            s = np.asarray(sigmas).astype(np.float32)

        if c.use_dynamic_shifting:
            s = _time_shift(c.time_shift_type, float(mu), s)
        else:
            s = _shift_sigmas(s, self._shift)
        if c.shift_terminal:
            s = _stretch_to_terminal(s, c.shift_terminal)
        if c.use_karras_sigmas:
            s = _karras(s, num_inference_steps)
        elif c.use_exponential_sigmas:
            s = _exponential(s, num_inference_steps)
        elif c.use_beta_sigmas:
            s = _beta(s, num_inference_steps)

        s = s.astype(np.float32)
        t = given_t if given_t is not None else s * np.float32(n_train)
        if c.invert_sigmas:
            s = np.float32(1.0) - s
            t = s * np.float32(n_train)
            s = np.concatenate([s, np.ones(1, np.float32)])
        else:
            s = np.concatenate([s, np.zeros(1, np.float32)])
        self._set_schedule(s, t)

    def _set_schedule(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        # NumPy copies serve index lookups without reading tensors back from the device.
        self._sigmas_np = np.ascontiguousarray(sigmas, dtype=np.float32)
        self._timesteps_np = np.ascontiguousarray(timesteps, dtype=np.float32)
        self.sigmas = paddle.to_tensor(self._sigmas_np, dtype="float32")
        self.timesteps = paddle.to_tensor(self._timesteps_np, dtype="float32")

    # ---------------------------------------------------------------- index lookup
    def index_for_timestep(self, timestep: TimestepLike) -> int:
        """Position of `timestep` in `.timesteps` (exact float32 match, like diffusers).

        If the value occurs more than once the second occurrence is used, as diffusers does for
        the first step so that an img2img start does not skip a sigma.
        """
        value = _scalar_timestep(timestep)
        matches = np.flatnonzero(self._timesteps_np == np.float32(value))
        if matches.size == 0:
            raise ValueError(
                f"timestep={value!r} is not in the scheduler's current timesteps "
                f"({self._timesteps_np.size} values from {self._timesteps_np[0]:g} to {self._timesteps_np[-1]:g}); "
                "pass one of `scheduler.timesteps` or give step_index"
            )
        return int(matches[1] if matches.size > 1 else matches[0])

    def _indices_for(self, timesteps: TimestepLike, what: str) -> list[int]:
        values = _timestep_array(timesteps).reshape(-1)
        out = []
        for v in values:
            matches = np.flatnonzero(self._timesteps_np == v)
            if matches.size == 0:
                raise ValueError(
                    f"{what}: timestep {float(v)!r} is not in the scheduler's timesteps "
                    f"({self._timesteps_np.size} values); use values taken from `scheduler.timesteps`"
                )
            out.append(int(matches[1] if matches.size > 1 else matches[0]))
        return out

    # ---------------------------------------------------------------- sampling
    def step(
        self,
        model_output: paddle.Tensor,
        timestep: TimestepLike,
        sample: paddle.Tensor,
        step_index: int | None = None,
        *,
        noise: paddle.Tensor | None = None,
        return_dict: bool = True,
        generator: Any = None,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One Euler step from `timestep` to the next sigma: the new sample, as ``.prev_sample``.

        Pure: `step_index` (the loop position) is used when given, otherwise looked up from
        `timestep`. Math is float32; the result has `model_output`'s dtype. With
        `stochastic_sampling` the step re-noises the predicted x0 with `noise` (drawn with
        paddle.randn when not given). `return_dict` as in diffusers (see ``sd3_core.outputs``);
        diffusers' `generator` is refused: pass `noise`.
        """
        if generator is not None:
            raise ValueError("step: generator= is not supported; pass the re-noising draw as noise=")
        return component_return(
            FlowMatchEulerDiscreteSchedulerOutput(
                self._step(model_output, timestep, sample, step_index, noise)
            ),
            return_dict,
        )

    def _step(
        self,
        model_output: paddle.Tensor,
        timestep: TimestepLike,
        sample: paddle.Tensor,
        step_index: int | None,
        noise: paddle.Tensor | None,
    ) -> paddle.Tensor:
        if _is_integer_timestep(timestep):
            raise ValueError(
                "step: integer timestep given; pass a value from `scheduler.timesteps` "
                "(loop positions go to step_index=)"
            )
        if list(model_output.shape) != list(sample.shape):
            raise ValueError(
                f"step: model_output shape {list(model_output.shape)} differs from sample shape {list(sample.shape)}"
            )
        i = self.index_for_timestep(timestep) if step_index is None else int(step_index)
        if not 0 <= i < self._sigmas_np.size - 1:
            raise ValueError(
                f"step: step_index={i} is outside the schedule (0..{self._sigmas_np.size - 2}); "
                "did you call set_timesteps?"
            )
        sigma = self._sigmas_np[i]
        sigma_next = self._sigmas_np[i + 1]
        x = sample.astype("float32")
        v = model_output.astype("float32")
        if self.config.stochastic_sampling:
            x0 = x - _scalar_tensor(sigma) * v
            if noise is None:
                noise = paddle.randn(x.shape, dtype="float32")
            nxt = _scalar_tensor(sigma_next)
            prev = (_scalar_tensor(np.float32(1.0) - sigma_next)) * x0 + nxt * noise.astype("float32")
        else:
            prev = x + _scalar_tensor(sigma_next - sigma) * v  # float32 difference, as in diffusers
        return prev.astype(model_output.dtype)

    def scale_noise(
        self, sample: paddle.Tensor, timestep: TimestepLike, noise: paddle.Tensor
    ) -> paddle.Tensor:
        """Forward flow-matching process `sigma * noise + (1 - sigma) * sample` (img2img, training).

        `timestep` is one value or one per batch row, each taken from `.timesteps`. Computed in
        float32 and cast to `sample`'s dtype (diffusers computes in the sample dtype; identical
        for float32).
        """
        sigma = self._sigmas_np[self._indices_for(timestep, "scale_noise")]
        shape = [sigma.size] + [1] * (len(sample.shape) - 1)
        s = paddle.to_tensor(sigma.reshape(shape))
        out = s * noise.astype("float32") + (1.0 - s) * sample.astype("float32")
        return out.astype(sample.dtype)

    # ---------------------------------------------------------------- training
    def sigmas_for_timesteps(
        self, timesteps: TimestepLike, n_dim: int = 4, dtype: str | paddle.dtype = "float32"
    ) -> paddle.Tensor:
        """Sigma for each training timestep, shaped `[B, 1, ..., 1]` with `n_dim` axes.

        The lookup `train_dreambooth_sd3.py` does (`get_sigmas`) on a scheduler that never had
        `set_timesteps` called: `timesteps` must be values of `.timesteps`.
        """
        idx = self._indices_for(timesteps, "sigmas_for_timesteps")
        sigma = self._sigmas_np[idx]
        shape = [sigma.size] + [1] * max(n_dim - 1, 0)
        return paddle.to_tensor(sigma.reshape(shape)).astype(dtype)


# -------------------------------------------------------------------- schedule math
def _shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    # Stays in the array's dtype: a Python float is "weak" in NumPy and torch alike.
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _time_shift(kind: str, mu: float, t: np.ndarray) -> np.ndarray:
    # diffusers' time_shift(mu, sigma=1.0, t); 1/0 at t == 0 gives the intended limit 0.
    with np.errstate(divide="ignore"):
        if kind == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
        return mu / (mu + (1 / t - 1) ** 1.0)


def _stretch_to_terminal(t: np.ndarray, shift_terminal: float) -> np.ndarray:
    one_minus_z = 1 - t
    # Scalar math in the array's dtype, as NumPy 2 (diffusers' reference) does it.
    scale = one_minus_z[-1] / t.dtype.type(1 - shift_terminal)
    return 1 - one_minus_z / scale


def _karras(sigmas: np.ndarray, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = float(sigmas[-1]) ** (1 / rho), float(sigmas[0]) ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _exponential(sigmas: np.ndarray, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(float(sigmas[0])), math.log(float(sigmas[-1])), n))


def _beta(sigmas: np.ndarray, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    import scipy.stats  # checked at construction

    lo, hi = float(sigmas[-1]), float(sigmas[0])
    ppf = [scipy.stats.beta.ppf(u, alpha, beta) for u in 1 - np.linspace(0, 1, n)]
    return np.array([lo + p * (hi - lo) for p in ppf])


# -------------------------------------------------------------------- helpers
def _scalar_tensor(value: np.floating) -> paddle.Tensor:
    # A 0-d float32 tensor, so the product is an exact float32 multiply as in torch.
    return paddle.to_tensor(np.float32(value))


def _is_integer_timestep(timestep: Any) -> bool:
    if isinstance(timestep, paddle.Tensor):
        return not paddle.is_floating_point(timestep)
    if isinstance(timestep, np.ndarray):
        return not np.issubdtype(timestep.dtype, np.floating)
    return isinstance(timestep, (int, np.integer))


def _timestep_array(timestep: TimestepLike) -> np.ndarray:
    if isinstance(timestep, paddle.Tensor):
        timestep = timestep.astype("float32").numpy()
    # Comparison against the float32 schedule happens in float32, as torch promotes it.
    return np.asarray(timestep, dtype=np.float64).astype(np.float32)


def _scalar_timestep(timestep: TimestepLike) -> float:
    arr = _timestep_array(timestep)
    if arr.size != 1:
        raise ValueError(f"expected one timestep, got {arr.size} values (shape {list(arr.shape)})")
    return float(arr.reshape(()))


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"scheduler config: {name}={value!r} must be a number")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scheduler config: {name}={value!r} must be a finite number > 0")
    return float(value)


def _validated(config: dict[str, Any]) -> dict[str, Any]:
    n = config["num_train_timesteps"]
    if isinstance(n, float) and n.is_integer():
        n = int(n)  # JSON writers sometimes store 1000.0
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"scheduler config: num_train_timesteps={n!r} must be an integer >= 1")
    config["num_train_timesteps"] = int(n)
    config["shift"] = _positive_float("shift", config["shift"])
    if config["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(
            f"scheduler config: time_shift_type={config['time_shift_type']!r} must be 'exponential' or 'linear'"
        )
    chosen = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if config[k]]
    if len(chosen) > 1:
        raise ValueError(f"scheduler config: only one of {chosen} can be true")
    if config["use_beta_sigmas"]:
        try:
            import scipy.stats  # noqa: F401
        except ImportError as e:
            raise ImportError("scheduler config: use_beta_sigmas=True needs scipy installed") from e
    st = config["shift_terminal"]
    if st is not None and (isinstance(st, bool) or not isinstance(st, (int, float)) or not 0 <= st < 1):
        raise ValueError(f"scheduler config: shift_terminal={st!r} must be null or a number in [0, 1)")
    if config["use_dynamic_shifting"]:
        for key in ("base_shift", "max_shift"):
            if not isinstance(config[key], (int, float)) or isinstance(config[key], bool):
                raise ValueError(
                    f"scheduler config: {key}={config[key]!r} must be a number with use_dynamic_shifting"
                )
    return config
