"""LoRA on the MM-DiT's Linear layers, and LoRA files in diffusers/peft format.

A :class:`LoRALinear` replaces a targeted ``Linear`` sublayer by name. It adopts the base
layer's own ``weight``/``bias`` parameters, so the model's state-dict names do not change, and
holds each named adapter as ``lora_A.<name>`` (``in -> r``) and ``lora_B.<name>`` (``r -> out``),
which is peft's layout. The output is
``base(x) + sum over active adapters of B(A(x)) * alpha / r * weight``.

Files are diffusers' ``pytorch_lora_weights.safetensors``: keys
``transformer.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``
(PyTorch layout), metadata ``{"format": "pt", "lora_adapter_metadata": <peft LoraConfig JSON,
keys prefixed "transformer.">}``. Without that metadata diffusers takes ``alpha = r``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F

from sd3_core import runtime  # noqa: F401  (paddle settings; sd3_core/__init__ already ran it)
from sd3_core.modeling import _NUMPY_DTYPE, Linear, _numpy_to_tensor, _tensor_to_numpy, resolve_dtype
from sd3_core.safetensors_io import SafetensorsFile, WeightsFileError, write_safetensors

__all__ = [
    "DEFAULT_TARGETS",
    "LORA_WEIGHT_NAME",
    "LoRAError",
    "LoRAFile",
    "LoRALinear",
    "bake_lora",
    "check_lora_fits",
    "delete_adapter",
    "fuse_lora",
    "inject_lora",
    "load_lora",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "random_lora_weights",
    "read_lora_file",
    "save_lora_weights",
    "set_adapters",
    "target_module_names",
    "unfuse_lora",
    "unload_lora",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"

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


def _wrap(model: paddle.nn.Layer, name: str) -> LoRALinear:
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
        _wrap(model, name).add_adapter(adapter_name, rank, alpha, dtype)
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


# ---- files -------------------------------------------------------------------------------------


@dataclass
class LoRAModule:
    a: np.ndarray  # [r, in], PyTorch layout
    b: np.ndarray  # [out, r]
    alpha: float
    rslora: bool = False

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAFile:
    """A LoRA file resolved to module names of the transformer (no prefix)."""

    source: str
    modules: dict[str, LoRAModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight"  # peft/diffusers (adapter name in raw peft dicts)
    r"|lora[._](?P<ud>down|up)\.weight"  # old diffusers attention-processor names
    r"|(?P<alpha>alpha)"  # kohya-style per-module alpha
    r")$"
)
_OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "unet.", "lora_te", "lora_unet")


def _resolve_path(path: str | os.PathLike, weight_name: str | None) -> tuple[Path, dict | None]:
    """A file, or a folder with pytorch_lora_weights.safetensors (or peft's adapter files)."""
    p = Path(path)
    if p.is_dir():
        if weight_name is not None:
            return p / weight_name, None
        if (p / LORA_WEIGHT_NAME).is_file():
            return p / LORA_WEIGHT_NAME, None
        if (p / "adapter_model.safetensors").is_file():
            config = p / "adapter_config.json"
            cfg = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
            return p / "adapter_model.safetensors", cfg
        found = sorted(q.name for q in p.glob("*.safetensors"))
        raise LoRAError(
            f"{p}: no {LORA_WEIGHT_NAME} in this folder (safetensors files: {found or 'none'}); "
            "pass weight_name= or the file path"
        )
    return p, None


def _strip_prefix(keys: list[str], source: str) -> tuple[dict[str, str], bool]:
    """Map file keys to transformer-relative keys; True when the file used the transformer prefix."""
    others = sorted(k for k in keys if k.startswith(_OTHER_COMPONENTS))
    if others:
        raise LoRAError(
            f"{source}: holds LoRA weights for components other than the transformer "
            f"({len(others)} keys, e.g. {others[:3]}); only transformer LoRA is supported"
        )
    out, prefixed = {}, False
    for k in keys:
        rel = k
        for prefix in ("base_model.model.", f"{PREFIX}."):
            if rel.startswith(prefix):
                rel = rel[len(prefix) :]
                prefixed = prefixed or prefix == f"{PREFIX}."
        out[k] = rel
    return out, prefixed


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    # peft's get_pattern_key: the first pattern matching the full name or a dotted suffix wins.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return float(default)


def _adapter_config(metadata: Mapping[str, str], peft_config: dict | None, source: str) -> dict | None:
    if peft_config is not None:
        return peft_config
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAError(f"{source}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(packed, dict):
        raise LoRAError(f"{source}: metadata {METADATA_KEY!r} is not a JSON object")
    # diffusers packs each component's LoraConfig under "<component>.<field>".
    config = {k[len(PREFIX) + 1 :]: v for k, v in packed.items() if k.startswith(f"{PREFIX}.")}
    if not config and packed and not any("." in k for k in packed):
        config = packed  # an unpacked LoraConfig dict
    return config or None


def read_lora_file(path: str | os.PathLike, weight_name: str | None = None) -> LoRAFile:
    """Read a diffusers/peft LoRA safetensors file (or folder) for the SD3 transformer.

    Accepts keys with or without the ``transformer.`` (or peft's ``base_model.model.``) prefix,
    ``lora_A``/``lora_B`` with or without an adapter name (``lora_A.default.weight``), old
    ``lora.down``/``lora.up`` names, per-module ``.alpha`` entries, and alpha from diffusers'
    ``lora_adapter_metadata`` (peft LoraConfig: ``lora_alpha``, ``alpha_pattern``,
    ``use_rslora``). Without either, alpha = rank (diffusers' rule).
    """
    file, peft_config = _resolve_path(path, weight_name)
    source = str(file)
    try:
        sf = SafetensorsFile(file)
    except WeightsFileError as e:
        raise LoRAError(str(e)) from None
    with sf:
        keys = sf.keys()
        if not keys:
            raise LoRAError(f"{source}: the file holds no tensors")
        rel, _ = _strip_prefix(keys, source)
        parts: dict[str, dict[str, str]] = collections.defaultdict(dict)
        unknown, unsupported, adapters = [], [], set()
        for key in keys:
            if "dora_scale" in key or "lora_magnitude_vector" in key or key.endswith("lora_B.bias"):
                unsupported.append(key)
                continue
            m = _KEY_RE.match(rel[key])
            if not m:
                unknown.append(key)
                continue
            kind = "alpha" if m["alpha"] else (m["ab"] or {"down": "A", "up": "B"}[m["ud"]])
            if m["adapter"]:
                adapters.add(m["adapter"])
            if kind in parts[m["module"]]:
                raise LoRAError(
                    f"{source}: two tensors for {m['module']} lora_{kind}: "
                    f"{parts[m['module']][kind]!r} and {key!r}"
                )
            parts[m["module"]][kind] = key
        if unsupported:
            raise LoRAError(
                f"{source}: DoRA / LoRA-bias tensors are not supported ({len(unsupported)} keys, "
                f"e.g. {unsupported[:3]})"
            )
        if unknown:
            raise LoRAError(
                f"{source}: keys that are not LoRA weights ({len(unknown)}): {sorted(unknown)[:5]}"
            )
        if len(adapters) > 1:
            raise LoRAError(
                f"{source}: holds several peft adapters {sorted(adapters)}; save one adapter per file"
            )

        config = _adapter_config(sf.metadata, peft_config, source)
        if config is not None and (config.get("use_dora") or config.get("lora_bias")):
            raise LoRAError(f"{source}: the adapter config uses DoRA or lora_bias, which are not supported")
        out = LoRAFile(source, metadata=dict(sf.metadata))
        problems = []
        for module, kinds in sorted(parts.items()):
            if "A" not in kinds or "B" not in kinds:
                have = sorted(kinds.values())
                problems.append(f"{module}: needs lora_A and lora_B, has {have}")
                continue
            a = np.asarray(sf.get(kinds["A"]), dtype=np.float32)
            b = np.asarray(sf.get(kinds["B"]), dtype=np.float32)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                problems.append(
                    f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not [r, in] and [out, r]"
                )
                continue
            rank = a.shape[0]
            rslora = False
            if config is not None:
                cfg_rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
                if int(cfg_rank) != rank:
                    problems.append(f"{module}: metadata rank {int(cfg_rank)} but lora_A has rank {rank}")
                    continue
                alpha = _pattern_value(
                    config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)
                )
                rslora = bool(config.get("use_rslora", False))
            elif "alpha" in kinds:
                alpha = float(np.asarray(sf.get(kinds["alpha"]), dtype=np.float64).reshape(-1)[0])
            else:
                alpha = float(rank)
            out.modules[module] = LoRAModule(np.array(a), np.array(b), alpha, rslora)
        if problems:
            raise LoRAError(f"{source}: malformed LoRA weights ({len(problems)}): " + "; ".join(problems[:5]))
    return out


def check_lora_fits(model: paddle.nn.Layer, lora: LoRAFile) -> None:
    """LoRAError unless every module of ``lora`` is a Linear of ``model`` with matching features.

    Reads only shapes, so ``model`` may be built under ``paddle.LazyGuard`` (no weights)."""
    sublayers = dict(model.named_sublayers())
    problems = []
    for module, w in lora.modules.items():
        layer = sublayers.get(module)
        if not isinstance(layer, paddle.nn.Linear):
            what = "no such sublayer" if layer is None else f"a {type(layer).__name__}, not a Linear"
            problems.append(f"{module}: {what}")
            continue
        in_f, out_f = layer.weight.shape
        if w.a.shape[1] != in_f or w.b.shape[0] != out_f:
            problems.append(
                f"{module}: lora_A {list(w.a.shape)} / lora_B {list(w.b.shape)} do not fit a Linear "
                f"{in_f} -> {out_f} (expected [r, {in_f}] / [{out_f}, r])"
            )
    if problems:
        raise LoRAError(
            f"{lora.source}: LoRA does not match {type(model).__name__} ({len(problems)} modules): "
            + "; ".join(problems[:5])
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        )
    if not lora.modules:
        raise LoRAError(f"{lora.source}: no transformer LoRA modules found")


def load_lora(
    model: paddle.nn.Layer,
    lora: str | os.PathLike | LoRAFile,
    adapter_name: str | None = None,
    scale: float = 1.0,
    weight_name: str | None = None,
) -> str:
    """Load a LoRA file into ``model`` as adapter ``adapter_name`` (default ``default_<n>``) with
    weight ``scale``. As in diffusers, the new adapter becomes the only active one (combine
    several with :func:`set_adapters`). Returns the adapter name."""
    lora = lora if isinstance(lora, LoRAFile) else read_lora_file(lora, weight_name)
    local = getattr(model, "local_lora", None)
    if local is not None:  # a tensor-parallel shard keeps its slices (sd3_core.tensor_parallel)
        lora = local(lora)
    if adapter_name is None:
        adapter_name = f"default_{len(adapter_names(model))}"
    if adapter_name in adapter_names(model):
        raise LoRAError(f"{lora.source}: adapter name {adapter_name!r} is already loaded; pick another")
    check_lora_fits(model, lora)
    for module, w in lora.modules.items():
        layer = _wrap(model, module)
        layer.add_adapter(adapter_name, w.rank, w.alpha, rslora=w.rslora)
        with paddle.no_grad():
            layer.lora_A[adapter_name].weight.set_value(paddle.to_tensor(np.ascontiguousarray(w.a.T)))
            layer.lora_B[adapter_name].weight.set_value(paddle.to_tensor(np.ascontiguousarray(w.b.T)))
        layer.adapter_weight[adapter_name] = float(scale)
    for _, layer in lora_layers(model):
        layer.active = [adapter_name] if adapter_name in layer.lora_A else []
    return adapter_name


def lora_state_dict(
    model: paddle.nn.Layer, adapter_name: str = "default", dtype: str = "float32"
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, int]]:
    """``(tensors, alphas, ranks)``: the adapter's weights under diffusers' file keys, PyTorch layout."""
    if hasattr(model, "local_lora"):
        raise LoRAError(
            f"{type(model).__name__} holds only its slices of each adapter; save the adapter from "
            "the whole transformer (StableDiffusion3Pipeline)"
        )
    tensors, alphas, ranks = {}, {}, {}
    target = _NUMPY_DTYPE[resolve_dtype(dtype)]
    for module, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        for kind, d in (("A", layer.lora_A), ("B", layer.lora_B)):
            arr = _tensor_to_numpy(d[adapter_name].weight).T.astype(target)
            tensors[f"{PREFIX}.{module}.lora_{kind}.weight"] = np.ascontiguousarray(arr)
        alphas[module] = layer.alpha[adapter_name]
        ranks[module] = layer.rank(adapter_name)
    if not tensors:
        raise LoRAError(f"no adapter named {adapter_name!r} in {type(model).__name__}")
    return tensors, alphas, ranks


