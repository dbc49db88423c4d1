"""Training-view augmentation (algorithms.md §7) as a sampled, storable, re-appliable transform.

A view is drawn once (:func:`sample_view`), stored as a fixed-length float vector
(:meth:`ViewParams.to_array`) next to the cached CLIP features of that view, and later re-applied
to the coarse seed map of the same image (:func:`apply_view_label`) so that seeds line up with the
features the prompts are trained on. Geometry is shared by image and label; colour jitter only
touches the image.

Colour jitter follows the reference's OpenCV operations on uint8 (it works on BGR images; on our
RGB arrays the RGB conversion codes give the same values): brightness and contrast are
``cv2.convertScaleAbs`` of the raw values (``|a·x + b|`` rounded and saturated at 255, so a
darkening that would go below 0 comes back as its absolute value), saturation scales S in OpenCV's
8-bit HSV and hue shifts H in its 0–255 HSV_FULL scale, both through ``convertScaleAbs`` too:
they saturate at 255 (and reflect at 0) instead of wrapping around the hue circle.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
"""Colour-jitter operations, indexed 0..3 in ``ViewParams.jitter_order``."""

IGNORE_INDEX = 255
"""Label value used to pad a crop that is larger than the resized label."""


@dataclass(frozen=True)
class ViewParams:
    """Everything needed to replay one augmented view of an image."""

    jitter_order: tuple[int, int, int, int]
    """Order in which the four jitter operations run (a permutation of 0..3, see JITTER_OPS)."""
    jitter_apply: tuple[bool, bool, bool, bool]
    """Whether each operation (indexed as in JITTER_OPS, not by order) is applied."""
    brightness: float
    """Additive brightness offset on the 0–255 scale."""
    contrast: float
    """Factor multiplying the raw values (not around the mean: OpenCV ``convertScaleAbs``)."""
    saturation: float
    """Factor of S in OpenCV's 8-bit HSV."""
    hue: float
    """Offset of H on OpenCV's 0–255 (HSV_FULL) scale, saturating at the ends."""
    resize_hw: tuple[int, int]
    """Image size (h', w') after the random rescale."""
    crop_yx: tuple[int, int]
    """Top-left corner (y0, x0) of the crop in the resized image."""
    crop: int
    """Side of the square crop."""
    flip: bool
    """Horizontal flip after cropping."""

    ARRAY_LENGTH = 18

    def to_array(self) -> np.ndarray:
        """Fixed-length float64 vector (ARRAY_LENGTH,) for storage; inverse of :meth:`from_array`."""
        return np.array([*self.jitter_order, *self.jitter_apply, self.brightness, self.contrast,
                         self.saturation, self.hue, *self.resize_hw, *self.crop_yx, self.crop,
                         self.flip], dtype=np.float64)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> "ViewParams":
        a = np.asarray(arr, dtype=np.float64)
        if a.shape != (cls.ARRAY_LENGTH,):
            raise ValueError(f"view vector must have shape ({cls.ARRAY_LENGTH},), got {a.shape}")
        ints = [int(round(v)) for v in a]
        return cls(
            jitter_order=tuple(ints[0:4]), jitter_apply=tuple(bool(v) for v in ints[4:8]),
            brightness=float(a[8]), contrast=float(a[9]), saturation=float(a[10]), hue=float(a[11]),
            resize_hw=(ints[12], ints[13]), crop_yx=(ints[14], ints[15]), crop=ints[16],
            flip=bool(ints[17]),
        )


