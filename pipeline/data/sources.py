"""Index builders of the dataset layouts: a dataset tree -> :class:`SplitIndex` (ids, sizes, labels).

Layouts (``dataset.name``, see :mod:`pipeline.data.registry`):
- ``voc``: PASCAL VOC 2012 + SBD: ``JPEGImages/<id>.jpg``, ``SegmentationClassAug/<id>.png``,
  ``ImageSets/SegmentationAug/<split>.txt``; labels derived from the masks.
- ``coco``: MS COCO 2014: ``images/<split>2014/<id>.jpg``, ``masks/<split>2014/<id>.png``
  (81 labels: 0 background, 1..80), optional ``<split>.txt`` id lists; labels from the masks.
- ``custom``: ``images/<id>.<ext>``, a labels file (CSV or JSON: id -> class names), a class list,
  optional ``masks/<id>.png`` and ``splits/<split>.txt`` (default: every labelled image).
- the demo's world registers itself (``pipeline/demo/registry.py``): generated in the VOC layout.

Every image is decoded fully while indexing (its size and content digest are recorded), so a
broken file fails here, naming its id, or is recorded as skipped (``dataset.on_bad_image``).
``progress`` wraps an iterable (``progress(items, desc=...)``: the stage passes tqdm); the default
shows nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from pipeline.data.datasets import (
    COCO_CLASSES,
    VOC_CLASSES,
    DatasetError,
    Record,
    SplitIndex,
    labels_from_mask,
    parse_class_list,
    parse_labels_file,
)
from pipeline.data.imageio import IMAGE_EXTS, ImageReadError, image_size_and_digest, read_label
from pipeline.data.registry import dataset_source
from pipeline.registry import resolve
from pipeline.errors import PipelineError
from pipeline.params import DatasetConfig

# prepare's logger: the warnings below are part of its log.
log = logging.getLogger("wsss.prepare")

Progress = Callable[..., Iterable]


def no_progress(items: Iterable, desc: str | None = None) -> Iterable:
    return items


def check_image(image_id: str, path: Path, cfg: DatasetConfig) -> tuple[int, int, str | None, str | None]:
    """(H, W, error, content digest) of one image, decoded fully."""
    try:
        h, w, digest = image_size_and_digest(path)
        return h, w, None, digest
    except ImageReadError as exc:
        if cfg.on_bad_image == "fail":
            raise PipelineError(f"image {image_id}: {exc} (set dataset.on_bad_image: skip to record and go on)") from exc
        log.warning("skipping image %s: %s", image_id, exc)
        return 0, 0, str(exc), None


def records_from_masks(ids, image_of, mask_of, n_classes, cfg, desc, progress: Progress = no_progress) -> list[Record]:
    records = []
    for image_id in progress(ids, desc=desc):
        image_path, mask_path = image_of(image_id), mask_of(image_id)
        h, w, error, digest = check_image(image_id, image_path, cfg)
        labels: tuple[int, ...] = ()
        if error is None:
            if not mask_path.is_file():
                raise PipelineError(f"image {image_id}: ground-truth mask not found: {mask_path}")
            mask = read_label(mask_path)
            if mask.shape != (h, w):
                raise PipelineError(f"image {image_id}: mask {mask_path} is {mask.shape}, image is {(h, w)}")
            labels = labels_from_mask(mask, n_classes)
        records.append(Record(image_id, str(image_path), str(mask_path), h, w, labels, error, digest))
    return records


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise PipelineError(f"split list not found: {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    # SBD-style lists may hold "/JPEGImages/x.jpg /SegmentationClassAug/x.png" pairs.
    return [Path(i).stem for i in ids]


def voc_split(root: Path, split: str, cfg: DatasetConfig, progress: Progress = no_progress,
              class_names=VOC_CLASSES, dataset="voc") -> SplitIndex:
    ids = read_ids(root / "ImageSets" / "SegmentationAug" / f"{split}.txt")
    records = records_from_masks(
        ids, lambda i: root / "JPEGImages" / f"{i}.jpg",
        lambda i: root / "SegmentationClassAug" / f"{i}.png", len(class_names), cfg, f"index {split}",
        progress,
    )
    return SplitIndex(dataset, split, list(class_names), records)


def coco_split(root: Path, split: str, cfg: DatasetConfig, progress: Progress = no_progress) -> SplitIndex:
    folder = f"{split}2014" if not split.endswith("2014") else split
    image_dir, mask_dir = root / "images" / folder, root / "masks" / folder
    if not image_dir.is_dir():
        raise PipelineError(f"COCO image folder not found: {image_dir}")
    list_file = root / f"{split}.txt"
    ids = read_ids(list_file) if list_file.is_file() else sorted(p.stem for p in image_dir.glob("*.jpg"))
    records = records_from_masks(
        ids, lambda i: image_dir / f"{i}.jpg", lambda i: mask_dir / f"{i}.png",
        len(COCO_CLASSES), cfg, f"index {split}", progress,
    )
    return SplitIndex("coco", split, list(COCO_CLASSES), records)


def custom_split(root: Path, split: str, cfg: DatasetConfig, progress: Progress = no_progress) -> SplitIndex:
    if not cfg.class_names or not cfg.labels_file:
        raise PipelineError("params.yaml: a custom dataset needs dataset.class_names and dataset.labels_file")
    class_file, labels_file = Path(cfg.class_names), Path(cfg.labels_file)
    for p, key in ((class_file, "dataset.class_names"), (labels_file, "dataset.labels_file")):
        if not p.is_file():
            raise PipelineError(f"{key}: file not found: {p}")
        if not p.resolve().is_relative_to(root.resolve()):
            log.warning("%s %s is outside dataset.root %s: DVC tracks the root folder, so it will "
                        "not rerun prepare when this file changes; keep it inside the root", key, p, root)
    try:
        class_names = parse_class_list(class_file.read_text())
    except (DatasetError, ValueError) as exc:
        raise PipelineError(f"{class_file}: {exc}") from exc
    fmt = "json" if labels_file.suffix.lower() == ".json" else "csv"
    try:
        text = labels_file.read_text()
    except UnicodeDecodeError as exc:  # not UTF-8: one line naming the file, as for the class list
        raise DatasetError(f"{labels_file}: {exc}") from exc
    labels = parse_labels_file(text, fmt, class_names, source=str(labels_file))
    images = {p.stem: p for p in sorted((root / "images").glob("*")) if p.suffix.lower() in IMAGE_EXTS}
    list_file = root / "splits" / f"{split}.txt"
    if list_file.is_file():
        ids = read_ids(list_file)
    else:
        ids = sorted(labels)
        log.warning("split %s: no %s, so it holds every labelled image (%d); with no split lists "
                    "the segmenter is evaluated on its own training images", split, list_file, len(ids))
    records = []
    for image_id in progress(ids, desc=f"index {split}"):
        if image_id not in labels:
            raise PipelineError(f"image {image_id} of split {split!r} has no entry in {labels_file}")
        if image_id not in images:
            raise PipelineError(f"image {image_id}: no file {root / 'images'}/{image_id}.* with an image extension")
        h, w, error, digest = check_image(image_id, images[image_id], cfg)
        mask = root / "masks" / f"{image_id}.png"
        records.append(Record(image_id, str(images[image_id]), str(mask) if mask.is_file() else None,
                              h, w, labels[image_id], error, digest))
    return SplitIndex("custom", split, class_names, records)


def dataset_root(cfg: DatasetConfig, out: Path, progress: Progress = no_progress) -> Path:
    """The dataset tree to index: ``dataset.root``, or for a source that generates its own data,
    the tree it writes now at ``out/<dataset.name>`` (``out``: the index folder being written)."""
    source = dataset_source(cfg.name)
    if source.generate is not None:
        root = out / cfg.name
        resolve(source.generate)(root, cfg, progress)
        return root
    root = Path(cfg.root)
    if not root.is_dir():
        raise PipelineError(f"dataset.root not found: {root}")
    return root


def build_split(cfg: DatasetConfig, split: str, root: Path, progress: Progress = no_progress) -> SplitIndex:
    """The index of ``split`` of the dataset tree at ``root`` (:func:`dataset_root`)."""
    return resolve(dataset_source(cfg.name).build)(root, split, cfg, progress)


def absent_classes(index: SplitIndex) -> list[str]:
    """Classes present in no usable image of the split (a warning: their prompts learn nothing)."""
    present = np.zeros(len(index.class_names), bool)
    for r in index.good():
        present[list(r.labels)] = True
    return [n for n, p in zip(index.class_names, present) if not p]
