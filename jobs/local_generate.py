"""Single-process generation: prompts (from the command line or a Parquet table) to PNG files.

This is the in-process path of `sd3 generate`; it writes each image atomically (temporary file,
then rename), so an interrupted run never leaves a half-written PNG under its final name.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class PromptRow:
    """One row of work: an id, the prompts, and any per-row overrides."""

    id: str
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None


def safe_id(value: str) -> str:
    """`value` if it is a safe file-name stem, else a readable prefix plus a hash (never a raw path)."""
    if _SAFE_ID.match(value) and ".." not in value:
        return value
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", value)[:40].strip("._-") or "id"
    return f"{stem}-{digest}"


def row_seed(job_seed: int, row_id: str) -> int:
    """A stable per-row seed derived from (job seed, id), so a rerun makes the same image."""
    digest = hashlib.sha256(f"{job_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def read_prompt_table(path: str) -> list[PromptRow]:
    """Rows of a Parquet prompt table (`prompt` required; `id`, `negative_prompt`, `seed` optional)."""
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise FileNotFoundError(f"--prompts {path}: no such file or directory")
    table = pq.read_table(path)
    if "prompt" not in table.column_names:
        raise ValueError(
            f"--prompts {path}: the table has no `prompt` column (columns: {table.column_names})"
        )
    data = table.to_pydict()
    rows = []
    for i, prompt in enumerate(data["prompt"]):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"--prompts {path}: row {i} has an empty or null `prompt`")
        row_id = str(data["id"][i]) if "id" in data and data["id"][i] is not None else f"row{i:06d}"
        negative = data.get("negative_prompt", [None] * len(data["prompt"]))[i]
        seed = data.get("seed", [None] * len(data["prompt"]))[i]
        rows.append(PromptRow(row_id, prompt, negative, None if seed is None else int(seed)))
    return rows


def write_png_atomic(image: object, path: str) -> None:
    """Save a PIL image so that `path` only ever holds a complete file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def generate_to_folder(
    rows: Iterable[PromptRow],
    output: str,
    model: str = DEFAULT_MODEL,
    *,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 28,
    guidance_scale: float = 7.0,
    num_images: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    max_sequence_length: int | None = None,
) -> list[str]:
    """Generate `num_images` PNGs per row into `{output}/images/{id}_{k}.png`; returns the paths written."""
    from pipelines import StableDiffusion3Pipeline

    rows = list(rows)
    pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    images_dir = os.path.join(output, "images")
    os.makedirs(images_dir, exist_ok=True)
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    written = []
    for n, row in enumerate(rows, 1):
        base = row.seed if row.seed is not None else row_seed(seed, row.id)
        seeds = [base + k for k in range(num_images)]
        result = pipe(
            row.prompt,
            negative_prompt=row.negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images,
            seed=seeds,
            **extra,
        )
        for k, image in enumerate(result.images):
            path = os.path.join(images_dir, f"{safe_id(row.id)}_{k}.png")
            write_png_atomic(image, path)
            written.append(path)
        print(f"[{n}/{len(rows)}] {row.id}: {row.prompt[:60]!r}", file=sys.stderr)
    return written
