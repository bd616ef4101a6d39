"""Single-file SD3 checkpoints in the original Stability layout (as ComfyUI users keep them).

One ``.safetensors`` holds the MM-DiT under ``model.diffusion_model.`` (or bare ``joint_blocks...``),
optionally the VAE under ``first_stage_model.`` (LDM names) and the text encoders under
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (transformers names; T5 possibly fp8).

This module opens such files (:func:`open_checkpoint`) and reads each component's config and
diffusers-named weights (:class:`Checkpoint`); the key mapping is in ``single_file_keys``, the
converters in ``single_file_convert``.

Configs are read from the keys and shapes (layers, width, heads from the qk-norm width, dual
attention blocks, patch, pos-embed grid, ...). What no key records (the head width of models
without qk-norm, VAE group count and latent scaling, text encoder configs) comes from, in order:
a ``config=`` diffusers folder, the file's own metadata (written by ``single_file_convert.write_single_file``),
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
from pathlib import Path
from typing import Any

from sd3_core.dtypes import resolve_dtype
from sd3_core.model_config import read_json_object
from sd3_core.safetensors_io import SafetensorsFile, WeightsFileError
from sd3_core.single_file_keys import (
    COMPONENT_PREFIXES,
    TEXT_ENCODERS,
    TRANSFORMER,
    VAE,
    MappedWeights,
    Ref,
    transformer_refs,
    vae_refs,
)
from sd3_core.torch_state import WeightLoadError

__all__ = [
    "TEXT_ENCODERS",
    "TRANSFORMER",
    "VAE",
    "Checkpoint",
    "SD3_SCHEDULER_CONFIG",
    "SingleFileError",
    "component_config_file",
    "load_model",
    "open_checkpoint",
]

METADATA_CONFIG = "sd3_ray.config.{}"  # metadata key holding a component's diffusers config (JSON)
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
        raw = self.file.metadata.get(METADATA_CONFIG.format(component))
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SingleFileError(
                f"{self.source}: metadata {METADATA_CONFIG.format(component)} is not JSON ({e})"
            ) from None
        if not isinstance(value, dict):
            raise SingleFileError(
                f"{self.source}: metadata {METADATA_CONFIG.format(component)} is not an object"
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
