"""Training data: instance (and class) images with their prompts, preprocessed once, read in a seeded order.

Sources (every path an fsspec URL: local folder, file://, s3://):
- a folder or prefix of images plus one instance prompt (DreamBooth);
- a Parquet table with an image column (bytes, a ``{"bytes", "path"}`` struct as Hugging Face
  datasets write it, or a URI; relative URIs resolve against the table's folder) and a caption
  column (an empty caption falls back to the instance prompt).

As in diffusers' DreamBoothDataset, every entry (each of ``repeats`` copies of an image) is
resized (shorter side to ``resolution``, bilinear), flipped with probability 1/2 when
``random_flip`` and cropped (center, or at a random offset) once, up front; the draws are seeded
per entry, so they are the same in every run with the same seed. The order in which entries are
read is a seeded permutation per epoch: :meth:`SampleOrder.entry_at` maps a position in the
stream of samples to an entry, which is what makes a resumed run read exactly what the
uninterrupted one would have.

With prior preservation, the class images missing from ``class_data_dir`` are rendered first by
the base pipeline (:func:`generate_class_images`); :func:`load_training_data` assembles a run's data.
"""

from __future__ import annotations

import functools
import io
import logging
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from pipelines.training.config import TrainConfig
from sd3_core.storage import (
    StorageOptions,
    join_url,
    list_files,
    pyarrow_fs,
    read_bytes,
    split_url,
    write_bytes_atomic,
)

if TYPE_CHECKING:  # a type only: importing the pipeline loads Paddle
    from pipelines.stable_diffusion_3 import StableDiffusion3Pipeline

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Stream ids for np.random.default_rng([seed, STREAM, ...]): independent draws per purpose.
STREAM_TRANSFORM, STREAM_ORDER, STREAM_NOISE, STREAM_VAE, STREAM_CLASS_ORDER = 1, 2, 3, 4, 5
STREAM_LORA_INIT, STREAM_CAPTION = 6, 7


class TrainingDataError(ValueError):
    """The training data cannot be used; the message names the source and the fix."""


@dataclass(frozen=True)
class Entry:
    """One preprocessed training image (kept as HWC uint8, a quarter of float32's memory) and its prompt."""

    image: np.ndarray
    prompt: str
    source: str

    @property
    def pixels(self) -> np.ndarray:
        """CHW float32 in [-1, 1], the VAE's input."""
        return np.ascontiguousarray((self.image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1))


def rng_for(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """An independent generator for (seed, purpose, keys): no shared state to save or restore."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, stream, *(int(k) for k in keys)])


# ---- reading sources ---------------------------------------------------------------------------


def _open_image(data: bytes, source: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises several types for bad input
        raise TrainingDataError(f"{source}: not a readable image ({e})") from None
    return ImageOps.exif_transpose(image).convert("RGB")


def image_files(url: str, options: StorageOptions | None = None) -> list[str]:
    """Image files directly under a folder/prefix, sorted by name."""
    return [u for u in list_files(url, options) if u.lower().endswith(IMAGE_SUFFIXES)]


def read_image_folder(
    url: str, prompt: str, options: StorageOptions | None = None
) -> list[tuple[Image.Image, str, str]]:
    """``(image, prompt, source)`` for every image under ``url``."""
    files = image_files(url, options)
    if not files:
        raise TrainingDataError(
            f"instance data {url}: no images ({', '.join(IMAGE_SUFFIXES)}) directly in this folder/prefix"
        )
    return [(_open_image(read_bytes(f, options), f), prompt, f) for f in files]


def read_parquet_table(
    url: str,
    image_column: str = "image",
    caption_column: str | None = "caption",
    default_prompt: str | None = None,
    options: StorageOptions | None = None,
) -> list[tuple[Image.Image, str, str]]:
    """``(image, caption, source)`` per row of a Parquet file or dataset folder."""
    import pyarrow.parquet as pq

    fs, path = pyarrow_fs(url, options)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (OSError, ValueError) as e:
        raise TrainingDataError(f"dataset {url}: cannot read it as Parquet ({e})") from None
    names = table.column_names
    if image_column not in names:
        raise TrainingDataError(
            f"dataset {url}: no image column {image_column!r} (columns: {names}); pass --image_column"
        )
    if caption_column is not None and caption_column not in names:
        raise TrainingDataError(
            f"dataset {url}: no caption column {caption_column!r} (columns: {names}); pass --caption_column"
        )
    scheme, fs_path = split_url(url)
    base = (
        url
        if fs_path.endswith("/") or not fs_path.endswith(".parquet")
        else posixpath.dirname(url.rstrip("/"))
    )
    images = table.column(image_column).to_pylist()
    captions = table.column(caption_column).to_pylist() if caption_column else [None] * len(images)
    out = []
    for i, (value, caption) in enumerate(zip(images, captions, strict=True)):
        source = f"{url} row {i}"
        if isinstance(value, dict):  # Hugging Face datasets' Image feature
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            ref = value if "://" in value or value.startswith("/") else join_url(base, value)
            source = ref
            value = read_bytes(ref, options)
        if not isinstance(value, (bytes, bytearray)):
            raise TrainingDataError(
                f"{source}: column {image_column!r} holds {type(value).__name__}, not image bytes or a URI"
            )
        prompt = caption if caption else default_prompt
        if not prompt:
            raise TrainingDataError(f"{source}: empty caption and no --instance_prompt to fall back on")
        out.append((_open_image(bytes(value), source), prompt, source))
    if not out:
        raise TrainingDataError(f"dataset {url}: the table has no rows")
    return out


# ---- preprocessing -----------------------------------------------------------------------------


def preprocess(
    image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: np.random.Generator
) -> np.ndarray:
    """Resize the shorter side to ``resolution``, optionally flip, crop a square; HWC uint8."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.BILINEAR)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    w, h = image.size
    if center_crop:
        left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8)


