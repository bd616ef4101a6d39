"""Recomputes every reference case from cases.json alone (args + in_ arrays) and compares.

This proves the recorded args are complete: a re-implementation that follows them calls diffusers
exactly as the generator did.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import reference_cases as rc
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from reference_cases import tiled_vae

_NOT_CALL_ARGS = ("drop_t5", "note")


def _call_args(args: dict) -> dict:
    return {k: v for k, v in args.items() if k not in _NOT_CALL_ARGS}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def _scheduler(case: dict, fixtures: Path) -> FlowMatchEulerDiscreteScheduler:
    cfg = case["args"]["config"]
    if isinstance(cfg, dict):
        return FlowMatchEulerDiscreteScheduler(**cfg)
    return FlowMatchEulerDiscreteScheduler.from_pretrained(fixtures / case["fixture"], subfolder="scheduler")


@torch.no_grad()
def _replay(
    case: dict, arrays: dict[str, np.ndarray], pipe: StableDiffusion3Pipeline | None, fixtures: Path
) -> dict[str, np.ndarray]:
    kind, args = case["kind"], case["args"]
    if kind == "tokenizer":
        tok = getattr(pipe, args["subfolder"])
        ids = tok(
            args["texts"],
            padding=args["padding"],
            max_length=args["max_length"],
            truncation=args["truncation"],
        ).input_ids
        return {"out_input_ids": np.asarray(ids, dtype=np.int64)}
    if kind == "text_encoder":
        enc = getattr(pipe, args["subfolder"])
        out = enc(_t(arrays["in_input_ids"]), output_hidden_states=args["subfolder"] != "text_encoder_3")
        res = {"out_last_hidden_state": out.last_hidden_state.numpy()}
        if "out_text_embeds" in arrays:
            res |= {
                "out_text_embeds": out.text_embeds.numpy(),
                "out_hidden_states": torch.stack(out.hidden_states).numpy(),
            }
        return res
    if kind == "encode_prompt":
        pe, npe, ppe, nppe = pipe.encode_prompt(**_call_args(args))
        res = {"out_prompt_embeds": pe.numpy(), "out_pooled_prompt_embeds": ppe.numpy()}
        if npe is not None:
            res |= {
                "out_negative_prompt_embeds": npe.numpy(),
                "out_negative_pooled_prompt_embeds": nppe.numpy(),
            }
        return res
    if kind == "scheduler":
        s = _scheduler(case, fixtures)
        if args["op"] == "set_timesteps":
            s.set_timesteps(args["num_inference_steps"])
            return {"out_sigmas": s.sigmas.numpy(), "out_timesteps": s.timesteps.numpy()}
        if args["op"] == "step":
            s.set_timesteps(args["num_inference_steps"])
            outs = []
            for k, t in enumerate(arrays["in_timesteps"]):
                s._step_index = None
                outs.append(
                    s.step(
                        _t(arrays["in_model_output"][k]),
                        torch.tensor(t),
                        _t(arrays["in_sample"][k]),
                        return_dict=False,
                    )[0]
                )
            return {"out_prev_sample": torch.stack(outs).numpy()}
        if args["op"] == "scale_noise":
            s.set_timesteps(args["num_inference_steps"])
            out = s.scale_noise(_t(arrays["in_sample"]), _t(arrays["in_timesteps"]), _t(arrays["in_noise"]))
            return {"out_sample": out.numpy()}
        indices = (_t(arrays["in_u"]) * s.config.num_train_timesteps).long()
        timesteps = s.timesteps[indices]
        sigmas = s.sigmas[[int((s.timesteps == t).nonzero().item()) for t in timesteps]]
        return {
            "out_indices": indices.numpy(),
            "out_timesteps": timesteps.numpy(),
            "out_sigmas": sigmas.numpy(),
        }
    if kind == "transformer":
        out = pipe.transformer(
            hidden_states=_t(arrays["in_hidden_states"]),
            encoder_hidden_states=_t(arrays["in_encoder_hidden_states"]),
            pooled_projections=_t(arrays["in_pooled_projections"]),
            timestep=_t(arrays["in_timestep"]),
            skip_layers=args["skip_layers"],
            return_dict=False,
        )[0]
        return {"out_sample": out.numpy()}
    if kind == "vae":
        with tiled_vae(pipe.vae, args["tiling"]) if "tiling" in args else nullcontext():
            if args["op"] == "decode":
                return {"out_sample": pipe.vae.decode(_t(arrays["in_z"]), return_dict=False)[0].numpy()}
            dist = pipe.vae.encode(_t(arrays["in_image"])).latent_dist
            return {"out_mean": dist.mean.numpy(), "out_logvar": dist.logvar.numpy()}
    if kind == "pipeline":
        kwargs = _call_args(args)
        latents = pipe(**kwargs, latents=_t(arrays["in_latents"]), output_type="latent").images
        images = pipe(**kwargs, latents=_t(arrays["in_latents"]), output_type="np").images
        return {"out_latents": latents.numpy(), "out_images": np.asarray(images)}
    if kind == "img2img":
        return rc.img2img_images(pipe, _call_args(args), arrays)
    if kind == "single_file":
        model = rc.load_single_file(fixtures, args)
        if args["component"] == "pipeline":
            return rc.single_file_prompt_arrays(model)
        if args["component"] == "vae":
            return {"out_sample": model.decode(_t(arrays["in_z"]), return_dict=False)[0].numpy()}
        out = model(
            hidden_states=_t(arrays["in_hidden_states"]),
            encoder_hidden_states=_t(arrays["in_encoder_hidden_states"]),
            pooled_projections=_t(arrays["in_pooled_projections"]),
            timestep=_t(arrays["in_timestep"]),
            return_dict=False,
        )[0]
        return {"out_sample": out.numpy()}
    if kind == "float8":
        values = _t(arrays["in_bytes"]).to(torch.uint8).view(getattr(torch, args["dtype"])).to(torch.float32)
        return {"out_float32_bits": values.numpy().view(np.uint32).astype(np.int64)}
    raise ValueError(f"case {case['name']}: unknown kind {kind!r}")


def verify(fixtures: Path, load: Callable[[Path], StableDiffusion3Pipeline]) -> int:
    """Replays all cases; returns the number checked, raises on the first mismatch."""
    cases = json.loads((fixtures / "references" / "cases.json").read_text(encoding="utf-8"))
    pipes: dict[str, StableDiffusion3Pipeline] = {}
    for case in cases:
        fixture = case["fixture"]
        if fixture is not None and fixture not in pipes:
            pipes[fixture] = load(fixtures / fixture)
        with np.load(fixtures / "references" / case["file"]) as data:
            arrays = {k: data[k] for k in data.files}
        got = _replay(case, arrays, pipes.get(fixture), fixtures)
        for key, value in got.items():
            if not np.array_equal(value, arrays[key]):
                err = (
                    np.abs(value.astype(np.float64) - arrays[key]).max()
                    if value.shape == arrays[key].shape
                    else "shape"
                )
                raise RuntimeError(f"replay of case {case['name']}: {key} differs (max abs err {err})")
    return len(cases)
