"""Converters between a diffusers SD3 folder and an original-layout single file (``sd3 convert``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from sd3_core.folder_defaults import GUIDANCE_SCALE_KEY, MAX_SEQUENCE_LENGTH_KEY
from sd3_core.folder_layout import LIBRARY_CLASSES
from sd3_core.model_config import read_json_object
from sd3_core.modeling import DIFFUSERS_VERSION
from sd3_core.safetensors_io import FLOAT8_DTYPES, open_weights, write_safetensors
from sd3_core.single_file import (
    METADATA_CONFIG,
    SD3_SCHEDULER_CONFIG,
    Checkpoint,
    SingleFileError,
    component_config_file,
    open_checkpoint,
)
from sd3_core.single_file_keys import (
    COMPONENT_PREFIXES,
    TEXT_ENCODERS,
    TRANSFORMER,
    VAE,
    Ref,
    to_original,
    transformer_refs,
    vae_original_refs,
)
from sd3_core.torch_state import WeightLoadError

__all__ = ["write_diffusers_folder", "write_single_file"]

_WEIGHTS_NAMES = {
    TRANSFORMER: "diffusion_pytorch_model.safetensors",
    VAE: "diffusion_pytorch_model.safetensors",
    **dict.fromkeys(TEXT_ENCODERS, "model.safetensors"),
}
_T5_TIED = "encoder.embed_tokens.weight"  # T5's token table, tied to shared.weight


def _refuse_existing(path: Path, empty_folder_ok: bool) -> None:
    if path.exists() and not (empty_folder_ok and path.is_dir() and not any(path.iterdir())):
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
    _refuse_existing(out, empty_folder_ok=False)
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
                table = state.get("shared.weight", state.get(_T5_TIED))
                state = {**state, "shared.weight": table, _T5_TIED: table}
            refs = {k: Ref(k) for k in state}
        tensors.update(to_original(refs, state, prefix))
        metadata[METADATA_CONFIG.format(component)] = json.dumps(config, sort_keys=True)
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
    _refuse_existing(out, empty_folder_ok=True)
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
        for name in LIBRARY_CLASSES:
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
                index[name] = list(entry) if entry and entry[0] else list(LIBRARY_CLASSES[name])
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
            index["scheduler"] = list(LIBRARY_CLASSES["scheduler"])
            written.append("scheduler")
        (staging / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


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
    header = {"_class_name": LIBRARY_CLASSES[component][1], "_diffusers_version": DIFFUSERS_VERSION}
    return {**header, **model_config}, weights.tensors()


def _write_model(
    folder: Path, component: str, config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> None:
    folder.mkdir(parents=True)
    tensors = {k: v.astype(np.float32) if v.dtype in FLOAT8_DTYPES else v for k, v in tensors.items()}
    write_safetensors(folder / _WEIGHTS_NAMES[component], tensors, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
