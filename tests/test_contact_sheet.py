"""jobs.contact_sheet: grid geometry, captions, inputs of every kind, writing to storage."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from jobs.contact_sheet import CONTACT_SHEET_NAME, contact_sheet, write_contact_sheet
from sd3_core.storage import read_bytes, write_bytes_atomic
from tests.s3_server import make_bucket, storage_options


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_grid_geometry_and_inputs():
    items = [
        (Image.new("RGB", (64, 64), "red"), "a red square"),
        (np.full((64, 64, 3), 0.5, np.float32), "a float array"),
        (np.zeros((32, 64, 3), np.uint8), "a wide uint8 array"),
        (png((0, 0, 255)), "encoded PNG bytes"),
        (np.zeros((16, 16), np.uint8), None),
    ]
    sheet = contact_sheet(items, columns=2, thumb=64, caption_lines=2, padding=4)
    cell_w = 64 + 8
    assert sheet.width == 2 * cell_w
    assert sheet.height % 3 == 0 and sheet.height > 3 * cell_w  # 3 rows with captions below
    assert sheet.getpixel((4 + 32, 4 + 32)) == (255, 0, 0)  # first thumbnail in the first cell
    assert sheet.getpixel((cell_w + 4 + 32, 4 + 32)) == (128, 128, 128)
    # The caption area under the first image has dark (text) pixels.
    caption = np.asarray(sheet.crop((4, 4 + 64, 4 + 64, sheet.height // 3)))
    assert caption.min() < 100


def test_long_prompts_are_wrapped_and_clipped():
    long = "word " * 200 + "x" * 500
    sheet = contact_sheet([(png((0, 255, 0)), long)], columns=4, thumb=48, caption_lines=3)
    assert sheet.width == 48 + 8  # one column when there is one image
    single = contact_sheet([(png((0, 255, 0)), "short")], thumb=48, caption_lines=3)
    assert sheet.size == single.size  # captions never grow the cell


def test_empty_and_bad_arguments():
    assert contact_sheet([], thumb=32).size[0] > 0
    with pytest.raises(ValueError):
        contact_sheet([(png((1, 1, 1)), "x")], columns=0)


def test_write_contact_sheet_local_and_s3(tmp_path, s3_endpoint):
    out = str(tmp_path)
    write_bytes_atomic(f"{out}/images/a_0.png", png((255, 0, 0)))
    write_bytes_atomic(f"{out}/images/b_0.png", png((0, 255, 0)))
    items = [
        (f"{out}/images/a_0.png", "red"),
        (f"{out}/images/missing.png", "gone"),
        (f"{out}/images/b_0.png", "green"),
    ]
    url = write_contact_sheet(out, items, thumb=32, columns=4)
    assert url == f"{out}/{CONTACT_SHEET_NAME}"
    img = Image.open(io.BytesIO(read_bytes(url)))
    assert img.width == 2 * (32 + 8)  # the missing image was skipped
    assert write_contact_sheet(out, items, limit=1, thumb=32) == url
    assert Image.open(io.BytesIO(read_bytes(url))).width == 32 + 8
    assert write_contact_sheet(str(tmp_path / "none"), []) is None

    opts = storage_options(s3_endpoint)
    bucket = make_bucket(s3_endpoint)
    s3out = f"s3://{bucket}/run"
    write_bytes_atomic(f"{s3out}/images/a_0.png", png((0, 0, 255)), opts)
    url = write_contact_sheet(s3out, [(f"{s3out}/images/a_0.png", "blue")], opts, thumb=32)
    assert url == f"{s3out}/contact_sheet.png"
    assert Image.open(io.BytesIO(read_bytes(url, opts))).getpixel((4 + 16, 4 + 16)) == (0, 0, 255)


def test_wrap():
    from PIL import ImageDraw, ImageFont

    from jobs.contact_sheet import _wrap

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = ImageFont.load_default()
    assert _wrap(draw, "a  cat\n", font, 100, 3) == ["a cat"]
    assert _wrap(draw, "", font, 100, 3) == []
    lines = _wrap(draw, "one two three four five six seven eight nine ten", font, 40, 10)
    assert " ".join(lines) == "one two three four five six seven eight nine ten"
    assert all(draw.textlength(x, font=font) <= 40 for x in lines)
    clipped = _wrap(draw, "word " * 100, font, 40, 2)
    assert len(clipped) == 2 and clipped[-1].endswith("...")
    split = _wrap(draw, "x" * 200, font, 40, 3)
    assert len(split) == 3 and all(draw.textlength(x, font=font) <= 40 for x in split)
