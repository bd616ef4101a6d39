"""LoRA on the MM-DiT's Linear layers: the layer, injecting it, and the adapter operations.

A :class:`LoRALinear` replaces a targeted ``Linear`` sublayer by name. It adopts the base
layer's own ``weight``/``bias`` parameters, so the model's state-dict names do not change, and
holds each named adapter as ``lora_A.<name>`` (``in -> r``) and ``lora_B.<name>`` (``r -> out``),
which is peft's layout. The output is
``base(x) + sum over active adapters of B(A(x)) * alpha / r * weight``. Files: :mod:`sd3_core.lora_file`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from sd3_core.layers import Linear
from sd3_core.torch_state import numpy_to_tensor

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAError",
    "LoRALinear",
    "bake_lora",
    "delete_adapter",
    "fuse_lora",
    "inject_lora",
    "joint_attention_scale",
    "lora_layers",
    "lora_parameters",
    "random_lora_weights",
    "scaled_adapters",
    "set_adapters",
    "target_module_names",
    "unfuse_lora",
    "unload_lora",
    "wrap_linear",
]


# train_dreambooth_lora_sd3.py's default target_modules (module-name suffixes, peft matching).
DEFAULT_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


class LoRAError(ValueError):
    """A LoRA file or adapter does not fit the model, or an adapter operation is not allowed."""


# ---- the layer ---------------------------------------------------------------------------------


class LoRALinear(Linear):
    """A Linear plus named low-rank adapters; built from (and sharing the parameters of) a base Linear."""

    def __init__(self, base: paddle.nn.Linear):
        paddle.nn.Layer.__init__(self)
        if not isinstance(base, paddle.nn.Linear):
            raise TypeError(f"LoRALinear wraps a paddle Linear, got {type(base).__name__}")
        self._dtype = base._dtype
        self.name = base.name
        self.training = base.training
        self.weight = base.weight  # same Parameter objects: optimizer state, TP slicing, keys all stay
        self.bias = base.bias
        self.base_type = type(base)
        self.lora_A = paddle.nn.LayerDict()
        self.lora_B = paddle.nn.LayerDict()
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}  # alpha / r (alpha / sqrt(r) with rsLoRA)
        self.adapter_weight: dict[str, float] = {}  # the user's scale (set_adapters / load scale)
        self.active: list[str] = []
        self.enabled = True
        self.fused: dict[str, float] = {}  # adapter -> total multiplier that was fused into weight
        self._unfused_weight: paddle.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def add_adapter(
        self, name: str, rank: int, alpha: float | None = None, dtype: str = "float32", rslora: bool = False
    ) -> None:
        """A new adapter ``name``: A ~ N(0, 1/rank) (peft's "gaussian" init), B = 0 (no effect yet)."""
        if name in self.lora_A:
            raise LoRAError(f"adapter {name!r} already exists on this layer")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        a = paddle.nn.Linear(self.in_features, rank, bias_attr=False)
        b = paddle.nn.Linear(rank, self.out_features, bias_attr=False)
        a.to(dtype=dtype)
        b.to(dtype=dtype)
        with paddle.no_grad():
            a.weight.set_value(paddle.normal(0.0, 1.0 / rank, a.weight.shape).astype(dtype))
            b.weight.set_value(paddle.zeros(b.weight.shape, dtype=dtype))
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.alpha[name] = alpha
        self.scaling[name] = alpha / (math.sqrt(rank) if rslora else rank)
        self.adapter_weight[name] = 1.0
        self.active.append(name)

    def rank(self, name: str) -> int:
        return self.lora_A[name].weight.shape[1]

    def delta_weight(self, name: str, multiplier: float) -> paddle.Tensor:
        """``A @ B * scaling * multiplier`` in Paddle layout ``[in, out]``, float32."""
        a = self.lora_A[name].weight.astype("float32")
        b = self.lora_B[name].weight.astype("float32")
        return paddle.matmul(a, b) * (self.scaling[name] * multiplier)

    def effective_weight(self) -> paddle.Tensor:
        """The ``[in, out]`` weight this layer computes with: the (possibly fused) weight plus
        every active, unfused adapter's delta, in float32 (the weight itself without any)."""
        deltas = [
            self.delta_weight(name, self.adapter_weight[name])
            for name in (self.active if self.enabled else ())
            if name not in self.fused
        ]
        if not deltas:
            return self.weight
        return self.weight.astype("float32") + paddle.add_n(deltas)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.base_type.forward(self, x)  # the wrapped class's own math (it only uses weight/bias)
        if not self.enabled:
            return out
        for name in self.active:
            if name in self.fused:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            h = x if x.dtype == a.weight.dtype else x.astype(a.weight.dtype)
            delta = F.linear(F.linear(h, a.weight), b.weight) * (
                self.scaling[name] * self.adapter_weight[name]
            )
            out = out + (delta if delta.dtype == out.dtype else delta.astype(out.dtype))
        return out

    # -- fusing
    @paddle.no_grad()
    def fuse(self, adapter_names: Sequence[str] | None, lora_scale: float, restorable: bool = True) -> None:
        """Add the adapters' deltas to the weight; ``restorable=False`` keeps no pre-fuse copy (the
        caller replaces this layer by its base right after: :func:`bake_lora`)."""
        names = list(self.active if adapter_names is None else adapter_names)
        names = [n for n in names if n in self.lora_A and n not in self.fused]
        if not names:
            return
        if restorable and self._unfused_weight is None:
            # A copy, not a subtraction on unfuse: unfusing then restores the base bit for bit.
            self._unfused_weight = self.weight.detach().clone()
        w = self.weight.astype("float32")
        for name in names:
            mult = self.adapter_weight[name] * lora_scale
            w = w + self.delta_weight(name, mult)
            self.fused[name] = mult
        self.weight.set_value(w.astype(self.weight.dtype))

    @paddle.no_grad()
    def unfuse(self) -> None:
        if self._unfused_weight is not None:
            self.weight.set_value(self._unfused_weight)
        self._unfused_weight = None
        self.fused = {}

    def remove_adapter(self, name: str) -> None:
        if name in self.fused:
            raise LoRAError(f"adapter {name!r} is fused into the weights; unfuse_lora() before deleting it")
        del self.lora_A[name]
        del self.lora_B[name]
        for d in (self.alpha, self.scaling, self.adapter_weight):
            d.pop(name, None)
        if name in self.active:
            self.active.remove(name)

    def to_base(self) -> paddle.nn.Linear:
        """A plain Linear with this layer's (possibly fused) weight and bias parameters."""
        base = Linear.__new__(self.base_type)
        paddle.nn.Layer.__init__(base)
        base._dtype, base.name = self._dtype, self.name
        base.weight, base.bias = self.weight, self.bias
        return base

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.rank(n)}, alpha={self.alpha[n]:g})" for n in self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{adapters}], active={self.active}"


