"""Single-file SD3 checkpoints in the original Stability layout (as ComfyUI users keep them).

One ``.safetensors`` holds the MM-DiT under ``model.diffusion_model.`` (or bare ``joint_blocks...``),
optionally the VAE under ``first_stage_model.`` (LDM names) and the text encoders under
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (transformers names; T5 possibly fp8).

The key mapping to diffusers' names lives here, once per component, and serves both directions:
the loaders read a file through a diffusers-named view (:class:`MappedWeights`), and
:func:`write_single_file` writes the original layout from a diffusers folder. Stability fuses
q/k/v into ``attn.qkv`` and orders the two-chunk adaLN outputs (final layer, and the context
stream of the last block) as (shift, scale), diffusers as (scale, shift); the LDM VAE stores its
attention projections as 1x1 convolutions and numbers the decoder's up blocks in reverse.

Configs are read from the keys and shapes (layers, width, heads from the qk-norm width, dual
attention blocks, patch, pos-embed grid, ...). What no key records (the head width of models
without qk-norm, VAE group count and latent scaling, text encoder configs) comes from, in order:
a ``config=`` diffusers folder, the file's own metadata (written by :func:`write_single_file`),
the published SD3 values.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from sd3_core.folder_defaults import GUIDANCE_SCALE_KEY, MAX_SEQUENCE_LENGTH_KEY
from sd3_core.modeling import DIFFUSERS_VERSION, WeightLoadError, read_json_object, resolve_dtype
from sd3_core.safetensors_io import (
    FLOAT8_DTYPES,
    SafetensorsFile,
    WeightsFileError,
    open_weights,
    write_safetensors,
)

__all__ = [
    "COMPONENT_PREFIXES",
    "Checkpoint",
    "MappedWeights",
    "SD3_SCHEDULER_CONFIG",
    "SingleFileError",
    "component_config_file",
    "load_model",
    "open_checkpoint",
    "write_diffusers_folder",
    "write_single_file",
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
_WEIGHTS_NAMES = {
    TRANSFORMER: "diffusion_pytorch_model.safetensors",
    VAE: "diffusion_pytorch_model.safetensors",
    **dict.fromkeys(TEXT_ENCODERS, "model.safetensors"),
}
_T5_TIED = "encoder.embed_tokens.weight"  # T5's token table, tied to shared.weight
_METADATA_CONFIG = "sd3_ray.config.{}"  # metadata key holding a component's diffusers config (JSON)
_SUPPORTED = (
    "supported: SD3 / SD3.5 single files in the original Stability layout "
    "(model.diffusion_model.joint_blocks.N..., first_stage_model.*, "
    "text_encoders.clip_l/clip_g/t5xxl.*)"
)

# What no key of a published file records, as the published SD3 / SD3.5 configs have it.
_TRANSFORMER_DEFAULTS = {"attention_head_dim": 64, "sample_size": 128}
_VAE_DEFAULTS = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "sample_size": 1024,
    "force_upcast": True,
    "latents_mean": None,
    "latents_std": None,
}
#: The scheduler of every published SD3 / SD3.5 (used when no config folder gives one).
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}


class SingleFileError(ValueError):
    """A single file is not an SD3 checkpoint, or lacks what the call needs."""


# ---------------------------------------------------------------------------------------------
# key mapping


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


def _to_original(
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
            raise SingleFileError(f"{key}: only parts {sorted(pieces)} of {parts[key]} are present")
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


# ---------------------------------------------------------------------------------------------
# the checkpoint


def _other_model(keys: list[str]) -> str:
    """What a non-SD3 key set looks like."""
    has = lambda part: any(part in k for k in keys)  # noqa: E731
    if has("model.diffusion_model.input_blocks."):
        kind = "an SDXL" if has("conditioner.embedders.") else "a Stable Diffusion 1.x/2.x"
        return f"{kind} UNet checkpoint (model.diffusion_model.input_blocks...)"
    if has("double_blocks.") and has("single_blocks."):
        return "a Flux transformer checkpoint (double_blocks / single_blocks)"
    if "transformer_blocks.0.attn.to_q.weight" in keys:
        return (
            "a diffusers-format transformer file (transformer_blocks.N.attn.to_q...): load its folder with "
            "SD3Transformer2DModel.from_pretrained"
        )
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in keys:
        return "a diffusers-format VAE file: load its folder with AutoencoderKL.from_pretrained"
    shown = ", ".join(sorted(keys)[:3])
    return f"no SD3 MM-DiT keys (model.diffusion_model.joint_blocks.N...); first keys: {shown}"


def component_config_file(config: str | os.PathLike, component: str, subfolder: str | None = None) -> Path:
    """The config file of ``component`` in a ``config=`` folder (pipeline or model folder)."""
    root = Path(config)
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    if subfolder:
        candidates = [root / subfolder / name]
    else:
        candidates = [root / component / name, root / name]
    for file in candidates:
        if file.is_file():
            return file
    if not root.is_dir():
        raise FileNotFoundError(f"config={str(config)!r}: not a folder")
    raise FileNotFoundError(f"config={str(config)!r}: no {' or '.join(str(c) for c in candidates)}")


class Checkpoint:
    """An opened original-layout SD3 single file; see :func:`open_checkpoint`."""

    def __init__(self, file: SafetensorsFile, source: str):
        self.file, self.source = file, source
        self.prefixes = dict(COMPONENT_PREFIXES)
        if "joint_blocks.0.x_block.attn.qkv.weight" in file:  # some files keep the MM-DiT unprefixed
            self.prefixes[TRANSFORMER] = ""
        elif f"{self.prefixes[TRANSFORMER]}joint_blocks.0.x_block.attn.qkv.weight" not in file:
            keys = file.keys()
            others = tuple(p for c, p in COMPONENT_PREFIXES.items() if c != TRANSFORMER)
            if any(k.startswith(self.prefixes[TRANSFORMER]) for k in keys) or not any(
                k.startswith(others) for k in keys
            ):
                raise SingleFileError(
                    f"{source}: not an SD3 / SD3.5 checkpoint: it looks like {_other_model(keys)}; {_SUPPORTED}"
                )
            self.prefixes.pop(TRANSFORMER)  # a file of VAE and/or text encoders only

    def has(self, component: str) -> bool:
        """Whether the file holds ``component`` (transformer, vae, text_encoder, _2, _3)."""
        prefix = self.prefixes.get(component)
        if prefix is None:
            return False
        probe = {
            TRANSFORMER: "joint_blocks.0.x_block.attn.qkv.weight",
            VAE: "decoder.conv_in.weight",
            "text_encoder": "text_model.embeddings.token_embedding.weight",
            "text_encoder_2": "text_model.embeddings.token_embedding.weight",
            "text_encoder_3": "shared.weight",
        }[component]
        return prefix + probe in self.file

    def _keys(self, component: str) -> list[str]:
        prefix = self.prefixes[component]
        if prefix:
            return [k[len(prefix) :] for k in self.file.keys() if k.startswith(prefix)]
        others = tuple(p for c, p in self.prefixes.items() if c != component)
        return [k for k in self.file.keys() if not k.startswith(others)]

    def _require(self, component: str) -> None:
        if not self.has(component):
            raise SingleFileError(
                f"{self.source}: holds no {component} (no {COMPONENT_PREFIXES[component]}* keys)"
                + (f"; it looks like {_other_model(self.file.keys())}" if component == TRANSFORMER else "")
            )

    def stored_config(self, component: str) -> dict[str, Any] | None:
        """The diffusers config :func:`write_single_file` stored for ``component``, if any."""
        raw = self.file.metadata.get(_METADATA_CONFIG.format(component))
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SingleFileError(
                f"{self.source}: metadata {_METADATA_CONFIG.format(component)} is not JSON ({e})"
            ) from None
        if not isinstance(value, dict):
            raise SingleFileError(
                f"{self.source}: metadata {_METADATA_CONFIG.format(component)} is not an object"
            )
        return value

    def _hints(self, component: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
        return dict(config) if config is not None else dict(self.stored_config(component) or {})

    def _shape(self, component: str, key: str) -> tuple[int, ...]:
        full = self.prefixes[component] + key
        if full not in self.file:
            raise SingleFileError(f"{self.source}: {component} tensor {full} is missing")
        return self.file.shape(full)

    # ---- transformer
    def transformer_config(self, hints: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The diffusers config of the MM-DiT, read from the keys; ``hints`` fill what keys lack."""
        self._require(TRANSFORMER)
        keys = self._keys(TRANSFORMER)
        cfg = {
            **_TRANSFORMER_DEFAULTS,
            **{
                k: v
                for k, v in self._hints(TRANSFORMER, hints).items()
                if k in ("attention_head_dim", "sample_size")
            },
        }
        blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"joint_blocks\.(\d+)\.", k))})
        if blocks != list(range(len(blocks))):
            raise SingleFileError(
                f"{self.source}: joint_blocks {blocks} are not numbered 0..N-1 (truncated?)"
            )
        shape = lambda key: self._shape(TRANSFORMER, key)  # noqa: E731
        dim, in_channels, patch, _ = shape("x_embedder.proj.weight")
        grid = shape("pos_embed")[1]
        side = math.isqrt(grid)
        if side * side != grid:
            raise SingleFileError(f"{self.source}: pos_embed has {grid} positions, not a square grid")
        ln_q = "joint_blocks.0.x_block.attn.ln_q.weight"
        head_dim = shape(ln_q)[0] if ln_q in keys else int(cfg["attention_head_dim"])
        if dim % head_dim:
            raise SingleFileError(
                f"{self.source}: width {dim} is not a multiple of attention_head_dim={head_dim}; pass config= "
                "a diffusers folder whose transformer config has the right attention_head_dim"
            )
        caption_dim, joint_dim = shape("context_embedder.weight")
        cfg.update(
            num_layers=len(blocks),
            attention_head_dim=head_dim,
            num_attention_heads=dim // head_dim,
            in_channels=in_channels,
            patch_size=patch,
            out_channels=shape("final_layer.linear.weight")[0] // (patch * patch),
            joint_attention_dim=joint_dim,
            caption_projection_dim=caption_dim,
            pooled_projection_dim=shape("y_embedder.mlp.0.weight")[1],
            pos_embed_max_size=side,
            dual_attention_layers=sorted({int(k.split(".")[1]) for k in keys if ".x_block.attn2." in k}),
            qk_norm="rms_norm" if ln_q in keys else None,
        )
        return cfg

    def transformer_weights(self, config: Mapping[str, Any]) -> MappedWeights:
        """The MM-DiT's tensors under diffusers names; every tensor of the file must be used."""
        refs = transformer_refs(config)
        weights = MappedWeights(self.file, refs, self.prefixes[TRANSFORMER])
        used = {r.key for r in refs.values()}
        self._check_leftovers(TRANSFORMER, [k for k in self._keys(TRANSFORMER) if k not in used])
        return weights

    # ---- VAE
    def vae_config(self, hints: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The diffusers ``AutoencoderKL`` config read from the LDM keys; ``hints`` fill what keys lack."""
        self._require(VAE)
        keys = set(self._keys(VAE))
        cfg = {**_VAE_DEFAULTS, **{k: v for k, v in self._hints(VAE, hints).items() if k in _VAE_DEFAULTS}}
        shape = lambda key: self._shape(VAE, key)  # noqa: E731
        levels = len({k.split(".")[2] for k in keys if k.startswith("encoder.down.")})
        per_block = len({k.split(".")[4] for k in keys if k.startswith("encoder.down.0.block.")})
        channels = [shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)]
        if any(c % int(cfg["norm_num_groups"]) for c in channels):
            raise SingleFileError(
                f"{self.source}: VAE channels {channels} are not multiples of norm_num_groups="
                f"{cfg['norm_num_groups']}; pass config= a diffusers folder whose vae config has the right one"
            )
        cfg.update(
            in_channels=shape("encoder.conv_in.weight")[1],
            out_channels=shape("decoder.conv_out.weight")[0],
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
            block_out_channels=channels,
            layers_per_block=per_block,
            latent_channels=shape("decoder.conv_in.weight")[1],
            use_quant_conv="quant_conv.weight" in keys,
            use_post_quant_conv="post_quant_conv.weight" in keys,
            mid_block_add_attention="encoder.mid.attn_1.q.weight" in keys,
        )
        return cfg

    def vae_weights(self, config: Mapping[str, Any]) -> MappedWeights:
        """The VAE's tensors under diffusers names."""
        return MappedWeights(
            self.file, vae_refs(self._keys(VAE), len(config["block_out_channels"])), self.prefixes[VAE]
        )

    # ---- text encoders
    def text_encoder_weights(self, component: str) -> MappedWeights:
        """A text encoder's tensors under transformers names (fp8 ones are upcast at load)."""
        self._require(component)
        refs = {k: Ref(k) for k in self._keys(component)}
        if component == "text_encoder" and "text_projection.weight" not in refs:
            # Stability's CLIP-L has no projection: the identity, as diffusers and ComfyUI use.
            refs["text_projection.weight"] = Ref("text_model.embeddings.token_embedding.weight", op="eye")
        return MappedWeights(self.file, refs, self.prefixes[component])

    def text_encoder_config(self, component: str, config_folder: str | os.PathLike | None) -> dict[str, Any]:
        """A text encoder's transformers config: from ``config_folder``, else the file's metadata."""
        if config_folder is not None and (Path(config_folder) / component / "config.json").is_file():
            return read_json_object(Path(config_folder) / component / "config.json")
        stored = self.stored_config(component)
        if stored is None:
            raise SingleFileError(
                f"{self.source}: holds {component} ({COMPONENT_PREFIXES[component]}*) but no config for it; "
                "pass config= a diffusers SD3 folder (its text encoder configs are used)"
            )
        return stored

    def model_weights(
        self, component: str, hints: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Any], MappedWeights]:
        """``(diffusers config, diffusers-named weights)`` of the transformer or the VAE."""
        if component == TRANSFORMER:
            config = self.transformer_config(hints)
            return config, self.transformer_weights(config)
        config = self.vae_config(hints)
        return config, self.vae_weights(config)

    def _check_leftovers(self, component: str, leftover: list[str]) -> None:
        if leftover:
            shown = ", ".join(self.prefixes[component] + k for k in sorted(leftover)[:10])
            raise WeightLoadError(
                f"{self.source}: {len(leftover)} {component} tensor(s) that SD3Transformer2DModel has no place "
                f"for: {shown}"
            )

    def close(self) -> None:
        self.file.close()


