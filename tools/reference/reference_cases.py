"""Reference inputs/outputs computed by diffusers/transformers on the tiny fixtures.

Each case is (name, kind, fixture, args, arrays): args say exactly what a re-implementation must
pass; arrays hold inputs (``in_*``) and outputs (``out_*``), float32 / int64 / unicode only.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.training_utils import compute_loss_weighting_for_sd3

TRICKY_TEXTS = [
    "A photo of a CAT",
    "ALL CAPS SHOUTING, and MiXeD cAsE",
    "  leading,   repeated   spaces\tand\ttabs\nand newlines  ",
    "punctuation!!! what?? yes... (parens) [brackets] {braces} \"quotes\" 'single'",
    "it's they're we've I'm you'll he'd don't",
    "café naïve résumé Ünïcödé straße 日本語 😀 🎨🖌️",
    "Fullwidth ＡＢＣ１２３ and ligature ﬁne",
    "numbers 1234567890 3.14 1,000 50% $20 #1",
    "hyphen-ated words, snake_case and CamelCase",
    "special <|endoftext|> tokens </s> <pad> <extra_id_3> inside",
    "html &amp; entities &lt;b&gt; and mojibake cafÃ© naÃ¯ve",
    "",
    "   ",
]

LONG_PROMPT = (
    "A highly detailed oil painting of an old lighthouse on a rocky beach at sunset, "
    "with a small wooden boat near the river, two cats sleeping on a rooftop, a golden "
    "retriever playing in the rain, an astronaut walking on the moon under the stars, "
    "a vintage car parked in a busy market, a cup of coffee on a table in a quiet library, "
    "cinematic lighting, sharp focus, 8k, watercolor and pencil sketch details everywhere, "
    "a field of sunflowers, a snowy forest, a mountain lake and a castle in the distance"
)


@dataclass
class Case:
    name: str
    kind: str
    fixture: str | None
    args: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _rng(name: str) -> np.random.Generator:
    # Inputs depend only on the case name, so adding a case does not change the others.
    return np.random.default_rng(zlib.crc32(name.encode()))


def _randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.numpy().astype(np.int64 if not t.is_floating_point() else np.float32)


# ---------------------------------------------------------------- tokenizer


def _removed(tokenizer, text: str, max_length: int) -> str:
    """Text cut off by truncation, decoded the way diffusers builds its warning (one row)."""
    ids = tokenizer(text).input_ids
    if len(ids) <= max_length:
        return ""
    return tokenizer.decode(ids[max_length - 1 : -1])


def tokenizer_cases(pipes: dict[str, StableDiffusion3Pipeline]) -> Iterator[Case]:
    texts = TRICKY_TEXTS + [LONG_PROMPT]
    for fixture in ("sd3-tiny", "sd35-tiny"):
        pipe = pipes[fixture]
        plan = [("tokenizer", pipe.tokenizer, 77), ("tokenizer_2", pipe.tokenizer_2, 77)]
        plan += [("tokenizer_3", pipe.tokenizer_3, n) for n in (8, 32, 77, 256)]
        for sub, tok, max_length in plan:
            ids = tok(
                texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True
            ).input_ids
            yield Case(
                f"tokenizer_{fixture}_{sub}_len{max_length}",
                "tokenizer",
                fixture,
                {
                    "subfolder": sub,
                    "texts": texts,
                    "max_length": max_length,
                    "padding": "max_length",
                    "truncation": True,
                },
                {
                    "out_input_ids": np.asarray(ids, dtype=np.int64),
                    "out_removed": np.asarray([_removed(tok, t, max_length) for t in texts]),
                },
            )


# ---------------------------------------------------------------- text encoders


@torch.no_grad()
def text_encoder_cases(pipes: dict[str, StableDiffusion3Pipeline]) -> Iterator[Case]:
    prompts = ["A photo of a CAT", "", LONG_PROMPT + " café naïve 😀 1234"]
    for fixture in ("sd3-tiny", "sd35-tiny"):
        pipe = pipes[fixture]
        for sub, tok, enc in (
            ("text_encoder", pipe.tokenizer, pipe.text_encoder),
            ("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2),
        ):
            ids = tok(
                prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            out = enc(ids, output_hidden_states=True)
            yield Case(
                f"text_encoder_{fixture}_{sub}",
                "text_encoder",
                fixture,
                {
                    "subfolder": sub,
                    "prompts": prompts,
                    "note": "out_hidden_states stacks HF hidden_states: [embeddings, layer 1, ..., layer N]",
                },
                {
                    "in_input_ids": _np(ids),
                    "out_text_embeds": _np(out.text_embeds),
                    "out_hidden_states": _np(torch.stack(out.hidden_states)),
                    "out_last_hidden_state": _np(out.last_hidden_state),
                },
            )
        t5 = pipe.text_encoder_3
        ids = pipe.tokenizer_3(
            prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt"
        ).input_ids
        # Also ids no tokenizer produces: sentinels and the padded rows above the tokenizer size.
        rng = _rng(f"t5_{fixture}")
        random_ids = torch.from_numpy(rng.integers(0, t5.config.vocab_size, size=(2, 40)))
        for suffix, inp in (("tokenized", ids), ("random_ids", random_ids)):
            yield Case(
                f"text_encoder_{fixture}_text_encoder_3_{suffix}",
                "text_encoder",
                fixture,
                {"subfolder": "text_encoder_3", "prompts": prompts if suffix == "tokenized" else None},
                {"in_input_ids": _np(inp), "out_last_hidden_state": _np(t5(inp).last_hidden_state)},
            )


# ---------------------------------------------------------------- encode_prompt


ENCODE_PROMPT_PLAN = [
    (
        "encode_prompt_sd3_batch2_neg_prompt23",
        "sd3-tiny",
        dict(
            prompt=["A photo of a CAT", "an old lighthouse at sunset"],
            prompt_2=["a cat, digital art", "lighthouse, oil painting"],
            prompt_3=["a T5 caption about a cat", "a T5 caption about a lighthouse"],
            negative_prompt=["blurry", "low quality, watermark"],
            do_classifier_free_guidance=True,
            max_sequence_length=32,
        ),
    ),
    (
        "encode_prompt_sd3_long_clipskip1_nipp2",
        "sd3-tiny",
        dict(
            prompt=LONG_PROMPT,
            do_classifier_free_guidance=True,
            clip_skip=1,
            num_images_per_prompt=2,
            max_sequence_length=32,
        ),
    ),
    (
        "encode_prompt_sd3_default_msl256",
        "sd3-tiny",
        dict(prompt="a red fox in the snow", do_classifier_free_guidance=True),
    ),
    (
        "encode_prompt_sd35_batch2_neg23",
        "sd35-tiny",
        dict(
            prompt=["two cats on a rooftop", "a robot in the desert"],
            negative_prompt=["ugly", "dark"],
            negative_prompt_2=["ugly, clip-g", "dark, clip-g"],
            negative_prompt_3=["ugly, t5", "dark, t5"],
            do_classifier_free_guidance=True,
            max_sequence_length=32,
        ),
    ),
    (
        "encode_prompt_sd35_long_msl256",
        "sd35-tiny",
        dict(
            prompt=LONG_PROMPT + ", " + LONG_PROMPT + ", " + LONG_PROMPT,
            negative_prompt="blurry",
            do_classifier_free_guidance=True,
        ),
    ),
    (
        "encode_prompt_sd35_not5",
        "sd35-tiny-not5",
        dict(
            prompt=["a bowl of ramen", "a teddy bear"],
            negative_prompt=["bad", "worse"],
            do_classifier_free_guidance=True,
            max_sequence_length=32,
        ),
    ),
    (
        "encode_prompt_sd35_nocfg_nipp2",
        "sd35-tiny",
        dict(
            prompt="a glass bottle on a beach",
            do_classifier_free_guidance=False,
            num_images_per_prompt=2,
            max_sequence_length=48,
        ),
    ),
]


@torch.no_grad()
def encode_prompt_cases(pipes: dict[str, StableDiffusion3Pipeline]) -> Iterator[Case]:
    for name, fixture, kwargs in ENCODE_PROMPT_PLAN:
        pipe = pipes[fixture]
        call = {"prompt_2": None, "prompt_3": None, **kwargs}
        pe, npe, ppe, nppe = pipe.encode_prompt(device=torch.device("cpu"), **call)
        arrays = {"out_prompt_embeds": _np(pe), "out_pooled_prompt_embeds": _np(ppe)}
        if npe is not None:
            arrays |= {"out_negative_prompt_embeds": _np(npe), "out_negative_pooled_prompt_embeds": _np(nppe)}
        args = {
            "num_images_per_prompt": 1,
            "max_sequence_length": 256,
            "clip_skip": None,
            **call,
            "drop_t5": pipe.text_encoder_3 is None,
        }
        yield Case(name, "encode_prompt", fixture, args, arrays)


# ---------------------------------------------------------------- scheduler


def scheduler_cases(fixture_dirs: dict[str, Path]) -> Iterator[Case]:
    for shift in (1.0, 3.0):
        for n in (1, 2, 4, 28):
            s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
            s.set_timesteps(n)
            yield Case(
                f"scheduler_set_timesteps_n{n}_shift{shift:g}",
                "scheduler",
                None,
                {
                    "op": "set_timesteps",
                    "config": {"num_train_timesteps": 1000, "shift": shift},
                    "num_inference_steps": n,
                },
                {"out_sigmas": _np(s.sigmas), "out_timesteps": _np(s.timesteps)},
            )
    s = FlowMatchEulerDiscreteScheduler.from_pretrained(fixture_dirs["sd3-tiny"], subfolder="scheduler")
    s.set_timesteps(5)
    yield Case(
        "scheduler_set_timesteps_fixture_config_n5",
        "scheduler",
        "sd3-tiny",
        {
            "op": "set_timesteps",
            "config": "from_pretrained(fixture, subfolder='scheduler')",
            "num_inference_steps": 5,
        },
        {"out_sigmas": _np(s.sigmas), "out_timesteps": _np(s.timesteps)},
    )

    name = "scheduler_step_n4_shift3"
    rng = _rng(name)
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    s.set_timesteps(4)
    arrays = {"in_model_output": _randn(rng, 4, 2, 16, 8, 8), "in_sample": _randn(rng, 4, 2, 16, 8, 8)}
    indices = [0, 1, 2, 3]
    outs = []
    for k, i in enumerate(indices):
        s._step_index = None  # a fresh lookup from the timestep, as a pure step() does
        t = s.timesteps[i]
        outs.append(
            s.step(
                torch.from_numpy(arrays["in_model_output"][k]),
                t,
                torch.from_numpy(arrays["in_sample"][k]),
                return_dict=False,
            )[0]
        )
    arrays |= {"in_timesteps": _np(s.timesteps[indices]), "out_prev_sample": _np(torch.stack(outs))}
    yield Case(
        name,
        "scheduler",
        None,
        {
            "op": "step",
            "config": {"num_train_timesteps": 1000, "shift": 3.0},
            "num_inference_steps": 4,
            "step_indices": indices,
            "note": "row k: step(in_model_output[k], in_timesteps[k], in_sample[k])",
        },
        arrays,
    )

    name = "scheduler_scale_noise_n4_shift3"
    rng = _rng(name)
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    s.set_timesteps(4)
    sample, noise = _randn(rng, 3, 16, 8, 8), _randn(rng, 3, 16, 8, 8)
    t = s.timesteps[[0, 2, 3]]
    out = s.scale_noise(torch.from_numpy(sample), t, torch.from_numpy(noise))
    yield Case(
        name,
        "scheduler",
        None,
        {
            "op": "scale_noise",
            "config": {"num_train_timesteps": 1000, "shift": 3.0},
            "num_inference_steps": 4,
        },
        {"in_sample": sample, "in_noise": noise, "in_timesteps": _np(t), "out_sample": _np(out)},
    )

    name = "scheduler_training_lookup"
    rng = _rng(name)
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = np.concatenate([[0.0, 0.0005, 0.5, 0.9995], rng.random(12)]).astype(np.float32)
    # train_dreambooth_sd3.py: indices = (u * num_train_timesteps).long(); t = timesteps[indices];
    # sigmas looked up by matching t against the fresh scheduler's timesteps.
    indices = (torch.from_numpy(u) * 1000).long()
    timesteps = s.timesteps[indices]
    sigmas = s.sigmas[[int((s.timesteps == t_).nonzero().item()) for t_ in timesteps]]
    mode_scale = 1.29
    ut = torch.from_numpy(u)
    mode_u = 1 - ut - mode_scale * (torch.cos(torch.pi * ut / 2) ** 2 - 1 + ut)
    x0, noise = _randn(rng, 16, 4, 4, 4), _randn(rng, 16, 4, 4, 4)
    sig4 = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - sig4) * torch.from_numpy(x0) + sig4 * torch.from_numpy(noise)
    yield Case(
        name,
        "scheduler",
        None,
        {
            "op": "training",
            "config": {"num_train_timesteps": 1000, "shift": 3.0},
            "mode_scale": mode_scale,
            "note": "out_init_* are a fresh scheduler's timesteps/sigmas (1000 + 1000 entries)",
        },
        {
            "in_u": u,
            "in_x0": x0,
            "in_noise": noise,
            "out_init_timesteps": _np(s.timesteps),
            "out_init_sigmas": _np(s.sigmas),
            "out_indices": _np(indices),
            "out_timesteps": _np(timesteps),
            "out_sigmas": _np(sigmas),
            "out_mode_u": _np(mode_u),
            "out_noisy": _np(noisy),
            "out_target": _np(torch.from_numpy(noise - x0)),
            "out_weight_sigma_sqrt": _np(compute_loss_weighting_for_sd3("sigma_sqrt", sigmas)),
            "out_weight_cosmap": _np(compute_loss_weighting_for_sd3("cosmap", sigmas)),
        },
    )


# ---------------------------------------------------------------- transformer / vae


TRANSFORMER_PLAN = [
    # (suffix, batch, latent h, latent w, skip_layers)
    ("square16_b2", 2, 16, 16, None),
    ("h16w24_b2", 2, 16, 24, None),
    ("h24w16_b1", 1, 24, 16, None),
    ("max24_b1", 1, 24, 24, None),
    ("square16_b2_skip1", 2, 16, 16, [1]),
]


@torch.no_grad()
def transformer_cases(pipes: dict[str, StableDiffusion3Pipeline]) -> Iterator[Case]:
    for fixture in ("sd3-tiny", "sd35-tiny"):
        model = pipes[fixture].transformer
        cfg = model.config
        for suffix, b, h, w, skip in TRANSFORMER_PLAN:
            name = f"transformer_{fixture}_{suffix}"
            rng = _rng(name)
            seq = 77 + 32
            sigmas = np.array([1.0, 0.602151, 0.25, 0.008929], dtype=np.float32)[:b]
            arrays = {
                "in_hidden_states": _randn(rng, b, cfg.in_channels, h, w),
                "in_encoder_hidden_states": _randn(rng, b, seq, cfg.joint_attention_dim),
                "in_pooled_projections": _randn(rng, b, cfg.pooled_projection_dim),
                "in_timestep": sigmas * np.float32(1000.0),
            }
            out = model(
                hidden_states=torch.from_numpy(arrays["in_hidden_states"]),
                encoder_hidden_states=torch.from_numpy(arrays["in_encoder_hidden_states"]),
                pooled_projections=torch.from_numpy(arrays["in_pooled_projections"]),
                timestep=torch.from_numpy(arrays["in_timestep"]),
                skip_layers=skip,
                return_dict=False,
            )[0]
            arrays["out_sample"] = _np(out)
            yield Case(name, "transformer", fixture, {"skip_layers": skip}, arrays)


@torch.no_grad()
def vae_cases(pipes: dict[str, StableDiffusion3Pipeline]) -> Iterator[Case]:
    for fixture in ("sd3-tiny", "sd35-tiny"):
        vae = pipes[fixture].vae
        for h, w in ((64, 64), (64, 96)):
            name = f"vae_{fixture}_decode_h{h}w{w}"
            rng = _rng(name)
            z = _randn(rng, 2, 16, h // 8, w // 8)
            out = vae.decode(torch.from_numpy(z), return_dict=False)[0]
            yield Case(
                name,
                "vae",
                fixture,
                {"op": "decode", "note": "in_z is already unscaled"},
                {"in_z": z, "out_sample": _np(out)},
            )
        for h, w in ((64, 64), (96, 64)):
            name = f"vae_{fixture}_encode_h{h}w{w}"
            rng = _rng(name)
            x = rng.uniform(-1.0, 1.0, size=(2, 3, h, w)).astype(np.float32)
            dist = vae.encode(torch.from_numpy(x)).latent_dist
            yield Case(
                name,
                "vae",
                fixture,
                {"op": "encode"},
                {
                    "in_image": x,
                    "out_mean": _np(dist.mean),
                    "out_logvar": _np(dist.logvar),
                    "out_std": _np(dist.std),
                },
            )
    yield from tiled_vae_cases(pipes["sd3-tiny"].vae)


# Small tiles so a 64-96 px image has 3-4 x 3-4 overlapping tiles (the fixture's own tile is 64 px).
TILED_VAE_PLAN = [
    # (op, batch, h, w, tile_sample_min_size, tile_overlap_factor)
    ("decode", 1, 96, 96, 32, 0.25),
    ("decode", 2, 64, 96, 32, 0.5),
    ("encode", 1, 96, 64, 32, 0.25),
]


@contextmanager
def tiled_vae(vae, tiling: dict):
    """``vae`` with tiling on and ``tiling``'s attributes set; restored afterwards (pipes are shared)."""
    saved = {k: getattr(vae, k) for k in tiling}
    vae.enable_tiling()
    for key, value in tiling.items():
        setattr(vae, key, value)
    try:
        yield vae
    finally:
        vae.disable_tiling()
        for key, value in saved.items():
            setattr(vae, key, value)


