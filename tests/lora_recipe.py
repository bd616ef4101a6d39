"""The LoRA files our code writes for the diffusers parity fixtures (tests/fixtures/training/lora/ours_*).

Each is fully determined by its recipe (NumPy-seeded weights), so a test can rebuild it and
require the committed bytes. The reference generator (tools/reference/training_cases.py) loads
the committed files in diffusers and records the transformer outputs. Rewrite them with

    .venv/bin/python -m tests.lora_recipe tests/fixtures/training/lora
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from sd3_core import lora, lora_file
from sd3_core.transformer import SD3Transformer2DModel

FIXTURES = Path(__file__).parent / "fixtures"
# A diffusers-format sd3-tiny LoRA of rank 2 without metadata (alpha = rank when read alone).
PEFT_SOURCE = FIXTURES / "training" / "lora" / "diffusers_sd3-tiny_r2_blocks02_nometa.safetensors"


def peft_folder(folder: Path, alpha: int) -> Path:
    """peft's save_pretrained layout of PEFT_SOURCE: adapter_model.safetensors + adapter_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEFT_SOURCE, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": alpha})
    )
    return folder


OUR_LORAS = {
    # all diffusers default targets in every block; alpha != rank so the metadata must carry it
    "ours_sd3-tiny_r4_alpha6": dict(
        fixture="sd3-tiny", rank=4, alpha=6, targets=lora.DEFAULT_TARGETS, blocks=None, seed=1234
    ),
    # suffix targets that also hit SD3.5's attn2, restricted to blocks 0 and 1
    "ours_sd35-tiny_r2_alpha3_blocks01": dict(
        fixture="sd35-tiny",
        rank=2,
        alpha=3,
        targets=("to_q", "to_k", "to_v", "to_out.0"),
        blocks=(0, 1),
        seed=99,
    ),
}


def build_our_lora(name: str) -> SD3Transformer2DModel:
    """The fixture transformer with the recipe's adapter (named "default") injected and filled."""
    recipe = OUR_LORAS[name]
    model = SD3Transformer2DModel.from_pretrained(FIXTURES / recipe["fixture"], subfolder="transformer")
    lora.inject_lora(model, "default", recipe["rank"], recipe["alpha"], recipe["targets"], recipe["blocks"])
    lora.random_lora_weights(model, "default", seed=recipe["seed"])
    return model


def write_our_lora(name: str, folder: str | Path) -> Path:
    return lora_file.save_lora_weights(folder, build_our_lora(name), weight_name=f"{name}.safetensors")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else FIXTURES / "training" / "lora")
    for recipe_name in OUR_LORAS:
        print(write_our_lora(recipe_name, out))