# ---- finding and injecting ---------------------------------------------------------------------


def _matches(name: str, targets: Iterable[str]) -> bool:
    # peft's rule for a list of target_modules: the full name, or a suffix after a dot.
    return any(name == t or name.endswith("." + t) for t in targets)


def _block_of(name: str) -> int | None:
    m = re.match(r"transformer_blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def target_module_names(
    model: paddle.nn.Layer, targets: Sequence[str] = DEFAULT_TARGETS, blocks: Iterable[int] | None = None
) -> list[str]:
    """Names of the Linear sublayers LoRA would wrap (``targets`` as peft's target_modules)."""
    if isinstance(targets, str):
        targets = [targets]
    block_set = None if blocks is None else {int(b) for b in blocks}
    if block_set is not None:
        n_blocks = len(getattr(model, "transformer_blocks", []))
        bad = sorted(b for b in block_set if not 0 <= b < n_blocks)
        if bad:
            raise LoRAError(f"LoRA blocks {bad} are outside the model's transformer_blocks 0..{n_blocks - 1}")
    names = []
    for name, layer in model.named_sublayers():
        if not isinstance(layer, paddle.nn.Linear) or not _matches(name, targets):
            continue
        if block_set is not None and _block_of(name) not in block_set:
            continue
        names.append(name)
    return names