@torch.no_grad()
def tiled_vae_cases(vae) -> Iterator[Case]:
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    for op, b, h, w, tile, overlap in TILED_VAE_PLAN:
        name = f"vae_sd3-tiny_tiled_{op}_b{b}h{h}w{w}_tile{tile}_overlap{overlap:g}"
        rng = _rng(name)
        tiling = {
            "tile_sample_min_size": tile,
            "tile_latent_min_size": tile // scale,
            "tile_overlap_factor": overlap,
        }
        args = {
            "op": op,
            "tiling": tiling,
            "note": "vae.enable_tiling(), then these attributes set; diffusers' tiled path",
        }
        with tiled_vae(vae, tiling):
            if op == "decode":
                z = _randn(rng, b, 16, h // scale, w // scale)
                out = vae.decode(torch.from_numpy(z), return_dict=False)[0]
                yield Case(name, "vae", "sd3-tiny", args, {"in_z": z, "out_sample": _np(out)})
            else:
                x = rng.uniform(-1.0, 1.0, size=(b, 3, h, w)).astype(np.float32)
                dist = vae.encode(torch.from_numpy(x)).latent_dist
                yield Case(
                    name,
                    "vae",
                    "sd3-tiny",
                    args,
                    {
                        "in_image": x,
                        "out_mean": _np(dist.mean),
                        "out_logvar": _np(dist.logvar),
                        "out_std": _np(dist.std),
                    },
                )


# ---------------------------------------------------------------- single files and fp8

#: Single files written by our converter (`sd3 convert --to single-file FIXTURE OUT`), see
#: tests/fixtures/single-file/README.md; diffusers must read them as it reads Stability's files.
SINGLE_FILE_DIR = "single-file"


def load_single_file(root: Path, args: dict):
    """diffusers' from_single_file of a fixture single file, offline, config from the fixture folder."""
    cls = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL, "pipeline": StableDiffusion3Pipeline}[
        args["component"]
    ]
    extra = {"subfolder": args["subfolder"]} if args["subfolder"] else {}
    return cls.from_single_file(
        str(root / args["file"]),
        config=str(root / args["config"]),
        local_files_only=True,
        torch_dtype=torch.float32,
        **extra,
    )


