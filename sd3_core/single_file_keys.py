"""Key mapping between the original Stability single-file layout and diffusers' names.

One place per component, used in both directions: loaders read a file through a
diffusers-named view (:class:`MappedWeights`), the converter writes the original layout from
diffusers tensors (:func:`to_original`). Stability fuses q/k/v into ``attn.qkv`` and orders the
two-chunk adaLN outputs (final layer, and the context stream of the last block) as
(shift, scale), diffusers as (scale, shift); the LDM VAE stores its attention projections as
1x1 convolutions and numbers the decoder's up blocks in reverse; the text encoders keep
transformers' names under a prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sd3_core.safetensors_io import SafetensorsFile

__all__ = [
    "COMPONENT_PREFIXES",
    "KeyMappingError",
    "MappedWeights",
    "Ref",
    "TEXT_ENCODERS",
    "TRANSFORMER",
    "VAE",
    "to_original",
    "transformer_refs",
    "vae_original_refs",
    "vae_refs",
]

TRANSFORMER = "transformer"
VAE = "vae"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: Where each pipeline component lives in an original-layout file.
COMPONENT_PREFIXES = {
    TRANSFORMER: "model.diffusion_model.",
    VAE: "first_stage_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}


class KeyMappingError(ValueError):
    """Diffusers tensors that do not make up whole original-layout tensors."""


@dataclass(frozen=True)
class Ref:
    """Where a diffusers tensor sits in the original file: ``key``, row block ``part`` of ``parts``
    (fused q/k/v), and ``op``: ``"swap"`` (halves exchanged), ``"conv1x1"`` (Linear stored as a
    1x1 convolution) or ``"eye"`` (not stored: the identity of ``key``'s width, for reading only)."""

    key: str
    part: int = 0
    parts: int = 1
    op: str | None = None


def _swap_halves(arr: np.ndarray) -> np.ndarray:
    half = arr.shape[0] // 2
    return np.concatenate([arr[half:], arr[:half]])


def _to_diffusers(ref: Ref, arr: np.ndarray) -> np.ndarray:
    if ref.parts > 1:
        rows = arr.shape[0] // ref.parts
        arr = arr[ref.part * rows : (ref.part + 1) * rows]
    if ref.op == "swap":
        return _swap_halves(arr)
    if ref.op == "conv1x1":
        return arr.reshape(arr.shape[:2])
    if ref.op == "eye":
        return np.eye(arr.shape[1], dtype=arr.dtype)
    return arr


def _diffusers_shape(ref: Ref, shape: tuple[int, ...]) -> tuple[int, ...]:
    if ref.parts > 1:
        return (shape[0] // ref.parts, *shape[1:])
    if ref.op == "eye":
        return (shape[1], shape[1])
    return shape[:2] if ref.op == "conv1x1" else shape


def to_original(
    refs: Mapping[str, Ref], tensors: Mapping[str, np.ndarray], prefix: str
) -> dict[str, np.ndarray]:
    """Diffusers-named ``tensors`` -> original names (``prefix`` + key), fusing split parts."""
    grouped: dict[str, dict[int, np.ndarray]] = {}
    parts: dict[str, int] = {}
    for name, arr in tensors.items():
        ref = refs[name]
        arr = np.asarray(arr)
        if ref.op == "swap":
            arr = _swap_halves(arr)
        elif ref.op == "conv1x1":
            arr = arr.reshape(*arr.shape, 1, 1)
        grouped.setdefault(ref.key, {})[ref.part] = arr
        parts[ref.key] = ref.parts
    out = {}
    for key, pieces in grouped.items():
        if len(pieces) != parts[key]:
            raise KeyMappingError(f"{key}: only parts {sorted(pieces)} of {parts[key]} are present")
        out[prefix + key] = (
            pieces[0] if parts[key] == 1 else np.concatenate([pieces[i] for i in range(parts[key])])
        )
    return out


def transformer_refs(config: Mapping[str, Any]) -> dict[str, Ref]:
    """Every diffusers ``SD3Transformer2DModel`` key of ``config`` -> its place in the original file."""
    refs: dict[str, Ref] = {"pos_embed.pos_embed": Ref("pos_embed")}
    last = int(config["num_layers"]) - 1
    dual = set(config.get("dual_attention_layers") or ())
    for p in ("weight", "bias"):
        refs[f"pos_embed.proj.{p}"] = Ref(f"x_embedder.proj.{p}")
        refs[f"context_embedder.{p}"] = Ref(f"context_embedder.{p}")
        for ours, theirs in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
            refs[f"time_text_embed.{ours}.linear_1.{p}"] = Ref(f"{theirs}.mlp.0.{p}")
            refs[f"time_text_embed.{ours}.linear_2.{p}"] = Ref(f"{theirs}.mlp.2.{p}")
        refs[f"proj_out.{p}"] = Ref(f"final_layer.linear.{p}")
        refs[f"norm_out.linear.{p}"] = Ref(f"final_layer.adaLN_modulation.1.{p}", op="swap")
    for i in range(last + 1):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        streams = [("", x), ("_context", c)] if i < last else [("", x)]
        for p in ("weight", "bias"):
            for j, n in enumerate("qkv"):
                refs[f"{d}attn.to_{n}.{p}"] = Ref(f"{x}attn.qkv.{p}", j, 3)
                refs[f"{d}attn.add_{n}_proj.{p}"] = Ref(f"{c}attn.qkv.{p}", j, 3)
                if i in dual:
                    refs[f"{d}attn2.to_{n}.{p}"] = Ref(f"{x}attn2.qkv.{p}", j, 3)
            refs[f"{d}attn.to_out.0.{p}"] = Ref(f"{x}attn.proj.{p}")
            if i < last:
                refs[f"{d}attn.to_add_out.{p}"] = Ref(f"{c}attn.proj.{p}")
            if i in dual:
                refs[f"{d}attn2.to_out.0.{p}"] = Ref(f"{x}attn2.proj.{p}")
            refs[f"{d}norm1.linear.{p}"] = Ref(f"{x}adaLN_modulation.1.{p}")
            # The last block's context stream is AdaLayerNormContinuous: (shift, scale) upstream.
            refs[f"{d}norm1_context.linear.{p}"] = Ref(
                f"{c}adaLN_modulation.1.{p}", op="swap" if i == last else None
            )
            for suffix, stream in streams:
                refs[f"{d}ff{suffix}.net.0.proj.{p}"] = Ref(f"{stream}mlp.fc1.{p}")
                refs[f"{d}ff{suffix}.net.2.{p}"] = Ref(f"{stream}mlp.fc2.{p}")
        if config.get("qk_norm"):
            for ours, stream, theirs in (
                ("norm_q", x, "ln_q"),
                ("norm_k", x, "ln_k"),
                ("norm_added_q", c, "ln_q"),
                ("norm_added_k", c, "ln_k"),
            ):
                refs[f"{d}attn.{ours}.weight"] = Ref(f"{stream}attn.{theirs}.weight")
            if i in dual:
                refs[f"{d}attn2.norm_q.weight"] = Ref(f"{x}attn2.ln_q.weight")
                refs[f"{d}attn2.norm_k.weight"] = Ref(f"{x}attn2.ln_k.weight")
    return refs


# VAE: (diffusers prefix, LDM prefix) templates. {i}, {j} are copied; the decoder's up blocks
# run in reverse ({u} -> {r} = levels - 1 - u) and the mid resnets count from 1 ({m} -> {m1}).
_VAE_RULES = [
    ("{s}.conv_norm_out.", "{s}.norm_out."),
    ("encoder.down_blocks.{i}.resnets.{j}.", "encoder.down.{i}.block.{j}."),
    ("encoder.down_blocks.{i}.downsamplers.0.", "encoder.down.{i}.downsample."),
    ("decoder.up_blocks.{u}.resnets.{j}.", "decoder.up.{r}.block.{j}."),
    ("decoder.up_blocks.{u}.upsamplers.0.", "decoder.up.{r}.upsample."),
    ("{s}.mid_block.resnets.{m}.", "{s}.mid.block_{m1}."),
    ("{s}.mid_block.attentions.0.group_norm.", "{s}.mid.attn_1.norm."),
    ("{s}.mid_block.attentions.0.to_q.", "{s}.mid.attn_1.q."),
    ("{s}.mid_block.attentions.0.to_k.", "{s}.mid.attn_1.k."),
    ("{s}.mid_block.attentions.0.to_v.", "{s}.mid.attn_1.v."),
    ("{s}.mid_block.attentions.0.to_out.0.", "{s}.mid.attn_1.proj_out."),
]
_VAE_LINEAR = re.compile(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    pattern = pattern.replace(r"\{s\}", r"(?P<s>encoder|decoder)")
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", pattern)
    return re.compile("^" + pattern)


_VAE_COMPILED = [(_template_regex(d), d, _template_regex(o), o) for d, o in _VAE_RULES]


def _vae_rename(key: str, levels: int, to_original: bool) -> str:
    for d_re, d_tpl, o_re, o_tpl in _VAE_COMPILED:
        match = (d_re if to_original else o_re).match(key)
        if not match:
            continue
        v = match.groupdict()
        if "u" in v:
            v["r"] = str(levels - 1 - int(v["u"]))
        if "r" in v and "u" not in v:
            v["u"] = str(levels - 1 - int(v["r"]))
        if "m" in v:
            v["m1"] = str(int(v["m"]) + 1)
        if "m1" in v and "m" not in v:
            v["m"] = str(int(v["m1"]) - 1)
        rest = key[match.end() :]
        if ".block." in o_tpl or "block_" in o_tpl:  # resnets: diffusers conv_shortcut = LDM nin_shortcut
            rest = (
                rest.replace("conv_shortcut", "nin_shortcut")
                if to_original
                else rest.replace("nin_shortcut", "conv_shortcut")
            )
        return (o_tpl if to_original else d_tpl).format(**v) + rest
    return key


def vae_refs(original_keys: list[str], levels: int) -> dict[str, Ref]:
    """Diffusers ``AutoencoderKL`` key -> place in the file, for the LDM keys present (unprefixed)."""
    refs = {}
    for key in original_keys:
        name = _vae_rename(key, levels, to_original=False)
        refs[name] = Ref(key, op="conv1x1" if _VAE_LINEAR.search(name) else None)
    return refs


def vae_original_refs(diffusers_keys: list[str], levels: int) -> dict[str, Ref]:
    """The same mapping, from diffusers keys (for writing a file)."""
    return {
        k: Ref(_vae_rename(k, levels, to_original=True), op="conv1x1" if _VAE_LINEAR.search(k) else None)
        for k in diffusers_keys
    }


# ---------------------------------------------------------------------------------------------
# a diffusers-named view of one component


class MappedWeights(Mapping):
    """Diffusers-named tensors of one component, read lazily from an original-layout file.

    Offers WeightsIndex's read interface (``shape``, ``dtype``, ``get``, ``file_of``), so
    ``load_torch_state`` and the ``from_weights`` constructors take it as they take a folder.
    """

    def __init__(self, file: SafetensorsFile, refs: Mapping[str, Ref], prefix: str):
        self.file, self.prefix = file, prefix
        self.refs = {k: r for k, r in refs.items() if prefix + r.key in file}

    def __getitem__(self, key: str) -> Ref:
        return self.refs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def file_of(self, key: str) -> Path:
        return self.file.path

    def shape(self, key: str) -> tuple[int, ...]:
        ref = self.refs[key]
        return _diffusers_shape(ref, self.file.shape(self.prefix + ref.key))

    def dtype(self, key: str) -> np.dtype:
        return self.file.dtype(self.prefix + self.refs[key].key)

    def get(self, key: str) -> np.ndarray:  # type: ignore[override]
        ref = self.refs[key]
        return _to_diffusers(ref, self.file.get(self.prefix + ref.key))

    def tensors(self) -> dict[str, np.ndarray]:
        return {k: self.get(k) for k in self.refs}
