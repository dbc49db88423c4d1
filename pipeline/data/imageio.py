"""Image and label-map I/O: RGB images whatever their mode, VOC-palette PNG label maps."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File extensions taken as images (custom datasets, ``predict --images``)."""


class ImageReadError(PipelineError, OSError):
    """An image file is missing or cannot be decoded."""


class ImageChangedError(ImageReadError):
    """An image file's bytes are not those the index recorded (edited after ``prepare``)."""


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, (n, 3) uint8 (bit-interleaved class index)."""
    palette = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


VOC_PALETTE = voc_palette()


def read_rgb(path: str | os.PathLike, digest: str | None = None) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB; grayscale, palette and RGBA are converted.

    ``digest``: the image's :func:`image_digest` as the index recorded it. The bytes read are then
    hashed and decoded (one read), and bytes that differ raise :class:`ImageChangedError`: a
    per-image artifact records the index's digest as what it was computed from, so it must never
    be computed from another version of the file (one edited after ``prepare``, or a change
    DVC's inode/mtime cache did not see)."""
    import io

    if digest is None:
        return _decode_rgb(path, path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ImageReadError(f"image file not found: {path}") from exc
    except OSError as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
    found = image_digest(data)
    if found != digest:
        raise ImageChangedError(
            f"{path} changed after the index was made (content digest {found}, the index "
            f"says {digest}): rerun `wsss prepare` (`dvc repro` does), then this stage")
    return _decode_rgb(io.BytesIO(data), path)


def _decode_rgb(source, name) -> np.ndarray:
    try:
        with Image.open(source) as im:
            im.load()
            if im.mode == "RGBA" or (im.mode == "P" and "transparency" in im.info):
                # Composite on black rather than dropping alpha blindly.
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(background, im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError as exc:
        raise ImageReadError(f"image file not found: {name}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image {name}: {exc}") from exc


def image_size(path, name: str | os.PathLike | None = None) -> tuple[int, int]:
    """(H, W) of an image (a path or a binary file object, named ``name`` in errors) after
    decoding all of it (``verify()`` alone passes truncated JPEGs, which then fail in the first
    stage that reads their pixels)."""
    name = path if name is None else name
    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
            return h, w
    except FileNotFoundError as exc:
        raise ImageReadError(f"image file not found: {name}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image {name}: {exc}") from exc


def image_digest(data: bytes) -> str:
    """Content digest of an image file (SHA-256 of its bytes, 32 hex digits): what every
    per-image artifact records it was computed from (pipeline/store.py, ``inputs``)."""
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]


def image_size_and_digest(path: str | os.PathLike) -> tuple[int, int, str]:
    """(H, W, :func:`image_digest`) of an image file, read once and decoded fully."""
    import io

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ImageReadError(f"image file not found: {path}") from exc
    except OSError as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
    h, w = image_size(io.BytesIO(data), name=path)
    return h, w, image_digest(data)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label map PNG as (H, W) uint8 class indices (palette indices, not colours)."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ImageReadError(f"label map {path} has mode {im.mode}; expected indices (P or L)")
        return np.asarray(im, dtype=np.uint8).copy()


def write_palette_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write (H, W) uint8 indices as a VOC-palette PNG, atomically (temp file, then rename)."""
    label = np.asarray(label)
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label map must be (H, W) uint8, got {label.dtype} {label.shape}")
    im = Image.fromarray(label, mode="P")
    im.putpalette(VOC_PALETTE.tobytes())
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
