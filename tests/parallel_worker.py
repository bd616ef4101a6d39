"""One rank of the parallel tests (``python -m tests.parallel_worker SPEC``).

The rank joins a world of real gloo collectives, then, for every replica shape ``(cfg, mp)`` in
the spec, carves its replica out of the world (several replicas side by side when the world is
larger) and, for every model folder: loads its transformer shard, runs one forward on the spec's
inputs and generates each case's latents with the CFG-split helper. Outputs, collective counts
and parameter bytes go to ``out/rank<r>.npz`` / ``.json``.
"""

from __future__ import annotations

import sd3_core.runtime  # noqa: F401  (must precede paddle's import)

import json
import sys
from pathlib import Path

import numpy as np
import paddle

from pipelines import StableDiffusion3Pipeline
from pipelines.parallel_denoise import cfg_parallel_latents
from sd3_core.collectives import init_world, leave_world, replica_groups
from sd3_core.tensor_parallel import load_transformer_shard, parameter_bytes

_TEXT_COMPONENTS = (
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
)


def run_shape(groups, spec: dict, prefix: str, arrays: dict, report: dict) -> None:
    inputs = np.load(spec["inputs"])
    for name, folder in spec["models"].items():
        key = f"{prefix}/{name}"
        transformer = load_transformer_shard(folder, groups.mp_group, subfolder="transformer")
        report[key] = {"param_bytes": parameter_bytes(transformer)}
        groups.counter.reset()
        with paddle.no_grad():
            velocity = transformer(*(paddle.to_tensor(inputs[k]) for k in spec["input_names"]))
        report[key]["forward"] = groups.counter.snapshot()
        arrays[f"{key}/forward"] = velocity.numpy()
        share = spec["share_text_encoding"]
        # Sharing, only mp rank 0 of each half holds text encoders.
        no_encoders = dict.fromkeys(_TEXT_COMPONENTS) if share and groups.mp_rank else {}
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=transformer, **no_encoders)
        for case, args in spec["cases"].items():
            groups.counter.reset()
            with paddle.no_grad():
                latents = cfg_parallel_latents(pipe, groups, **args, share_within_mp=share)
            report[key][case] = groups.counter.snapshot()
            arrays[f"{key}/{case}"] = latents.numpy()
            if groups.rank == 0:
                arrays[f"{key}/{case}/images"] = pipe.decode_latents(latents, "np")


def main(spec: dict) -> None:
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