@torch.no_grad()
def single_file_cases(fixture_dirs: dict[str, Path]) -> Iterator[Case]:
    root = fixture_dirs["sd3-tiny"].parent
    for fixture in ("sd3-tiny", "sd35-tiny"):
        file = f"{SINGLE_FILE_DIR}/{fixture}.safetensors"
        if not (root / file).is_file():
            import logging

            logging.getLogger(__name__).warning(
                "no %s (write it with `sd3 convert`): single_file cases skipped", file
            )
            return
        base = {
            "file": file,
            "config": fixture,
            "loader": "<Class>.from_single_file(file, config=config, "
            "subfolder=subfolder, local_files_only=True, torch_dtype=torch.float32)",
        }
        args = {**base, "component": "transformer", "subfolder": "transformer"}
        model = load_single_file(root, args)
        name = f"single_file_{fixture}_transformer"
        rng = _rng(name)
        arrays = {
            "in_hidden_states": _randn(rng, 2, model.config.in_channels, 16, 24),
            "in_encoder_hidden_states": _randn(rng, 2, 77 + 32, model.config.joint_attention_dim),
            "in_pooled_projections": _randn(rng, 2, model.config.pooled_projection_dim),
            "in_timestep": np.array([1000.0, 250.0], dtype=np.float32),
        }
        out = model(
            hidden_states=torch.from_numpy(arrays["in_hidden_states"]),
            encoder_hidden_states=torch.from_numpy(arrays["in_encoder_hidden_states"]),
            pooled_projections=torch.from_numpy(arrays["in_pooled_projections"]),
            timestep=torch.from_numpy(arrays["in_timestep"]),
            return_dict=False,
        )[0]
        yield Case(name, "single_file", fixture, args, {**arrays, "out_sample": _np(out)})
        args = {**base, "component": "vae", "subfolder": "vae", "op": "decode"}
        vae = load_single_file(root, args)
        name = f"single_file_{fixture}_vae_decode"
        z = _randn(_rng(name), 1, 16, 8, 12)
        yield Case(
            name,
            "single_file",
            fixture,
            args,
            {"in_z": z, "out_sample": _np(vae.decode(torch.from_numpy(z), return_dict=False)[0])},
        )
        if fixture == "sd3-tiny":  # the file with CLIP-L/G and an fp8 T5 (like *_incl_clips_t5xxlfp8)
            args = {**base, "component": "pipeline", "subfolder": None, **SINGLE_FILE_PROMPT}
            yield Case(
                f"single_file_{fixture}_encode_prompt",
                "single_file",
                fixture,
                args,
                single_file_prompt_arrays(load_single_file(root, args)),
            )