def _most_common_with_pattern(values: dict[str, float]) -> tuple[float, dict[str, float]]:
    common = collections.Counter(values.values()).most_common(1)[0][0]
    return common, {f"^{re.escape(m)}": v for m, v in sorted(values.items()) if v != common}


def save_lora_weights(
    save_directory: str | os.PathLike,
    model: paddle.nn.Layer,
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME,
    dtype: str = "float32",
) -> Path:
    """Write ``save_directory/pytorch_lora_weights.safetensors`` readable by diffusers'
    ``load_lora_weights``: diffusers keys, PyTorch layout, and the adapter config as diffusers
    packs it (so an alpha other than the rank survives). Deterministic bytes."""
    tensors, alphas, ranks = lora_state_dict(model, adapter_name, dtype)
    r, rank_pattern = _most_common_with_pattern({m: int(v) for m, v in ranks.items()})
    alpha, alpha_pattern = _most_common_with_pattern(alphas)
    config = {
        "r": int(r),
        "lora_alpha": _json_number(alpha),
        "target_modules": sorted(alphas),
        "rank_pattern": {k: int(v) for k, v in rank_pattern.items()},
        "alpha_pattern": {k: _json_number(v) for k, v in alpha_pattern.items()},
    }
    packed = {f"{PREFIX}.{k}": v for k, v in config.items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    path = Path(save_directory) / weight_name
    write_safetensors(path, tensors, metadata)
    return path


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


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
                w.set_value(_numpy_to_tensor(np.ascontiguousarray(arr.T), w.dtype))