def build_entries(
    items: list[tuple[Image.Image, str, str]],
    resolution: int,
    seed: int,
    center_crop: bool = False,
    random_flip: bool = False,
    repeats: int = 1,
) -> list[Entry]:
    """Entries for ``items`` repeated ``repeats`` times, each transformed once with its own draws."""
    if repeats < 1:
        raise TrainingDataError(f"repeats={repeats} must be >= 1")
    entries = []
    for image, prompt, source in items:
        for _ in range(repeats):
            rng = rng_for(seed, STREAM_TRANSFORM, len(entries))
            flip = random_flip and bool(rng.random() < 0.5)
            entries.append(Entry(preprocess(image, resolution, center_crop, flip, rng), prompt, source))
    return entries


# ---- the order -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleOrder:
    """Positions in the sample stream -> entries: epoch ``e`` reads a seeded permutation of
    ``length`` indices (diffusers' shuffled dataloader, with ``length = max(instances, class
    images)`` under prior preservation)."""

    length: int
    seed: int
    stream: int = STREAM_ORDER

    def epoch_of(self, position: int) -> int:
        return position // self.length

    def entry_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        return int(_permutation(self.length, self.seed, self.stream, epoch)[offset])


@functools.lru_cache(maxsize=4)
def _permutation(length: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    return rng_for(seed, stream, epoch).permutation(length)


def fingerprint(entries: list[Entry]) -> str:
    """A short hash of the preprocessed data (to refuse resuming onto different data)."""
    import hashlib

    h = hashlib.sha256()
    for e in entries:
        h.update(e.prompt.encode())
        h.update(np.ascontiguousarray(e.image).tobytes())
    return h.hexdigest()[:16]


def save_image(url: str, image: Image.Image, options: StorageOptions | None = None) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(url, buf.getvalue(), options)


# ---- a run's data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """A run's entries and the order it reads them in."""

    instances: list[Entry]
    classes: list[Entry]  # prior preservation's class images; empty without it
    order: SampleOrder
    fingerprint: str  # of the preprocessed data: a resumed run must find the same

    @property
    def length(self) -> int:
        """Entries per epoch: ``max(instances, class images)``."""
        return self.order.length


def load_training_data(config: TrainConfig, seed: int, pipe: StableDiffusion3Pipeline) -> TrainingData:
    """Read and preprocess the instance data and, with prior preservation, the class images
    (``pipe``, the base pipeline, renders the missing ones first)."""
    c = config
    if c.instance_data_dir is not None:
        items = read_image_folder(c.instance_data_dir, c.instance_prompt, c.storage)
    else:
        items = read_parquet_table(c.dataset, c.image_column, c.caption_column, c.instance_prompt, c.storage)
    instances = build_entries(items, c.resolution, seed, c.center_crop, c.random_flip, c.repeats)
    classes: list[Entry] = []
    if c.with_prior_preservation:
        generate_class_images(c, seed, pipe)
        class_items = read_image_folder(c.class_data_dir, c.class_prompt, c.storage)[: c.num_class_images]
        # Class entries get their own transform draws (offset keys), no repeats.
        classes = build_entries(class_items, c.resolution, seed + 1, c.center_crop, c.random_flip)
    order = SampleOrder(max(len(instances), len(classes)), seed)
    return TrainingData(instances, classes, order, fingerprint(instances + classes))


def generate_class_images(config: TrainConfig, seed: int, pipe: StableDiffusion3Pipeline) -> None:
    """Fill class_data_dir up to num_class_images with images ``pipe`` renders from the class
    prompt (before any training, so they are the prior)."""
    c = config
    have = len(image_files(c.class_data_dir, c.storage))
    missing = c.num_class_images - have
    if missing <= 0:
        return
    log.info("generating %d class images for %r into %s", missing, c.class_prompt, c.class_data_dir)
    done = 0
    while done < missing:
        n = min(c.sample_batch_size, missing - done)
        index = have + done
        images = pipe(
            prompt=[c.class_prompt] * n,
            height=c.resolution,
            width=c.resolution,
            num_inference_steps=c.class_inference_steps,
            seed=[seed * 100003 + index + k for k in range(n)],
            max_sequence_length=c.max_sequence_length,
        ).images
        for k, image in enumerate(images):
            save_image(join_url(c.class_data_dir, f"class-{index + k:05d}.png"), image, c.storage)
        done += n