SINGLE_FILE_PROMPT = {
    "prompt": ["A photo of a CAT", "an old lighthouse at sunset, oil painting"],
    "max_sequence_length": 32,
    "note": "encode_prompt(prompt, max_sequence_length, do_classifier_free_guidance=False). diffusers "
    "replaces the file's CLIP-L text_projection by the identity, so only the CLIP-G half of the "
    "pooled embedding is recorded (out_pooled_clip_g = pooled[:, clip_l projection_dim:])",
}


def single_file_prompt_arrays(pipe) -> dict[str, np.ndarray]:
    pe, _, pooled, _ = pipe.encode_prompt(
        prompt=SINGLE_FILE_PROMPT["prompt"],
        prompt_2=None,
        prompt_3=None,
        max_sequence_length=SINGLE_FILE_PROMPT["max_sequence_length"],
        do_classifier_free_guidance=False,
        device=torch.device("cpu"),
    )
    clip_l = pipe.text_encoder.config.projection_dim
    return {"out_prompt_embeds": _np(pe), "out_pooled_clip_g": _np(pooled[:, clip_l:])}


def float8_cases() -> Iterator[Case]:
    # Every byte as torch decodes it; the float32 results as their bit patterns (NaNs included).
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for dtype in ("float8_e4m3fn", "float8_e5m2"):
        values = codes.view(getattr(torch, dtype)).to(torch.float32)
        yield Case(
            f"float8_{dtype}_table",
            "float8",
            None,
            {"dtype": dtype, "note": "out_float32_bits[b] = float32 bits of byte b read as torch." + dtype},
            {
                "in_bytes": codes.to(torch.int64).numpy(),
                "out_float32_bits": values.numpy().view(np.uint32).astype(np.int64),
            },
        )


