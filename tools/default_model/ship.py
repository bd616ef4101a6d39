"""Ship a trained shapes pipeline as the embedded default model (``jobs/default_model``).

    .venv/bin/python -m tools.default_model.ship --model out/default_model/model --to jobs/default_model

Copies the diffusers folder with the transformer's and the VAE's weights stored as float16 (half
the bytes; the pipeline computes in float32 on CPU either way, and the text encoders are left as
they are). The target is replaced whole: the new folder is written beside it and renamed in.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np

HALF_COMPONENTS = ("transformer", "vae")


def ship(model: str | os.PathLike, target: str | os.PathLike, dtype: str = "float16") -> Path:
    """Write ``model`` to ``target`` with the transformer and VAE weights in ``dtype``."""
    from sd3_core.safetensors_io import SafetensorsFile, write_safetensors

    model, target = Path(model), Path(target).resolve()
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    staging, old = target.with_name(target.name + ".new"), target.with_name(target.name + ".old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(model, staging, ignore=shutil.ignore_patterns(".*"))
    for component in HALF_COMPONENTS:
        for file in sorted((staging / component).glob("*.safetensors")):
            with SafetensorsFile(file) as sf:
                tensors = {k: np.array(sf.get(k)) for k in sf.keys()}
                metadata = dict(sf.metadata)
            tensors = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()}
            write_safetensors(file, tensors, metadata)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="trained pipeline folder (out/default_model/model)")
    p.add_argument("--to", default="jobs/default_model", help="where the default model lives")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    args = p.parse_args(argv)
    out = ship(args.model, args.to, args.dtype)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
