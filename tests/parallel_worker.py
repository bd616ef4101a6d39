"""One rank of the parallel tests (``python -m tests.parallel_worker SPEC``).

The rank joins a world of real gloo collectives, then, for every replica shape ``(cfg, mp)`` in
the spec, carves its replica out of the world (several replicas side by side when the world is
larger) and, for every model folder: loads its transformer shard, runs one forward on the spec's
inputs and generates each case's latents with its ``RankPipeline``. Outputs, collective counts
and parameter bytes go to ``out/rank<r>.npz`` / ``.json``.

Cases are pipeline arguments plus three markers :func:`case_arguments` turns into real ones
(the single-process references use it too): ``$lora`` (load the model folder's ``lora/``
adapter at that scale for the case), ``$embeds`` (the folder's ``embeds.npz`` as precomputed
prompt embeddings) and ``$callback`` (a name in :data:`CALLBACKS`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paddle

from pipelines.pipeline_loading import TEXT_COMPONENTS
from pipelines.rank_pipeline import RankPipeline
from pipelines.stable_diffusion_3 import StableDiffusion3Pipeline
from sd3_core import runtime
from sd3_core.collectives import init_world, leave_world, replica_groups
from sd3_core.tensor_parallel import load_transformer_shard, parameter_bytes


def halve_latents_at_step_0(pipe, i, t, tensors: dict) -> dict:
    assert set(tensors) == {"latents", "pooled_prompt_embeds"}, set(tensors)
    return {"latents": tensors["latents"] * 0.5} if i == 0 else {}


def lower_guidance_then_stop(pipe, i, t, tensors: dict) -> dict:
    """Call state set on rank 0 only: guidance 3 -> 1.5 from step 1, no step after step 1."""
    if i == 0:
        pipe._guidance_scale = 1.5
    if i == 1:
        pipe._interrupt = True
    return tensors


CALLBACKS = {"halve_at_step_0": halve_latents_at_step_0, "guidance_then_stop": lower_guidance_then_stop}


@contextlib.contextmanager
def case_arguments(pipe, folder: str | Path, case: dict) -> Iterator[dict]:
    """``case``'s pipeline arguments for ``pipe`` (see the module docstring); a LoRA loaded for
    the case is unloaded afterwards."""
    args = dict(case)
    scale = args.pop("$lora", None)
    if args.pop("$embeds", False):
        args.update({k: paddle.to_tensor(v) for k, v in np.load(Path(folder) / "embeds.npz").items()})
    if "$callback" in args:
        args["callback_on_step_end"] = CALLBACKS[args.pop("$callback")]
        args["callback_on_step_end_tensor_inputs"] = ("latents", "pooled_prompt_embeds")
    if scale is not None:
        pipe.load_lora_weights(Path(folder) / "lora", adapter_name="case", scale=scale)
    try:
        yield args
    finally:
        if scale is not None:
            pipe.unload_lora_weights()


def run_shape(groups, spec: dict, prefix: str, arrays: dict, report: dict) -> None:
    inputs = np.load(spec["inputs"])
    for name, folder in spec["models"].items():
        key = f"{prefix}/{name}"
        transformer = load_transformer_shard(folder, groups.mp_group, subfolder="transformer")
        report[key] = {"param_bytes": parameter_bytes(transformer)}
        groups.counter.reset()
        with paddle.no_grad():
            velocity = transformer(*(paddle.to_tensor(inputs[k]) for k in spec["input_names"])).sample
        report[key]["forward"] = groups.counter.snapshot()
        arrays[f"{key}/forward"] = velocity.numpy()
        share = spec["share_text_encoding"]
        # Sharing, only mp rank 0 of each half holds text encoders.
        no_encoders = dict.fromkeys(TEXT_COMPONENTS) if share and groups.mp_rank else {}
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=transformer, **no_encoders)
        pipe.set_progress_bar_config(disable=True)
        rank_pipe = RankPipeline.of(pipe, groups, share_within_mp=share)
        for case, case_args in spec["cases"].items():
            with case_arguments(rank_pipe, folder, case_args) as args:
                latents = rank_pipe(**args, output_type="latent").images
            stats = rank_pipe.last_stats
            report[key][case] = {name: stats[name] for name in ("encode_collectives", "denoise_collectives")}
            arrays[f"{key}/{case}"] = latents.numpy()
            if groups.rank == 0:
                arrays[f"{key}/{case}/images"] = rank_pipe.decode_latents(latents, "np")


def main(spec: dict) -> None:
    runtime.configure()
    rank = spec["rank"]
    world = init_world(rank, spec["endpoints"], "cpu")
    arrays: dict[str, np.ndarray] = {}
    report: dict = {}
    for cfg, mp in spec["shapes"]:
        run_shape(replica_groups(world, cfg, mp), spec, f"cfg{cfg}-mp{mp}", arrays, report)
    out = Path(spec["out"])
    np.savez(out / f"rank{rank}.npz", **arrays)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    leave_world()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