def sample_view(
    rng: np.random.Generator, image_hw: tuple[int, int],
    long_side_range: tuple[int, int] = (288, 480), crop: int = 224, flip_p: float = 0.5,
    jitter_p: float = 0.5, brightness: float = 25.0, contrast: tuple[float, float] = (0.6, 1.4),
    saturation: tuple[float, float] = (0.5, 1.5), hue: float = 25.0,
) -> ViewParams:
    """Draw one view of an image of size ``image_hw`` (H, W).

    ``long_side_range``: inclusive range of the target long side (VOC 288–480, COCO 318–530);
    the scale is ``max(target / long, crop / short)`` so the crop always fits. ``crop``: square
    crop side. ``flip_p``: probability of a horizontal flip. ``jitter_p``: probability of each
    colour operation, applied in a random order. ``brightness``: max |additive offset| on 0–255.
    ``contrast``/``saturation``: factor ranges. ``hue``: max |hue offset| on OpenCV's 0–255 hue
    scale. All four magnitudes are uniform floats, as the reference draws them.
    """
    height, width = image_hw
    order = tuple(int(i) for i in rng.permutation(len(JITTER_OPS)))
    apply = tuple(bool(v) for v in rng.random(len(JITTER_OPS)) < jitter_p)
    b = float(rng.uniform(-brightness, brightness))
    c = float(rng.uniform(*contrast))
    s = float(rng.uniform(*saturation))
    h = float(rng.uniform(-hue, hue))
    target = int(rng.integers(long_side_range[0], long_side_range[1] + 1))
    scale = max(target / max(height, width), crop / min(height, width))
    resized = (int(height * scale + 0.5), int(width * scale + 0.5))
    y0 = int(rng.integers(0, max(resized[0] - crop, 0) + 1))
    x0 = int(rng.integers(0, max(resized[1] - crop, 0) + 1))
    flip = bool(rng.random() < flip_p)
    return ViewParams(order, apply, b, c, s, h, resized, (y0, x0), crop, flip)


def _scale_abs(values: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """OpenCV's ``convertScaleAbs``: ``saturate_uint8(round(|alpha·x + beta|))``."""
    return cv2.convertScaleAbs(values, alpha=float(alpha), beta=float(beta))


def _saturation(img: np.ndarray, factor: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = _scale_abs(np.ascontiguousarray(hsv[..., 1]), factor, 0.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _hue(img: np.ndarray, delta: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] = _scale_abs(np.ascontiguousarray(hsv[..., 0]), 1.0, delta)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def color_jitter(image: np.ndarray, view: ViewParams) -> np.ndarray:
    """The view's colour jitter on an RGB uint8 image (H, W, 3); deterministic given ``view``."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    ops = {
        0: lambda im: _scale_abs(im, 1.0, view.brightness),
        1: lambda im: _scale_abs(im, view.contrast, 0.0),
        2: lambda im: _saturation(im, view.saturation),
        3: lambda im: _hue(im, view.hue),
    }
    for op in view.jitter_order:
        if view.jitter_apply[op]:
            img = ops[op](img)
    return img


def _crop_flip(arr: np.ndarray, view: ViewParams, fill: int) -> np.ndarray:
    y0, x0 = view.crop_yx
    out = arr[y0 : y0 + view.crop, x0 : x0 + view.crop]
    pad_h, pad_w = view.crop - out.shape[0], view.crop - out.shape[1]
    if pad_h or pad_w:
        pad = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (arr.ndim - 2)
        out = np.pad(out, pad, constant_values=fill)
    if view.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def apply_view_image(image: np.ndarray, view: ViewParams) -> np.ndarray:
    """(crop, crop, 3) uint8 view of an RGB uint8 image: jitter, bicubic resize, crop, flip."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    jittered = Image.fromarray(color_jitter(image, view))
    h, w = view.resize_hw
    resized = np.asarray(jittered.resize((w, h), Image.BICUBIC))
    return _crop_flip(resized, view, fill=0)


def apply_view_label(label: np.ndarray, view: ViewParams, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(crop, crop) uint8 view of a label map (H, W): nearest resize, same crop and flip.

    Parts of the crop outside the resized label are ``ignore_index``.
    """
    h, w = view.resize_hw
    lab = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    resized = np.asarray(lab.resize((w, h), Image.NEAREST))
    return _crop_flip(resized, view, fill=ignore_index)