def load_model(
    cls: type,
    component: str,
    path_or_url: str | os.PathLike,
    config: str | os.PathLike | None,
    subfolder: str | None,
    dtype: Any,
):
    """``cls.from_weights`` on the transformer / VAE of a single file (``from_single_file``)."""
    dtype = resolve_dtype(dtype)
    hints = None
    if config is not None:
        hints = read_json_object(component_config_file(config, component, subfolder))
    with open_checkpoint(path_or_url) as ckpt:
        model_config, weights = ckpt.model_weights(component, hints)
        return cls.from_weights(model_config, weights, dtype, ckpt.source)


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@contextlib.contextmanager
def open_checkpoint(path_or_url: str | os.PathLike) -> Iterator[Checkpoint]:
    """Open a local path, ``file://`` or other fsspec URL (downloaded to a temporary file)."""
    path = os.fspath(path_or_url)
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not _is_url(path):
        if os.path.isdir(path):
            raise SingleFileError(
                f"{path}: is a folder; from_single_file takes one .safetensors file (use from_pretrained for folders)"
            )
        ckpt = Checkpoint(SafetensorsFile(path), path)
        try:
            yield ckpt
        finally:
            ckpt.close()
        return
    import fsspec  # only for remote files

    fd, tmp = tempfile.mkstemp(prefix=".sd3-single-file-", suffix=".safetensors")
    try:
        try:
            with fsspec.open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        except FileNotFoundError:
            raise WeightsFileError(f"{path}: weights file not found") from None
        try:
            ckpt = Checkpoint(SafetensorsFile(tmp), path)
        except WeightsFileError as e:
            raise WeightsFileError(str(e).replace(tmp, path)) from None
        try:
            yield ckpt
        finally:
            ckpt.close()
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# converters


