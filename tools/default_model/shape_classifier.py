"""An honest classifier of shape images: colour, background and shape read off the pixels.

- background: the mean of a 2-pixel border, white if its luminance is above mid-grey;
- foreground: pixels farther (max over channels) from the border's colour than half the
  foreground's contrast (an antialiased edge pixel counts when it is more than half covered),
  largest 4-connected component only, so specks do not move the bounding box;
- colour: the hue of the mean of the component's core pixels, nearest palette hue (the four
  training colours; ``colours=PALETTE`` adds orange, the DreamBooth subject);
- shape, strict: a geometric test on the component: ``fill`` = covered area / bounding-box area
  (square 1, circle pi/4, triangle 1/2; a pixel's coverage is its contrast relative to the
  shape's median contrast, so antialiased edges count in part and texture inside counts fully) and ``top_bottom`` = fill of the box's top half / bottom
  half (1 for square and circle, 1/3 for an apex-up triangle), each within a band, with a near-
  square box; anything else is ``"none"``;
- shape, lenient: the nearest of the three prototypes in (fill, top_bottom), never ``"none"``.

Validated on fresh generator samples (``python -m tools.default_model.shape_classifier --count 2000``
prints its accuracy per attribute; ``--colours orange`` on orange samples, read against all five
colours).
"""

from __future__ import annotations

import argparse
import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tools.default_model.shapes_data import COLOURS, PALETTE

_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in PALETTE.items()}
_PROTOTYPES = {"square": (1.0, 1.0), "circle": (np.pi / 4, 1.0), "triangle": (0.5, 1 / 3)}
_MIN_CONTRAST = 60.0  # below this no foreground is found (a blank or washed-out image)
_MIN_AREA = 16.0  # pixels; a smaller component is noise, not a shape


@dataclass(frozen=True)
class Reading:
    colour: str
    background: str
    shape: str  # strict: "circle", "square", "triangle" or "none"
    shape_lenient: str
    fill: float
    top_bottom: float
    aspect: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    label = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if label[y0, x0]:
            continue
        current += 1
        label[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


def _hue_name(rgb: np.ndarray, colours: Sequence[str]) -> str:
    hue = colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))[0] * 360
    return min(colours, key=lambda n: min(abs(hue - _HUES[n]), 360 - abs(hue - _HUES[n])))


def strict_shape(fill: float, top_bottom: float, aspect: float) -> str:
    if not 0.8 <= aspect <= 1.25:
        return "none"
    if fill >= 0.9 and 0.85 <= top_bottom <= 1.18:
        return "square"
    if 0.68 <= fill <= 0.87 and 0.8 <= top_bottom <= 1.25:
        return "circle"
    if 0.42 <= fill <= 0.62 and 0.2 <= top_bottom <= 0.5:
        return "triangle"
    return "none"


def lenient_shape(fill: float, top_bottom: float) -> str:
    return min(
        _PROTOTYPES,
        key=lambda s: (fill - _PROTOTYPES[s][0]) ** 2 + (min(top_bottom, 2.0) - _PROTOTYPES[s][1]) ** 2,
    )


def classify(image, colours: Sequence[str] = tuple(COLOURS)) -> Reading:
    """Read one RGB image (PIL or ``[H, W, 3]`` uint8); its colour is the nearest of ``colours``
    (names in ``shapes_data.PALETTE``)."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate(
        [
            rgb[:2].reshape(-1, 3),
            rgb[-2:].reshape(-1, 3),
            rgb[:, :2].reshape(-1, 3),
            rgb[:, -2:].reshape(-1, 3),
        ]
    )
    bg = border.mean(axis=0)
    background = "white" if float(bg @ np.array([0.299, 0.587, 0.114])) > 127.5 else "black"
    dist = np.abs(rgb - bg).max(axis=-1)
    contrast = float(np.percentile(dist, 99.5))
    if contrast < _MIN_CONTRAST:
        return Reading("none", background, "none", "none", 0.0, 0.0, 0.0)
    component = _largest_component(dist > contrast / 2)
    if component.sum() < _MIN_AREA:
        return Reading("none", background, "none", "none", 0.0, 0.0, 0.0)
    core = component & (dist > 0.75 * contrast)
    colour = _hue_name(rgb[core if core.any() else component].mean(axis=0), colours)
    rows, cols = np.nonzero(component)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    # Coverage of each box pixel relative to the shape's typical (median) contrast: antialiased
    # edges count fractionally (no 1-pixel bias in the area) and texture inside the shape counts
    # fully (texture is not geometry).
    level = float(np.median(dist[component]))
    coverage = np.clip(dist[y0:y1, x0:x1] / level, 0.0, 1.0) * component[y0:y1, x0:x1]
    h, w = y1 - y0, x1 - x0
    fill = float(coverage.sum() / (h * w))
    half = h // 2
    top, bottom = coverage[:half].mean(), coverage[h - half :].mean()
    top_bottom = float(top / bottom) if bottom > 0 else 0.0
    aspect = float(w / h)
    return Reading(
        colour,
        background,
        strict_shape(fill, top_bottom, aspect),
        lenient_shape(fill, top_bottom),
        fill,
        top_bottom,
        aspect,
    )


def accuracy(count: int, seed: int, colours: Sequence[str] = tuple(COLOURS)) -> dict:
    """Per-attribute accuracy on ``count`` fresh generator samples (seed not used in training) in
    ``colours``, read against the training colours plus ``colours``."""
    from tools.default_model.shapes_data import generate

    palette = tuple(dict.fromkeys([*COLOURS, *colours]))
    hits = {"colour": 0, "background": 0, "shape": 0, "shape_lenient": 0}
    for spec, image in generate(count, seed, colours):
        r = classify(image, palette)
        hits["colour"] += r.colour == spec.colour
        hits["background"] += r.background == spec.background
        hits["shape"] += r.shape == spec.shape
        hits["shape_lenient"] += r.shape_lenient == spec.shape
    return {k: v / count for k, v in hits.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The classifier's own accuracy on fresh generator samples.")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument(
        "--colours",
        default=",".join(COLOURS),
        help=f"comma-separated, of {list(PALETTE)} (default: {list(COLOURS)})",
    )
    args = p.parse_args(argv)
    print(accuracy(args.count, args.seed, tuple(args.colours.split(","))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
