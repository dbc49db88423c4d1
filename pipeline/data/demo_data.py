"""The embedded demo dataset: deterministic synthetic images of a few named shape classes.

Each image has a textured background and one to three objects of one or two classes; the label
map is VOC-style (0 background, c+1 class c, 255 on a one-pixel band around each object, as VOC
marks uncertain boundaries). Everything derives from (seed, index), so two machines generate
byte-identical data.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

DEMO_CLASSES = ("ball", "box", "kite", "ring")

# Per-class base colour (RGB); objects get a per-image jitter around it.
_CLASS_RGB = np.array([[220, 60, 50], [60, 90, 220], [240, 200, 40], [60, 200, 90]], np.int32)


def _shape_mask(kind: int, h: int, w: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    if kind == 0:  # ball: disk
        return dx * dx + dy * dy <= r * r
    if kind == 1:  # box: rotated square
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind == 2:  # kite: rotated diamond, taller than wide
        return np.abs(u) / (0.7 * r) + np.abs(v) / (1.2 * r) <= 1.0
    rr = dx * dx + dy * dy  # ring: annulus
    return (rr <= r * r) & (rr >= (0.55 * r) ** 2)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.integers(60, 190, size=3).astype(np.float32)
    tilt = rng.normal(0, 0.4, size=(2, 3)).astype(np.float32)
    img = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1]
    period = rng.uniform(6, 18)
    stripes = np.sin((xx * np.cos(rng.uniform(0, np.pi)) + yy) / period * 2 * np.pi)
    img += stripes[..., None] * rng.uniform(5, 20)
    img += rng.normal(0, 8, size=(h, w, 3))
    return img


def render_demo_image(seed: int, index: int, classes: int = len(DEMO_CLASSES)) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 and label map (H, W) uint8 number ``index`` of the demo set."""
    rng = np.random.default_rng([seed, index])
    h, w = (int(v) for v in rng.integers(6, 11, size=2) * 16 - rng.integers(0, 9, size=2))
    image = _background(rng, h, w)
    label = np.zeros((h, w), np.uint8)
    present = rng.choice(classes, size=int(rng.integers(1, 3)), replace=False)
    n_objects = int(rng.integers(len(present), 4))
    owners = np.concatenate([present, rng.choice(present, size=n_objects - len(present))])
    for c in owners:
        r = rng.uniform(0.14, 0.26) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        mask = _shape_mask(int(c) % 4, h, w, cy, cx, r, rng.uniform(0, np.pi))
        colour = _CLASS_RGB[int(c) % len(_CLASS_RGB)] + rng.integers(-25, 26, size=3)
        shade = 1.0 + 0.15 * np.sin(np.mgrid[0:h, 0:w][1] / (r / 2 + 1))[..., None]
        image[mask] = (colour * shade)[mask]
        label[mask] = int(c) + 1
    band = ndimage.binary_dilation(label > 0, iterations=1) & ~ndimage.binary_erosion(label > 0, iterations=1)
    label[band] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label
