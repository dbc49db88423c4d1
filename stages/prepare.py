"""Stage ``prepare``: dataset on disk -> ``cache/index/<split>.json`` (ids, sizes, image labels).

Layouts (``dataset.name``):
- ``voc``: PASCAL VOC 2012 + SBD: ``JPEGImages/<id>.jpg``, ``SegmentationClassAug/<id>.png``,
  ``ImageSets/SegmentationAug/<split>.txt``; labels derived from the masks.
- ``coco``: MS COCO 2014: ``images/<split>2014/<id>.jpg``, ``masks/<split>2014/<id>.png``
  (81 labels: 0 background, 1..80), optional ``<split>.txt`` id lists; labels from the masks.
- ``custom``: ``images/<id>.<ext>``, a labels file (CSV or JSON: id -> class names), a class list,
  optional ``masks/<id>.png`` and ``splits/<split>.txt`` (default: every labelled image).
- ``demo``: generated here (deterministic), in the VOC layout under ``<out>/demo``.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
from tqdm.auto import tqdm

from pipeline.data.datasets import (
    COCO_CLASSES,
    VOC_CLASSES,
    DatasetError,
    Record,
    SplitIndex,
    labels_from_mask,
    parse_class_list,
    parse_labels_file,
    split_path,
)
from pipeline.data.imageio import (
    ImageReadError,
    image_size_and_digest,
    read_label,
    write_palette_png,
)
from pipeline.demo.world import DEMO_CLASSES
from pipeline.demo.world import render as render_demo
from pipeline.errors import PipelineError
from pipeline.params import DatasetConfig, DemoConfig, section
from stages.params import PARAMS_OPTION, load_params

log = logging.getLogger("wsss.prepare")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")



def _check_image(image_id: str, path: Path, cfg: DatasetConfig) -> tuple[int, int, str | None, str | None]:
    """(H, W, error, content digest) of one image, decoded fully."""
    try:
        h, w, digest = image_size_and_digest(path)
        return h, w, None, digest
    except ImageReadError as exc:
        if cfg.on_bad_image == "fail":
            raise PipelineError(f"image {image_id}: {exc} (set dataset.on_bad_image: skip to record and go on)") from exc
        log.warning("skipping image %s: %s", image_id, exc)
        return 0, 0, str(exc), None


def _records_from_masks(ids, image_of, mask_of, n_classes, cfg, desc) -> list[Record]:
    records = []
    for image_id in tqdm(ids, desc=desc, unit="img", dynamic_ncols=True):
        image_path, mask_path = image_of(image_id), mask_of(image_id)
        h, w, error, digest = _check_image(image_id, image_path, cfg)
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


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise PipelineError(f"split list not found: {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    # SBD-style lists may hold "/JPEGImages/x.jpg /SegmentationClassAug/x.png" pairs.
    return [Path(i).stem for i in ids]


def _voc_split(root: Path, split: str, cfg, class_names=VOC_CLASSES, dataset="voc") -> SplitIndex:
    ids = _read_ids(root / "ImageSets" / "SegmentationAug" / f"{split}.txt")
    records = _records_from_masks(
        ids, lambda i: root / "JPEGImages" / f"{i}.jpg",
        lambda i: root / "SegmentationClassAug" / f"{i}.png", len(class_names), cfg, f"index {split}",
    )
    return SplitIndex(dataset, split, list(class_names), records)


def _coco_split(root: Path, split: str, cfg) -> SplitIndex:
    folder = f"{split}2014" if not split.endswith("2014") else split
    image_dir, mask_dir = root / "images" / folder, root / "masks" / folder
    if not image_dir.is_dir():
        raise PipelineError(f"COCO image folder not found: {image_dir}")
    list_file = root / f"{split}.txt"
    ids = _read_ids(list_file) if list_file.is_file() else sorted(p.stem for p in image_dir.glob("*.jpg"))
    records = _records_from_masks(
        ids, lambda i: image_dir / f"{i}.jpg", lambda i: mask_dir / f"{i}.png",
        len(COCO_CLASSES), cfg, f"index {split}",
    )
    return SplitIndex("coco", split, list(COCO_CLASSES), records)


def _custom_split(root: Path, split: str, cfg: DatasetConfig) -> SplitIndex:
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
        labels = parse_labels_file(labels_file.read_text(), fmt, class_names, source=str(labels_file))
    except (DatasetError, ValueError) as exc:
        raise PipelineError(str(exc)) from exc
    images = {p.stem: p for p in sorted((root / "images").glob("*")) if p.suffix.lower() in IMAGE_EXTS}
    list_file = root / "splits" / f"{split}.txt"
    if list_file.is_file():
        ids = _read_ids(list_file)
    else:
        ids = sorted(labels)
        log.warning("split %s: no %s, so it holds every labelled image (%d); with no split lists "
                    "the segmenter is evaluated on its own training images", split, list_file, len(ids))
    records = []
    for image_id in tqdm(ids, desc=f"index {split}", unit="img", dynamic_ncols=True):
        if image_id not in labels:
            raise PipelineError(f"image {image_id} of split {split!r} has no entry in {labels_file}")
        if image_id not in images:
            raise PipelineError(f"image {image_id}: no file {root / 'images'}/{image_id}.* with an image extension")
        h, w, error, digest = _check_image(image_id, images[image_id], cfg)
        mask = root / "masks" / f"{image_id}.png"
        records.append(Record(image_id, str(images[image_id]), str(mask) if mask.is_file() else None,
                              h, w, labels[image_id], error, digest))
    return SplitIndex("custom", split, class_names, records)


def demo_image_id(index: int) -> str:
    """The id of demo image ``index`` (``render(dataset.demo.seed, index)``)."""
    return f"demo_{index:04d}"


def demo_index(image_id: str) -> int:
    """Inverse of :func:`demo_image_id`; ValueError for any other id."""
    head, _, digits = image_id.partition("_")
    if not (head == "demo" and digits.isascii() and digits.isdigit()
            and demo_image_id(int(digits)) == image_id):
        raise ValueError(f"{image_id!r} is not a demo image id (demo_NNNN)")
    return int(digits)


def generate_demo(root: Path, cfg: DemoConfig) -> None:
    """Write the demo dataset in the VOC layout (deterministic; rewritten each time)."""
    shutil.rmtree(root, ignore_errors=True)
    from PIL import Image

    lists = {"train": range(cfg.n_train), "val": range(cfg.n_train, cfg.n_train + cfg.n_val)}
    (root / "ImageSets" / "SegmentationAug").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for split, indices in lists.items():
        ids = []
        for i in tqdm(indices, desc=f"demo {split}", unit="img", dynamic_ncols=True):
            sample = render_demo(cfg.seed, i)
            image_id = demo_image_id(i)
            # PNG content under a .jpg name would confuse viewers; JPEG at quality 95 is the VOC norm.
            Image.fromarray(sample.image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            write_palette_png(root / "SegmentationClassAug" / f"{image_id}.png", sample.label)
            ids.append(image_id)
        (root / "ImageSets" / "SegmentationAug" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(DEMO_CLASSES) + "\n")


def build_split(cfg: DatasetConfig, split: str, out: Path) -> SplitIndex:
    if cfg.name == "demo":
        return _voc_split(out / "demo", split, cfg, DEMO_CLASSES, "demo")
    root = Path(cfg.root)
    if not root.is_dir():
        raise PipelineError(f"dataset.root not found: {root}")
    if cfg.name == "voc":
        return _voc_split(root, split, cfg)
    if cfg.name == "coco":
        return _coco_split(root, split, cfg)
    return _custom_split(root, split, cfg)


@click.command("prepare")
@PARAMS_OPTION
@click.option("--out", default="cache/index", show_default=True, type=click.Path(file_okay=False))
def command(params_path: str, out: str) -> None:
    """Index the dataset: image ids, sizes and image-level labels per split."""
    cfg = section(load_params(params_path), "dataset", DatasetConfig)
    out_dir = Path(out)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cfg.name == "demo":
        generate_demo(tmp / "demo", cfg.demo)
    splits = list(dict.fromkeys([cfg.train_split, cfg.eval_split]))
    indexes = []
    for split in splits:
        index = build_split(cfg, split, tmp)
        if not index.good():
            raise PipelineError(f"split {split!r} of dataset {cfg.name!r} has no usable images")
        indexes.append(index)
    for index in indexes:
        if cfg.name == "demo":  # the demo tree moves with the index: store paths where it will live
            index.records = [
                replace(r, image=r.image.replace(str(tmp), str(out_dir), 1),
                        label=r.label and r.label.replace(str(tmp), str(out_dir), 1))
                for r in index.records
            ]
        split_path(tmp, index.split).write_text(index.to_json())
        present = np.zeros(len(index.class_names), bool)
        for r in index.good():
            present[list(r.labels)] = True
        if not present.all():
            missing = [n for n, p in zip(index.class_names, present) if not p]
            log.warning("split %s: classes never present: %s", index.split, ", ".join(missing))
        log.info("split %s: %d images (%d skipped)", index.split, len(index.good()), len(index.skipped()))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
