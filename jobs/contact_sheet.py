"""Contact sheets: a grid of thumbnails with their prompts as captions (PIL's default font)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from sd3_core.storage import StorageOptions, join_url, normalize_url, read_bytes, write_bytes_atomic

log = logging.getLogger(__name__)

CONTACT_SHEET_NAME = "contact_sheet.png"


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes | bytearray):
        return Image.open(io.BytesIO(image)).convert("RGB")
    import numpy as np

    arr = np.asarray(image)
    if arr.dtype != np.uint8:  # floats in [0, 1], as the pipeline's output_type="np"
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    return Image.fromarray(arr[..., :3])


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px, at most `max_lines` lines (the last one ends in "..." when cut)."""

    def fits(s: str) -> bool:
        return draw.textlength(s, font=font) <= width

    lines: list[str] = []
    line = ""
    for word in " ".join(text.split()).split(" "):
        candidate = f"{line} {word}".strip()
        if fits(candidate):
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while not fits(line) and len(line) > 1:  # a word wider than the cell: split it
            lo, hi = 1, len(line)  # binary search the longest prefix that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(line[:mid]) else (lo, mid - 1)
            lines.append(line[:lo])
            line = line[lo:]
        if len(lines) > max_lines:
            break
    if line and len(lines) <= max_lines:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def contact_sheet(
    images_with_prompts: Iterable[tuple[Any, str]],
    columns: int = 4,
    thumb: int = 128,
    caption_lines: int = 3,
    padding: int = 4,
) -> Image.Image:
    """A grid of `thumb`-px thumbnails (PIL images, uint8/float arrays or encoded bytes), each with
    its prompt wrapped below it in at most `caption_lines` lines."""
    items = [(_to_pil(img), str(prompt or "")) for img, prompt in images_with_prompts]
    if columns < 1 or thumb < 8:
        raise ValueError("columns must be >= 1 and thumb >= 8")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), "Ag", font=font)
    line_h = bottom - top + 2
    cols = max(1, min(columns, len(items) or 1))
    rows = max(1, -(-len(items) // cols))
    cell_w, cell_h = thumb + 2 * padding, thumb + 2 * padding + caption_lines * line_h
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, prompt) in enumerate(items):
        x, y = (i % cols) * cell_w + padding, (i // cols) * cell_h + padding
        img = img.copy()
        img.thumbnail((thumb, thumb))
        sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        for j, line in enumerate(_wrap(draw, prompt, font, thumb, caption_lines)):
            draw.text((x, y + thumb + 2 + j * line_h), line, fill="black", font=font)
    return sheet


def write_contact_sheet(
    out: str,
    images_with_prompts: Iterable[tuple[str, str]],
    options: StorageOptions | None = None,
    limit: int = 16,
    **kwargs: Any,
) -> str | None:
    """Render the first `limit` (image URI, prompt) pairs to `{out}/contact_sheet.png` (atomically);
    images that cannot be read are skipped. None when there is nothing to show."""
    items = []
    for uri, prompt in images_with_prompts:
        if len(items) >= limit:
            break
        try:
            items.append((read_bytes(uri, options), prompt))
        except (OSError, ValueError) as e:
            log.warning("contact sheet: skipping %s: %s", uri, e)
    if not items:
        return None
    buf = io.BytesIO()
    contact_sheet(items, **kwargs).save(buf, format="PNG")
    url = join_url(normalize_url(out), CONTACT_SHEET_NAME)
    write_bytes_atomic(url, buf.getvalue(), options)
    return url