def lora_layers(model: paddle.nn.Layer) -> Iterator[tuple[str, LoRALinear]]:
    for name, layer in model.named_sublayers():
        if isinstance(layer, LoRALinear):
            yield name, layer


def _replace(model: paddle.nn.Layer, name: str, new: paddle.nn.Layer) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model
    for part in parent_name.split(".") if parent_name else []:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    if isinstance(parent, paddle.nn.LayerList) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def wrap_linear(model: paddle.nn.Layer, name: str) -> LoRALinear:
    layer = dict(model.named_sublayers())[name]
    if isinstance(layer, LoRALinear):
        return layer
    wrapped = LoRALinear(layer)
    _replace(model, name, wrapped)
    return wrapped


def inject_lora(
    model: paddle.nn.Layer,
    adapter_name: str = "default",
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    blocks: Iterable[int] | None = None,
    dtype: str = "float32",
) -> list[str]:
    """Add a fresh, trainable adapter (B = 0, so the output is unchanged) to the targeted layers.

    ``alpha`` defaults to ``rank`` (scale 1), as in train_dreambooth_lora_sd3.py. Returns the
    wrapped module names.
    """
    names = target_module_names(model, targets, blocks)
    if not names:
        raise LoRAError(f"no Linear sublayer of {type(model).__name__} matches LoRA targets {list(targets)}")
    for name in names:
        wrap_linear(model, name).add_adapter(adapter_name, rank, alpha, dtype)
    return names


def lora_parameters(model: paddle.nn.Layer, adapter_name: str | None = None) -> list[paddle.Tensor]:
    """The adapters' parameters (all adapters, or one), e.g. for the optimizer."""
    params = []
    for _, layer in lora_layers(model):
        for name in layer.lora_A:
            if adapter_name is None or name == adapter_name:
                params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return params


def adapter_names(model: paddle.nn.Layer) -> list[str]:
    seen: dict[str, None] = {}
    for _, layer in lora_layers(model):
        seen.update(dict.fromkeys(layer.lora_A))
    return list(seen)


def active_adapters(model: paddle.nn.Layer) -> list[str]:
    seen: dict[str, None] = {}
    for _, layer in lora_layers(model):
        seen.update(dict.fromkeys(layer.active))
    return list(seen)


# ---- adapter operations ------------------------------------------------------------------------