# ---------------------------------------------------------------- full pipeline


PIPELINE_PLAN = [
    (
        "pipeline_sd3_square_cfg5",
        "sd3-tiny",
        dict(
            prompt="a red fox on a beach at sunset",
            negative_prompt="blurry",
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=5.0,
        ),
    ),
    (
        "pipeline_sd3_h64w96_nocfg",
        "sd3-tiny",
        dict(
            prompt="an old lighthouse, oil painting",
            height=64,
            width=96,
            num_inference_steps=2,
            guidance_scale=1.0,
            max_sequence_length=32,
        ),
    ),
    (
        "pipeline_sd3_batch2_neg_h96w64",
        "sd3-tiny",
        dict(
            prompt=["two cats in the rain", "a robot on the moon"],
            negative_prompt=["ugly", "dark, low quality"],
            height=96,
            width=64,
            num_inference_steps=2,
            guidance_scale=4.0,
            max_sequence_length=32,
        ),
    ),
    (
        "pipeline_sd3_long_nipp2_clipskip1",
        "sd3-tiny",
        dict(
            prompt=LONG_PROMPT,
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=3.0,
            num_images_per_prompt=2,
            clip_skip=1,
            max_sequence_length=32,
        ),
    ),
    (
        "pipeline_sd35_square_cfg5",
        "sd35-tiny",
        dict(
            prompt="a castle under the stars",
            prompt_3="a castle under the stars, for T5",
            negative_prompt="blurry",
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=5.0,
        ),
    ),
    (
        "pipeline_sd35_skip_layer_guidance",
        "sd35-tiny",
        dict(
            prompt="a golden retriever in a field of sunflowers",
            height=64,
            width=64,
            num_inference_steps=4,
            guidance_scale=5.0,
            skip_guidance_layers=[1],
            skip_layer_guidance_scale=2.8,
            skip_layer_guidance_start=0.1,
            skip_layer_guidance_stop=0.6,
            max_sequence_length=32,
        ),
    ),
    (
        "pipeline_sd35_h96w64_nocfg",
        "sd35-tiny",
        dict(
            prompt="a snowy forest",
            height=96,
            width=64,
            num_inference_steps=2,
            guidance_scale=1.0,
            max_sequence_length=32,
        ),
    ),
    (
        "pipeline_sd35_not5_cfg",
        "sd35-tiny-not5",
        dict(
            prompt=["a bowl of ramen", "a teddy bear"],
            negative_prompt=["bad", "worse"],
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=3.0,
            max_sequence_length=32,
        ),
    ),
]


