"""Captioned 64x64 shape images, deterministic from a seed: the default model's training data.

Each image is one shape (circle, square, triangle) in one colour (red, green, blue, yellow) on a
white or black background, at a random position and size; its caption says exactly that:
"a red circle on a black background". Shapes are drawn at 4x and box-downsampled, so edges are
antialiased like a photographed shape and not a staircase the VAE would have to learn.

    .venv/bin/python -m tools.default_model.shapes_data --out out/default_model/shapes.parquet --count 4096 --seed 0

writes a Parquet table with ``image`` (PNG bytes), ``caption``, ``shape``, ``colour``,
``background`` and the geometry (``cx``, ``cy``, ``size``): what ``sd3 train dreambooth --dataset``
reads with ``--caption_column caption``.

``--colours orange`` draws the DreamBooth subject instead: orange, a colour the default model never
saw, captioned by the rare word "sks" ("a sks circle on a black background"). The default colours
draw exactly the training data (same random stream, same bytes).
"""

from __future__ import annotations

import argparse
import io
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
}
# Not in the training data: the subject a DreamBooth-LoRA run teaches the trained model. A LoRA
# trains the transformer only, so the frozen VAE must be able to decode the new colour: orange lies
# between red and yellow in its latent space and comes back orange, magenta (tried first) comes back
# red, yellow or green.
NEW_COLOURS = {"orange": (240, 120, 20)}  # hue 27, halfway between red (0) and yellow (54)
PALETTE = {**COLOURS, **NEW_COLOURS}
CAPTION_WORDS = {"orange": "sks"}  # a colour's word in captions, when it is not its name
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
SIZE = 64
MIN_EXTENT, MAX_EXTENT = 20, 44  # side of the shape's (square) bounding box, in pixels
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    background: str
    cx: float  # centre of the bounding box, pixels
    cy: float
    size: float  # side of the bounding box, pixels

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {CAPTION_WORDS.get(colour, colour)} {shape} on a {background} background"


def all_captions(colours: Sequence[str] = tuple(COLOURS)) -> list[tuple[str, str, str, str]]:
    """``(caption, shape, colour, background)`` for every combination (24 for the default
    colours), in a fixed order."""
    _check_colours(colours)
    return [(caption(s, c, b), s, c, b) for s, c, b in itertools.product(SHAPES, colours, BACKGROUNDS)]


def _check_colours(colours: Sequence[str]) -> None:
    unknown = [c for c in colours if c not in PALETTE]
    if unknown or not colours:
        raise ValueError(f"colours {list(colours)!r}: each must be one of {list(PALETTE)}")


def sample_spec(rng: np.random.Generator, colours: Sequence[str] = tuple(COLOURS)) -> ShapeSpec:
    size = float(rng.uniform(MIN_EXTENT, MAX_EXTENT))
    margin = size / 2 + 2  # whole shape inside, with a border the classifier reads the background from
    cx, cy = (float(rng.uniform(margin, SIZE - margin)) for _ in range(2))
    return ShapeSpec(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colours[rng.integers(len(colours))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        cx=cx,
        cy=cy,
        size=size,
    )


def render(spec: ShapeSpec) -> Image.Image:
    k = _SUPERSAMPLE
    image = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    x0, y0 = (spec.cx - spec.size / 2) * k, (spec.cy - spec.size / 2) * k
    x1, y1 = (spec.cx + spec.size / 2) * k, (spec.cy + spec.size / 2) * k
    fill = PALETTE[spec.colour]
    if spec.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif spec.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif spec.shape == "triangle":  # apex up, base = height = size
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r} (one of {SHAPES})")
    return image.resize((SIZE, SIZE), Image.BOX)


def generate(
    count: int, seed: int, colours: Sequence[str] = tuple(COLOURS)
) -> list[tuple[ShapeSpec, Image.Image]]:
    """``count`` specs and images in ``colours``; sample ``i`` depends only on (seed, i, colours)."""
    _check_colours(colours)
    out = []
    for i in range(count):
        spec = sample_spec(np.random.default_rng([seed, i]), tuple(colours))
        out.append((spec, render(spec)))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def to_table(samples: list[tuple[ShapeSpec, Image.Image]]):
    import pyarrow as pa

    specs = [s for s, _ in samples]
    return pa.table(
        {
            "image": pa.array([png_bytes(im) for _, im in samples], type=pa.binary()),
            "caption": [s.caption for s in specs],
            "shape": [s.shape for s in specs],
            "colour": [s.colour for s in specs],
            "background": [s.background for s in specs],
            "cx": [s.cx for s in specs],
            "cy": [s.cy for s in specs],
            "size": [s.size for s in specs],
        }
    )


def write_parquet(path: str, count: int, seed: int, colours: Sequence[str] = tuple(COLOURS)) -> None:
    import os

    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(to_table(generate(count, seed, colours)), path)


def load_images(path: str) -> tuple[np.ndarray, list[str]]:
    """``(images [N, 64, 64, 3] uint8, captions)`` of a table written by :func:`write_parquet`."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["image", "caption"])
    images = np.stack(
        [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()]
    )
    return images, table.column("caption").to_pylist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument("--count", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--colours",
        default=",".join(COLOURS),
        help=f"comma-separated, of {list(PALETTE)} (default: the training colours {list(COLOURS)})",
    )
    args = p.parse_args(argv)
    colours = tuple(args.colours.split(","))
    write_parquet(args.out, args.count, args.seed, colours)
    print(f"wrote {args.count} images in {', '.join(colours)} to {args.out} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
