"""Peak memory of baking a LoRA into the transformer: ``fuse_lora`` + ``unload_lora`` (diffusers'
way, which keeps every targeted weight's pre-fuse copy until the unload) against ``bake_lora``
(what batch-job replicas use: one layer at a time, no copies).

Each method runs in its own subprocess on the same model: an SD3-medium-width transformer (hidden
1536, 24 heads x 64) with ``--layers`` blocks in ``--dtype``, and a rank-``--rank`` adapter on
diffusers' default targets. Prints, per method, the peak resident memory the bake added over the
loaded model (VmHWM, reset after loading; Linux), and the ratio.

    python benchmarks/lora_bake_memory.py [--layers 4] [--rank 16] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(method: str, layers: int, rank: int, dtype: str) -> dict:
    """In this process: build the model and adapter, then bake with ``method``; memory in MiB."""
    sys.path.insert(0, ROOT)
    from sd3_core import runtime

    runtime.configure()

    import paddle

    from sd3_core import lora
    from sd3_core.transformer import SD3Transformer2DModel

    paddle.seed(0)
    model = SD3Transformer2DModel(
        num_layers=layers, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, sample_size=128,
    )  # fmt: skip
    model.to(dtype=dtype)
    lora.inject_lora(model, "job", rank=rank)
    lora.random_lora_weights(model, "job", seed=0, std=0.02)
    targeted = sum(
        layer.weight.numel().item() * layer.weight.element_size() for _, layer in lora.lora_layers(model)
    )

    def status(key: str) -> float:  # MiB, from the kB figures in /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS: the building's peak is forgotten
    before = status("VmRSS")
    if method == "bake_lora":
        lora.bake_lora(model)
    else:
        lora.fuse_lora(model)
        lora.unload_lora(model)
    return {"targeted_mib": targeted / 2**20, "added_peak_mib": status("VmHWM") - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # the subprocess side
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args.layers, args.rank, args.dtype)))
        return
    results = {}
    for method in ("fuse_lora+unload_lora", "bake_lora"):
        out = subprocess.run(
            [sys.executable, __file__, "--method", method, "--layers", str(args.layers), "--rank", str(args.rank),
             "--dtype", args.dtype],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        results[method] = json.loads(out.strip().splitlines()[-1])
    targeted = results["bake_lora"]["targeted_mib"]
    print(f"{args.layers} blocks at SD3-medium width, {args.dtype}, rank {args.rank}: "
          f"targeted weights {targeted:.0f} MiB")  # fmt: skip
    for method, r in results.items():
        print(f"{method:>22}: peak +{r['added_peak_mib']:.0f} MiB while baking")
    base, ours = results["fuse_lora+unload_lora"]["added_peak_mib"], results["bake_lora"]["added_peak_mib"]
    print(f"ratio bake_lora / fuse+unload: {ours / max(base, 1e-9):.2f}")


if __name__ == "__main__":
    main()
