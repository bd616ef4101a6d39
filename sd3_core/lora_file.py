"""LoRA files in diffusers/peft format: reading, checking, loading into a model, writing.

Files are diffusers' ``pytorch_lora_weights.safetensors``: keys
``transformer.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``
(PyTorch layout), metadata ``{"format": "pt", "lora_adapter_metadata": <peft LoraConfig JSON,
keys prefixed "transformer.">}``. Without that metadata diffusers takes ``alpha = r``.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle

from sd3_core.dtypes import NUMPY_DTYPES, resolve_dtype
from sd3_core.lora import LoRAError, adapter_names, lora_layers, wrap_linear
from sd3_core.safetensors_io import SafetensorsFile, WeightsFileError, write_safetensors
from sd3_core.torch_state import tensor_to_numpy

__all__ = [
    "LORA_WEIGHT_NAME",
    "LoRAFile",
    "check_lora_fits",
    "load_lora",
    "lora_state_dict",
    "read_lora_file",
    "save_lora_weights",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"


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
        # diffusers' best guess: the folder's one weights file (training states aside).
        weights = [n for n in found if not any(w in n for w in ("scheduler", "optimizer", "checkpoint"))]
        if len(weights) == 1:
            return p / weights[0], None
        raise LoRAError(
            f"{p}: no {LORA_WEIGHT_NAME} in this folder and not one other weights file (safetensors "
            f"files: {found or 'none'}); pass weight_name= or the file path"
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
        layer = wrap_linear(model, module)
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
    target = NUMPY_DTYPES[resolve_dtype(dtype)]
    for module, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        for kind, d in (("A", layer.lora_A), ("B", layer.lora_B)):
            arr = tensor_to_numpy(d[adapter_name].weight).T.astype(target)
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