def _check_names(model: paddle.nn.Layer, names: Sequence[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LoRAError(f"unknown adapter(s) {unknown}; loaded adapters: {known}")


def set_adapters(
    model: paddle.nn.Layer, names: str | Sequence[str], weights: float | Sequence[float | None] | None = None
) -> None:
    """Make exactly ``names`` active, with per-adapter ``weights`` (default 1.0), as diffusers does."""
    names = [names] if isinstance(names, str) else list(names)
    if not isinstance(weights, (list, tuple)):
        weights = [weights] * len(names)
    if len(weights) != len(names):
        raise LoRAError(f"set_adapters: {len(names)} adapter names but {len(weights)} weights")
    _check_names(model, names)
    weights = [1.0 if w is None else float(w) for w in weights]
    for _, layer in lora_layers(model):
        if layer.fused and any(n in layer.fused for n in names):
            raise LoRAError("set_adapters: adapters are fused into the weights; call unfuse_lora() first")
        for name, w in zip(names, weights, strict=True):
            if name in layer.adapter_weight:
                layer.adapter_weight[name] = w
        layer.active = [n for n in names if n in layer.lora_A]


def joint_attention_scale(joint_attention_kwargs: dict | None) -> float:
    """The LoRA scale diffusers' ``joint_attention_kwargs`` asks for (1.0 without); its other keys
    are refused by name."""
    if joint_attention_kwargs is None:
        return 1.0
    if not isinstance(joint_attention_kwargs, dict):
        raise TypeError(f"joint_attention_kwargs must be a dict, got {type(joint_attention_kwargs).__name__}")
    unknown = sorted(set(joint_attention_kwargs) - {"scale"})
    if unknown:
        raise ValueError(
            f"joint_attention_kwargs keys {unknown} are not supported; only 'scale' (the LoRA scale "
            "of this call) is (IP-Adapters are not supported)"
        )
    scale = joint_attention_kwargs.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"joint_attention_kwargs['scale']={scale!r} must be a finite number")
    return float(scale)


@contextlib.contextmanager
def scaled_adapters(model: paddle.nn.Layer, scale: float) -> Iterator[None]:
    """Every adapter's weight times ``scale`` inside the block, restored after (diffusers'
    ``joint_attention_kwargs={"scale": s}``). Fused adapters are in the weights and keep theirs."""
    if scale == 1.0:  # the common case: no walk over the model's layers
        yield
        return
    layers = [layer for _, layer in lora_layers(model)]
    saved = [dict(layer.adapter_weight) for layer in layers]
    for layer in layers:
        layer.adapter_weight = {name: w * float(scale) for name, w in layer.adapter_weight.items()}
    try:
        yield
    finally:
        for layer, weights in zip(layers, saved, strict=True):
            layer.adapter_weight = weights


def enable_lora(model: paddle.nn.Layer, enabled: bool = True) -> None:
    for _, layer in lora_layers(model):
        layer.enabled = enabled


def fuse_lora(
    model: paddle.nn.Layer, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None
) -> None:
    """Add ``B @ A * scaling * weight * lora_scale`` of the given (default: active) adapters to the
    base weights; their forward contribution then comes from the weights alone."""
    if adapter_names is not None:
        _check_names(model, adapter_names)
    for _, layer in lora_layers(model):
        if layer.enabled:
            layer.fuse(adapter_names, float(lora_scale))


def bake_lora(model: paddle.nn.Layer, lora_scale: float = 1.0) -> None:
    """:func:`fuse_lora` of the active adapters then :func:`unload_lora`, one layer at a time and
    without the pre-fuse copies fuse_lora keeps for an unfuse, so at most one layer's weight is
    held twice (fuse_lora + unload_lora hold every targeted weight twice until the unload)."""
    for module, layer in list(lora_layers(model)):
        if layer.enabled:
            layer.fuse(None, float(lora_scale), restorable=False)
        _replace(model, module, layer.to_base())


def unfuse_lora(model: paddle.nn.Layer) -> None:
    """Restore the exact base weights saved at the first fuse."""
    for _, layer in lora_layers(model):
        layer.unfuse()


def delete_adapter(model: paddle.nn.Layer, name: str) -> None:
    _check_names(model, [name])
    for module, layer in list(lora_layers(model)):
        if name in layer.lora_A:
            layer.remove_adapter(name)
        if not layer.lora_A:
            _replace(model, module, layer.to_base())


def unload_lora(model: paddle.nn.Layer) -> None:
    """Remove every adapter and put plain Linears back. Fused adapters stay in the weights (as in
    diffusers: fuse, then unload, bakes the LoRA in)."""
    for module, layer in list(lora_layers(model)):
        _replace(model, module, layer.to_base())


# ---- deterministic test weights -----------------------------------------------------------------


def random_lora_weights(model: paddle.nn.Layer, adapter_name: str, seed: int, std: float = 0.1) -> None:
    """Overwrite the adapter's A and B with seeded normal values (NumPy, so identical everywhere).

    Layers are visited in name order; each draws A ``[r, in]`` then B ``[out, r]`` in PyTorch
    layout, so the resulting file does not depend on Paddle's RNG.
    """
    rng = np.random.default_rng(seed)
    for _, layer in sorted(lora_layers(model), key=lambda item: item[0]):
        if adapter_name not in layer.lora_A:
            continue
        r = layer.rank(adapter_name)
        a = (rng.standard_normal((r, layer.in_features)) * std).astype(np.float32)
        b = (rng.standard_normal((layer.out_features, r)) * std).astype(np.float32)
        with paddle.no_grad():
            for d, arr in ((layer.lora_A, a), (layer.lora_B, b)):
                w = d[adapter_name].weight
                w.set_value(numpy_to_tensor(np.ascontiguousarray(arr.T), w.dtype))