@torch.no_grad()
def pipeline_cases(pipes: dict[str, StableDiffusion3Pipeline]) -> Iterator[Case]:
    for name, fixture, kwargs in PIPELINE_PLAN:
        pipe = pipes[fixture]
        rng = _rng(name)
        prompts = [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else kwargs["prompt"]
        batch = len(prompts) * kwargs.get("num_images_per_prompt", 1)
        latents = _randn(rng, batch, 16, kwargs["height"] // 8, kwargs["width"] // 8)
        images = pipe(**kwargs, latents=torch.from_numpy(latents), output_type="np").images
        final = pipe(**kwargs, latents=torch.from_numpy(latents), output_type="latent").images
        args = {
            "num_images_per_prompt": 1,
            "max_sequence_length": 256,
            "clip_skip": None,
            **kwargs,
            "drop_t5": pipe.text_encoder_3 is None,
            "note": "out_latents = final latents before the VAE (output_type='latent'); "
            "out_images = output_type='np' (NHWC in [0, 1])",
        }
        yield Case(
            name,
            "pipeline",
            fixture,
            args,
            {
                "in_latents": latents,
                "out_latents": _np(final),
                "out_images": np.asarray(images, dtype=np.float32),
            },
        )


# ---------------------------------------------------------------- image-to-image

IMG2IMG_PLAN = [
    # (name, fixture, call kwargs); one image for the batch, or one per prompt (num_images_per_prompt 1:
    # diffusers repeats the image batch whole, not per prompt, so with more it pairs them differently).
    (
        "img2img_sd3_strength06_cfg",
        "sd3-tiny",
        dict(
            prompt="a red fox in the snow",
            negative_prompt="blurry",
            height=64,
            width=64,
            strength=0.6,
            num_inference_steps=5,
            guidance_scale=3.0,
            max_sequence_length=32,
        ),
    ),
    (
        "img2img_sd35_two_images_strength03",
        "sd35-tiny",
        dict(
            prompt=["a lighthouse at dusk", "a bowl of ramen"],
            height=64,
            width=96,
            strength=0.3,
            num_inference_steps=4,
            guidance_scale=4.0,
            max_sequence_length=32,
        ),
    ),
]


def img2img_pixels(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """``count`` smooth RGB test pictures, uint8 NHWC (blocky gradients plus noise)."""
    coarse = rng.uniform(0, 255, (count, height // 16, width // 16, 3))
    smooth = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).round().astype(np.uint8)


@contextmanager
def img2img_draws(noise: np.ndarray, posterior_noise: np.ndarray):
    """diffusers' img2img with its two random draws replaced by given arrays: the posterior sample
    ``mean + std * posterior_noise`` and the start noise ``noise``."""
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img as module

    saved = module.randn_tensor, module.retrieve_latents

    def retrieve_latents(encoder_output, generator=None):
        dist = encoder_output.latent_dist
        return dist.mean + dist.std * torch.from_numpy(posterior_noise).to(dist.mean.dtype)

    module.randn_tensor = lambda shape, **kw: torch.from_numpy(noise).to(kw.get("dtype") or torch.float32)
    module.retrieve_latents = retrieve_latents
    try:
        yield
    finally:
        module.randn_tensor, module.retrieve_latents = saved


def img2img_images(pipe: StableDiffusion3Pipeline, kwargs: dict, arrays: dict) -> dict[str, np.ndarray]:
    """Run diffusers' StableDiffusion3Img2ImgPipeline on ``pipe``'s components with a case's inputs."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image

    img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    images = [Image.fromarray(a) for a in arrays["in_image"]]
    with img2img_draws(arrays["in_noise"], arrays["in_posterior_noise"]):
        out = img2img(**kwargs, image=images, output_type="np").images
    with img2img_draws(arrays["in_noise"], arrays["in_posterior_noise"]):
        final = img2img(**kwargs, image=images, output_type="latent").images
    return {"out_images": np.asarray(out, dtype=np.float32), "out_latents": _np(final)}


@torch.no_grad()
def img2img_cases(pipes: dict[str, StableDiffusion3Pipeline]) -> Iterator[Case]:
    for name, fixture, kwargs in IMG2IMG_PLAN:
        rng = _rng(name)
        prompts = [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else kwargs["prompt"]
        h, w = kwargs["height"], kwargs["width"]
        arrays = {
            "in_image": img2img_pixels(rng, len(prompts), h, w),
            "in_noise": _randn(rng, len(prompts), 16, h // 8, w // 8),
            "in_posterior_noise": _randn(rng, len(prompts), 16, h // 8, w // 8),
        }
        arrays |= img2img_images(pipes[fixture], kwargs, arrays)
        args = {
            "max_sequence_length": 256,
            **kwargs,
            "note": "image = in_image as PIL images (uint8 NHWC); diffusers' two draws replaced: the VAE "
            "posterior sample is mean + std * in_posterior_noise, the start noise is in_noise; out_images = "
            "output_type='np', out_latents = output_type='latent'",
        }
        yield Case(name, "img2img", fixture, args, arrays)
