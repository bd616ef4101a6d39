"""Training-math and LoRA references from diffusers/peft, written to tests/fixtures/training/.

Separate from make_tiny_checkpoints.py (which rewrites tests/fixtures/references/ whole): this
reads the committed tiny pipelines and adds its own folder. Order, from the repository root:

    .venv/bin/python -m tests.lora_recipe tests/fixtures/training/lora      # our LoRA files
    .refvenv/bin/python tools/reference/training_cases.py --out tests/fixtures

It writes `training/lora/diffusers_*.safetensors` (LoRA files saved by diffusers/peft the way
train_dreambooth_lora_sd3.py saves them), `training/cases.json` and one `.npz` per case
(inputs `in_*`, outputs `out_*`, float32/int64). Deterministic: same versions, same bytes (a
LoRA file whose content is unchanged is kept, since safetensors orders header metadata by hash).

Kinds:
- `density`: diffusers' compute_density_for_timestep_sampling with a seeded torch generator;
  `in_draws` are the raw draws (standard normal for logit_normal, uniform otherwise) replayed
  from the same seed, `out_u` the density values, then the script's lookup on a fresh scheduler:
  `out_indices = (u * 1000).long()`, `out_timesteps`, `out_sigmas`.
- `loss`: the script's loss from given `in_x0`, `in_noise`, `in_model_pred` (the raw transformer
  output) and `in_sigmas`: `out_noisy`, `out_target` (noise - x0), `out_weighting`, and for each
  of precondition_outputs on/off x prior preservation on/off: `out_loss_*`, `out_instance_*`,
  `out_prior_*`. Prior preservation splits prediction, target and weighting (the LoRA script's
  behaviour; the full fine-tune script forgets to split the weighting).
- `latents`: `(vae.encode(in_image).latent_dist.sample(generator) - shift) * scaling` on the
  sd3-tiny VAE; `in_eps` is the standard normal the sample used (replayed from the seed).
- `lora`: a fresh fixture pipeline, `load_lora_weights` of each file in `args.loads` (in order),
  then `set_adapters` if given: `out_sample` = transformer output on the `in_*` inputs;
  `out_base` = the same without LoRA; with `args.fuse`, `out_fused` after
  `fuse_lora(lora_scale=...)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline  # noqa: E402
from diffusers.training_utils import (  # noqa: E402
    _collate_lora_metadata,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from make_tiny_checkpoints import _quiet, load_pipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

log = logging.getLogger("training_cases")

SD3_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) % (2**31)


def _randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.numpy().astype(np.float32 if t.is_floating_point() else np.int64)


def _fresh_scheduler(fixtures: Path) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_pretrained(fixtures / "sd3-tiny", subfolder="scheduler")


def _get_sigmas(scheduler, timesteps: torch.Tensor, n_dim: int) -> torch.Tensor:
    # train_dreambooth_sd3.py's get_sigmas
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigma = scheduler.sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


# ---------------------------------------------------------------- density


DENSITY_PLAN = [
    ("density_uniform", dict(weighting_scheme="none")),
    ("density_logit_normal_0_1", dict(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0)),
    ("density_logit_normal_m05_s15", dict(weighting_scheme="logit_normal", logit_mean=-0.5, logit_std=1.5)),
    ("density_mode_129", dict(weighting_scheme="mode", mode_scale=1.29)),
]


def density_cases(fixtures: Path):
    batch = 64
    for name, kw in DENSITY_PLAN:
        seed = _seed(name)
        u = compute_density_for_timestep_sampling(
            batch_size=batch,
            generator=torch.Generator().manual_seed(seed),
            logit_mean=kw.get("logit_mean"),
            logit_std=kw.get("logit_std"),
            mode_scale=kw.get("mode_scale"),
            weighting_scheme=kw["weighting_scheme"],
        )
        g = torch.Generator().manual_seed(seed)
        if kw["weighting_scheme"] == "logit_normal":
            draws = torch.normal(mean=0.0, std=1.0, size=(batch,), generator=g)
        else:
            draws = torch.rand(size=(batch,), generator=g)
        scheduler = _fresh_scheduler(fixtures)
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices]
        sigmas = _get_sigmas(scheduler, timesteps, 1)
        density = {"none": "uniform"}.get(kw["weighting_scheme"], kw["weighting_scheme"])
        args = {
            "density": density,
            **{k: v for k, v in kw.items() if k != "weighting_scheme"},
            "batch_size": batch,
            "seed": seed,
            "scheduler": "sd3-tiny/scheduler (shift 3.0)",
        }
        yield (
            name,
            "density",
            "sd3-tiny",
            args,
            {
                "in_draws": _np(draws),
                "out_u": _np(u),
                "out_indices": _np(indices),
                "out_timesteps": _np(timesteps),
                "out_sigmas": _np(sigmas),
            },
        )


# ---------------------------------------------------------------- loss


def _script_loss(model_pred, target, weighting, prior: bool, prior_loss_weight: float):
    """The loss block of train_dreambooth_lora_sd3.py (weighting split under prior preservation)."""
    prior_loss = None
    if prior:
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
        prior_loss = torch.mean(
            (weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2).reshape(
                target_prior.shape[0], -1
            ),
            1,
        ).mean()
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1
    ).mean()
    instance = loss
    if prior:
        loss = loss + prior_loss_weight * prior_loss
    return loss, instance, prior_loss


def loss_cases(fixtures: Path):
    prior_loss_weight = 0.75
    for weighting_scheme in ("none", "sigma_sqrt", "cosmap"):
        name = f"loss_{weighting_scheme}"
        rng = _rng(name)
        x0, noise, pred = (_randn(rng, 4, 16, 8, 8) for _ in range(3))
        scheduler = _fresh_scheduler(fixtures)
        indices = torch.tensor([0, 300, 777, 999])
        timesteps = scheduler.timesteps[indices]
        sigmas = _get_sigmas(scheduler, timesteps, 4)
        model_input, noise_t = torch.from_numpy(x0), torch.from_numpy(noise)
        noisy = sigmas * noise_t + (1.0 - sigmas) * model_input
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
        arrays = {
            "in_x0": x0,
            "in_noise": noise,
            "in_model_pred": pred,
            "in_sigmas": _np(sigmas.flatten()),
            "out_noisy": _np(noisy),
            "out_target": _np(noise_t - model_input),
            "out_weighting": _np(weighting),
        }
        for precondition in (False, True):
            model_pred = torch.from_numpy(pred)
            if precondition:
                model_pred = model_pred * (-sigmas) + noisy
                target = model_input
            else:
                target = noise_t - model_input
            for prior in (False, True):
                loss, instance, prior_loss = _script_loss(
                    model_pred, target, weighting, prior, prior_loss_weight
                )
                tag = f"{'pre' if precondition else 'raw'}_{'prior' if prior else 'plain'}"
                arrays[f"out_loss_{tag}"] = _np(loss)
                arrays[f"out_instance_{tag}"] = _np(instance)
                if prior:
                    arrays[f"out_prior_{tag}"] = _np(prior_loss)
        args = {
            "weighting": weighting_scheme,
            "prior_loss_weight": prior_loss_weight,
            "note": "tags: raw|pre = precondition_outputs off|on; plain|prior = prior preservation "
            "off|on (batch halves [instance, class])",
        }
        yield name, "loss", None, args, arrays


# ---------------------------------------------------------------- latents


def latents_cases(fixtures: Path):
    vae = AutoencoderKL.from_pretrained(fixtures / "sd3-tiny", subfolder="vae", torch_dtype=torch.float32)
    name = "latents_sd3-tiny_h64w64"
    rng = _rng(name)
    image = rng.uniform(-1.0, 1.0, size=(2, 3, 64, 64)).astype(np.float32)
    seed = _seed(name)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(image)).latent_dist
        sample = dist.sample(generator=torch.Generator().manual_seed(seed))
        latents = (sample - vae.config.shift_factor) * vae.config.scaling_factor
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(seed))
    yield (
        name,
        "latents",
        "sd3-tiny",
        {"seed": seed, "shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor},
        {"in_image": image, "in_eps": _np(eps), "out_latents": _np(latents)},
    )


# ---------------------------------------------------------------- LoRA files written by diffusers


DIFFUSERS_LORAS = [
    # (name, fixture, LoraConfig kwargs, blocks, with metadata)
    ("diffusers_sd3-tiny_r4_alpha8_meta", "sd3-tiny", dict(r=4, lora_alpha=8), None, True),
    # the older script: no adapter metadata (alpha = rank), LoRA in blocks 0 and 2 only
    ("diffusers_sd3-tiny_r2_blocks02_nometa", "sd3-tiny", dict(r=2, lora_alpha=2), (0, 2), False),
    (
        "diffusers_sd35-tiny_r3_alpha6_patterns_meta",
        "sd35-tiny",
        dict(
            r=3,
            lora_alpha=6,
            rank_pattern={"transformer_blocks.1.attn.to_k": 2},
            alpha_pattern={"add_v_proj": 1.5},
        ),
        None,
        True,
    ),
]


def write_diffusers_loras(fixtures: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, fixture, kw, blocks, with_metadata in DIFFUSERS_LORAS:
        transformer = load_pipeline(fixtures / fixture).transformer
        targets = (
            SD3_TARGETS
            if blocks is None
            else [f"transformer_blocks.{b}.{m}" for b in blocks for m in SD3_TARGETS]
        )
        transformer.add_adapter(LoraConfig(init_lora_weights="gaussian", target_modules=targets, **kw))
        gen = torch.Generator().manual_seed(_seed(name))
        with torch.no_grad():
            for pname, param in sorted(transformer.named_parameters()):
                if ".lora_" in pname:
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        layers = get_peft_model_state_dict(transformer)
        metadata = _collate_lora_metadata({"transformer": transformer}) if with_metadata else {}
        for config in metadata.values():  # a set in peft's config; sorted so the file is reproducible
            config["target_modules"] = sorted(config["target_modules"])
        tmp = out / f".{name}"
        StableDiffusion3Pipeline.save_lora_weights(
            tmp, transformer_lora_layers=layers, weight_name=f"{name}.safetensors", **metadata
        )
        written, final = tmp / f"{name}.safetensors", out / f"{name}.safetensors"
        if final.is_file() and _same_content(written, final):
            written.unlink()  # safetensors orders header metadata by hash: keep the committed bytes
        else:
            written.replace(final)
        tmp.rmdir()
        log.info("wrote %s", out / f"{name}.safetensors")


def _same_content(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


# ---------------------------------------------------------------- LoRA parity cases


LORA_PLAN = [
    # (case, fixture, [(file stem, adapter name)], set_adapters or None, fuse lora_scale or None)
    (
        "lora_diffusers_sd3_r4_alpha8_meta",
        "sd3-tiny",
        [("diffusers_sd3-tiny_r4_alpha8_meta", "theirs")],
        None,
        1.0,
    ),
    (
        "lora_diffusers_sd3_r2_blocks02_nometa",
        "sd3-tiny",
        [("diffusers_sd3-tiny_r2_blocks02_nometa", "theirs")],
        None,
        None,
    ),
    (
        "lora_diffusers_sd35_r3_alpha6_patterns",
        "sd35-tiny",
        [("diffusers_sd35-tiny_r3_alpha6_patterns_meta", "theirs")],
        None,
        0.5,
    ),
    ("lora_ours_sd3_r4_alpha6", "sd3-tiny", [("ours_sd3-tiny_r4_alpha6", "ours")], None, 0.7),
    (
        "lora_ours_sd3_weight03",
        "sd3-tiny",
        [("ours_sd3-tiny_r4_alpha6", "ours")],
        {"adapter_names": ["ours"], "adapter_weights": [0.3]},
        None,
    ),
    (
        "lora_ours_sd35_r2_alpha3_blocks01",
        "sd35-tiny",
        [("ours_sd35-tiny_r2_alpha3_blocks01", "ours")],
        None,
        1.0,
    ),
    (
        "lora_two_adapters_sd3",
        "sd3-tiny",
        [("ours_sd3-tiny_r4_alpha6", "ours"), ("diffusers_sd3-tiny_r4_alpha8_meta", "theirs")],
        {"adapter_names": ["ours", "theirs"], "adapter_weights": [0.5, 1.5]},
        1.0,
    ),
]


@torch.no_grad()
def lora_cases(fixtures: Path, lora_dir: Path):
    for name, fixture, loads, set_adapters, fuse in LORA_PLAN:
        rng = _rng(name)
        pipe = load_pipeline(fixtures / fixture)
        cfg = pipe.transformer.config
        b = 2
        inputs = {
            "in_hidden_states": _randn(rng, b, cfg.in_channels, 16, 16),
            "in_encoder_hidden_states": _randn(rng, b, 24, cfg.joint_attention_dim),
            "in_pooled_projections": _randn(rng, b, cfg.pooled_projection_dim),
            "in_timestep": np.array([602.151, 250.0], dtype=np.float32),
        }

        def run(pipe=pipe, inputs=inputs) -> np.ndarray:
            return _np(
                pipe.transformer(
                    hidden_states=torch.from_numpy(inputs["in_hidden_states"]),
                    encoder_hidden_states=torch.from_numpy(inputs["in_encoder_hidden_states"]),
                    pooled_projections=torch.from_numpy(inputs["in_pooled_projections"]),
                    timestep=torch.from_numpy(inputs["in_timestep"]),
                    return_dict=False,
                )[0]
            )

        arrays = dict(inputs, out_base=run())
        for stem, adapter in loads:
            pipe.load_lora_weights(lora_dir / f"{stem}.safetensors", adapter_name=adapter)
        if set_adapters is not None:
            pipe.set_adapters(**set_adapters)
        arrays["out_sample"] = run()
        if fuse is not None:
            pipe.fuse_lora(lora_scale=fuse)
            arrays["out_fused"] = run()
        args = {
            "loads": [{"file": f"lora/{stem}.safetensors", "adapter_name": a} for stem, a in loads],
            "set_adapters": set_adapters,
            "fuse": None if fuse is None else {"lora_scale": fuse},
            "active_adapters": pipe.get_active_adapters(),
        }
        yield name, "lora", fixture, args, arrays


# ---------------------------------------------------------------- main


def _write_readme(folder: Path, index: list[dict], versions: dict[str, str]) -> None:
    body = __doc__.split("\n", 1)[1].strip()
    lines = ["# Training-math and LoRA references (diffusers/peft)", "", body, "", "## Files", ""]
    lines += [f"- `lora/{p.name}`" for p in sorted((folder / "lora").glob("*.safetensors"))]
    lines += ["", "## Cases", ""]
    lines += [f"- `{c['name']}` ({c['kind']})" for c in index]
    lines += ["", "## Versions", ""] + [f"- {k} {v}" for k, v in versions.items()]
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"), help="fixture root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet()
    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    start = time.time()
    fixtures = args.out
    folder = fixtures / "training"
    lora_dir = folder / "lora"
    missing = [
        stem
        for _, _, loads, _, _ in LORA_PLAN
        for stem, _ in loads
        if stem.startswith("ours_") and not (lora_dir / f"{stem}.safetensors").is_file()
    ]
    if missing:
        raise SystemExit(
            f"missing our LoRA files {sorted(set(missing))}: run "
            f".venv/bin/python -m tests.lora_recipe {lora_dir} first"
        )
    write_diffusers_loras(fixtures, lora_dir)
    for old in folder.glob("*.npz"):
        old.unlink()
    index = []
    for gen in (
        density_cases(fixtures),
        loss_cases(fixtures),
        latents_cases(fixtures),
        lora_cases(fixtures, lora_dir),
    ):
        for name, kind, fixture, case_args, arrays in gen:
            for key, arr in arrays.items():
                if not np.isfinite(arr).all():
                    raise RuntimeError(f"case {name}: {key} has non-finite values")
            np.savez(folder / f"{name}.npz", **arrays)
            index.append(
                {
                    "name": name,
                    "kind": kind,
                    "fixture": fixture,
                    "file": f"{name}.npz",
                    "args": case_args,
                    "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
                }
            )
            log.info("case %s", name)
    import diffusers
    import peft

    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
    }
    payload = {"versions": versions, "cases": index}
    (folder / "cases.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    _write_readme(folder, index, versions)
    log.info("wrote %d cases to %s in %.1fs", len(index), folder, time.time() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