def _refuse_existing(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: exists; refusing to overwrite (remove it or choose another name)")


def _read_component(folder: Path, component: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    sub = folder / component
    config = read_json_object(sub / "config.json")
    index = open_weights(sub, _WEIGHTS_NAMES[component])
    return config, {k: index.get(k) for k in index}


def write_single_file(
    src_folder: str | os.PathLike,
    out_file: str | os.PathLike,
    include_text_encoders: bool = False,
    t5_fp8: bool = False,
) -> list[str]:
    """Write a diffusers SD3 folder as one original-layout ``.safetensors``; returns the components.

    Transformer and VAE always; CLIP-L/G and T5 (when the folder has it) with
    ``include_text_encoders``; ``t5_fp8`` stores T5's matrices as float8_e4m3fn, as in Stability's
    ``*_t5xxlfp8`` files. Each component's diffusers config goes into the file's metadata.
    """
    src, out = Path(src_folder), Path(out_file)
    if t5_fp8 and not include_text_encoders:
        raise ValueError("t5_fp8 needs include_text_encoders (T5 is only written with the text encoders)")
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"{src}: not a diffusers pipeline folder (no model_index.json)")
    _refuse_existing(out)
    components = [TRANSFORMER, VAE]
    if include_text_encoders:
        components += [c for c in TEXT_ENCODERS if (src / c).is_dir()]
    tensors: dict[str, np.ndarray] = {}
    metadata = {"format": "pt"}
    for component in components:
        config, state = _read_component(src, component)
        prefix = COMPONENT_PREFIXES[component]
        if component == TRANSFORMER:
            refs = transformer_refs(config)
            unknown = sorted(set(state) - set(refs))
            if unknown:
                raise WeightLoadError(f"{src / component}: keys with no original-layout name: {unknown[:10]}")
        elif component == VAE:
            refs = vae_original_refs(list(state), len(config["block_out_channels"]))
        else:
            if component == "text_encoder_3":
                if t5_fp8:
                    state = {k: _fp8(v) if v.ndim == 2 else v for k, v in state.items()}
                # The tied table under both names, as transformers 4 state dicts (Stability's files)
                # hold it; diffusers' single-file T5 loader needs encoder.embed_tokens.weight.
                state.setdefault(_T5_TIED, state["shared.weight"])
            refs = {k: Ref(k) for k in state}
        tensors.update(_to_original(refs, state, prefix))
        metadata[_METADATA_CONFIG.format(component)] = json.dumps(config, sort_keys=True)
    write_safetensors(out, tensors, metadata)
    return components


def _fp8(arr: np.ndarray) -> np.ndarray:
    return np.asarray(arr, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)


def write_diffusers_folder(
    src_file: str | os.PathLike, out_folder: str | os.PathLike, config: str | os.PathLike | None = None
) -> list[str]:
    """Write an original-layout single file as a diffusers SD3 folder; returns the components written.

    The file's models are written with their tensors unchanged (fp8 ones upcast to float32);
    tokenizers, scheduler and any model the file lacks are copied from the ``config`` folder
    (without it the scheduler is SD3's default and a folder without tokenizers results).
    The folder appears whole or not at all.
    """
    out = Path(out_folder).absolute()
    _refuse_existing(out)
    cfg_root = Path(config) if config is not None else None
    cfg_index = read_json_object(cfg_root / "model_index.json") if cfg_root is not None else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sd3-convert-", dir=out.parent))
    try:
        written = []
        with open_checkpoint(src_file) as ckpt:
            for component in (TRANSFORMER, VAE, *TEXT_ENCODERS):
                if ckpt.has(component):
                    model_config, tensors = _component_from_file(ckpt, component, cfg_root)
                    _write_model(staging / component, component, model_config, tensors)
                    written.append(component)
        if TRANSFORMER not in written:
            raise SingleFileError(f"{src_file}: holds no transformer")
        index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": DIFFUSERS_VERSION}
        for key in (MAX_SEQUENCE_LENGTH_KEY, GUIDANCE_SCALE_KEY):
            if key in cfg_index:
                index[key] = cfg_index[key]
        for name in _PIPELINE_COMPONENTS:
            entry = cfg_index.get(name)
            if (
                name not in written
                and cfg_root is not None
                and entry
                and entry[0]
                and (cfg_root / name).is_dir()
            ):
                shutil.copytree(cfg_root / name, staging / name)
                written.append(name)
            if name in written:
                index[name] = list(entry) if entry and entry[0] else list(_PIPELINE_COMPONENTS[name])
            else:
                index[name] = [None, None]
        if "scheduler" not in written:
            (staging / "scheduler").mkdir()
            scheduler = {
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "_diffusers_version": DIFFUSERS_VERSION,
                **SD3_SCHEDULER_CONFIG,
            }
            (staging / "scheduler" / "scheduler_config.json").write_text(
                json.dumps(scheduler, indent=2) + "\n"
            )
            index["scheduler"] = list(_PIPELINE_COMPONENTS["scheduler"])
            written.append("scheduler")
        (staging / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


_PIPELINE_COMPONENTS = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
    "tokenizer_3": ("transformers", "T5TokenizerFast"),
    "transformer": ("diffusers", "SD3Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}


def _component_from_file(
    ckpt: Checkpoint, component: str, cfg_root: Path | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if component in TEXT_ENCODERS:
        tensors = ckpt.text_encoder_weights(component).tensors()
        if component == "text_encoder_3" and "shared.weight" in tensors:
            tensors.pop(_T5_TIED, None)  # transformers 5 saves the tied table once
        return ckpt.text_encoder_config(component, cfg_root), tensors
    hints = read_json_object(component_config_file(cfg_root, component)) if cfg_root is not None else None
    model_config, weights = ckpt.model_weights(component, hints)
    if component == TRANSFORMER:
        missing = sorted(set(transformer_refs(model_config)) - set(weights))
        if missing:
            raise WeightLoadError(f"{ckpt.source}: transformer tensors missing: {missing[:10]}")
    header = {"_class_name": _PIPELINE_COMPONENTS[component][1], "_diffusers_version": DIFFUSERS_VERSION}
    return {**header, **model_config}, weights.tensors()


def _write_model(
    folder: Path, component: str, config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> None:
    folder.mkdir(parents=True)
    tensors = {k: v.astype(np.float32) if v.dtype in FLOAT8_DTYPES else v for k, v in tensors.items()}
    write_safetensors(folder / _WEIGHTS_NAMES[component], tensors, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
