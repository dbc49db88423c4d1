"""The artifacts' schemas: array names, dtypes, writers and readers of every per-image store.

One module, so a stage that writes a store and the stages that read it agree by construction
(the layouts are also described in docs/CONTRACT.md and docs/stores.md). Each store is an
:class:`pipeline.store.ImageStore` (one zip per image, zarr v3 inside); readers pass the
``(dtype, ndim)`` table so a group written by other tools is checked before it is used.

- ``sam_masks.zarr``: :data:`MASK_ARRAYS`, the fields of
  :class:`pipeline.sam.quasi_superpixels.QuasiSuperpixels`; attrs ``height``, ``width``.
- ``clip_features/train_views.zarr``: :data:`VIEWS_ARRAYS`: ``tokens`` (K, 1+g², D) f16, one
  chunk per view; ``views`` (K, 18) f32 (``pipeline.prompts.augment.ViewParams.to_array``);
  ``labels`` (C,) u8 multi-hot; attrs ``height``, ``width``.
- ``clip_features/inference.zarr``: :data:`INFERENCE_ARRAYS`: ``tokens`` (1+hw, D) f32,
  ``attention`` (hw, hw) f16; attrs ``height``, ``width`` (original), ``input_height``,
  ``input_width`` (what CLIP saw), ``grid_h``, ``grid_w``.
- ``cams/<which>.zarr``: :data:`CAM_ARRAYS`: ``cam`` (P, h, w) f32 raw, ``fg_cls`` (P,) i64
  ascending, ``cam_caa`` (P, h, w) f32 (only with CAA); attrs ``height``, ``width`` of the image.
- ``seeds/<which>/``: one palette PNG per image (:func:`seed_path`) and :data:`SEEDS_PROVENANCE`.

Every group also records the digest of its inputs (``with_inputs``), see
:mod:`pipeline.provenance`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.store import ImageStore, with_inputs, write_group

MASK_ARRAYS = {
    "masks": ("bool", 3), "levels": ("uint8", 1), "predicted_iou": ("float32", 1),
    "stability_score": ("float32", 1), "bbox_xywh": ("int64", 2), "point_coords": ("float64", 2),
    "crop_box_xywh": ("int64", 2),
}
"""(dtype, ndim) of the arrays of a ``sam_masks.zarr`` group: the fields of
:class:`pipeline.sam.quasi_superpixels.QuasiSuperpixels` (``to_arrays`` / ``from_arrays``)."""
VIEWS_STORE = "train_views.zarr"
INFERENCE_STORE = "inference.zarr"
VIEWS_ARRAYS = {"tokens": ("float16", 3), "views": ("float32", 2), "labels": ("uint8", 1)}
"""(dtype, ndim) of the arrays of a ``train_views.zarr`` group."""
INFERENCE_ARRAYS = {"tokens": ("float32", 2), "attention": ("float16", 2)}
"""(dtype, ndim) of the arrays of an ``inference.zarr`` group."""
CAM_ARRAYS = {"cam": ("float32", 3), "fg_cls": ("int64", 1), "cam_caa": ("float32", 3)}
"""(dtype, ndim) of the arrays of a CAM store's group (``cam_caa`` only with CAA)."""
CLIP_FEATURES_LAYOUT = 2
"""Version of the CLIP feature stores' layout (dtypes, chunking); part of their fingerprints so a
store written with another layout is rebuilt instead of resumed. 2: fp16 attention, one chunk per
view."""
SEEDS_PROVENANCE = "provenance.json"
"""Written beside the seed PNGs: where they came from, and whether any model was untrained."""


def open_masks(path: str | os.PathLike) -> ImageStore:
    return ImageStore(path, arrays=MASK_ARRAYS)


def open_views(features_dir: str | os.PathLike) -> ImageStore:
    return ImageStore(Path(features_dir) / VIEWS_STORE, arrays=VIEWS_ARRAYS)


def open_inference(features_dir: str | os.PathLike) -> ImageStore:
    return ImageStore(Path(features_dir) / INFERENCE_STORE, arrays=INFERENCE_ARRAYS)


def open_cams(path: str | os.PathLike) -> ImageStore:
    return ImageStore(path, arrays=CAM_ARRAYS)


def write_masks(store: str, image_id: str, qs, height: int, width: int,
                inputs: str | None = None, fingerprint: str | None = None) -> None:
    """One image's group of the ``sam_masks`` store (``qs``: a ``QuasiSuperpixels``).
    ``fingerprint`` (here and below): the store fingerprint the task computed for
    (``pipeline.store.write_group``)."""
    write_group(store, image_id, qs.to_arrays(),
                attrs=with_inputs({"height": height, "width": width}, inputs),
                fingerprint=fingerprint)


def write_views(store: str, image_id: str, tokens: np.ndarray, views: np.ndarray,
                labels: np.ndarray, height: int, width: int, inputs: str | None = None,
                fingerprint: str | None = None) -> None:
    """One image's group of ``train_views.zarr``: tokens (K, 1+g², D) as fp16, one chunk per view."""
    write_group(store, image_id, {
        "tokens": tokens.astype(np.float16),
        "views": views.astype(np.float32),
        "labels": labels,
    }, attrs=with_inputs({"height": height, "width": width}, inputs),
        chunks={"tokens": (1, *tokens.shape[1:])}, fingerprint=fingerprint)


def write_inference(store: str, image_id: str, tokens: np.ndarray, attention: np.ndarray,
                    attrs: dict, fingerprint: str | None = None) -> None:
    """One image's group of ``inference.zarr``: tokens as given (f32), attention as fp16."""
    write_group(store, image_id, {"tokens": tokens, "attention": attention.astype(np.float16)},
                attrs=attrs, fingerprint=fingerprint)


def write_cams(store: str, image_id: str, arrays: dict, height: int, width: int,
               inputs: str | None = None, fingerprint: str | None = None) -> None:
    """One image's group of a CAM store: ``cam``, ``fg_cls`` (and ``cam_caa``), image size."""
    write_group(store, image_id, arrays,
                attrs=with_inputs({"height": height, "width": width}, inputs),
                fingerprint=fingerprint)


def seed_path(seeds_dir: str | os.PathLike, image_id: str) -> Path:
    """The seed PNG of ``image_id`` in a seed folder."""
    return Path(seeds_dir) / f"{image_id}.png"
