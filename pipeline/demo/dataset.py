"""The demo dataset (``dataset.name: demo``): the procedural world written in the VOC layout.

``prepare`` generates it (deterministic, rewritten each time) inside the index folder, so the
tree moves with the index, and indexes it with the VOC builder. Registered as a dataset source
from ``pipeline/demo/registry.py``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.data.datasets import SplitIndex
from pipeline.data.imageio import write_palette_png
from pipeline.data.sources import Progress, no_progress, voc_split
from pipeline.demo.world import DEMO_CLASSES
from pipeline.demo.world import render as render_demo
from pipeline.params import DatasetConfig, DemoConfig


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


def generate_demo(root: Path, cfg: DemoConfig, progress: Progress = no_progress) -> None:
    """Write the demo dataset in the VOC layout (deterministic; rewritten each time)."""
    shutil.rmtree(root, ignore_errors=True)
    from PIL import Image

    lists = {"train": range(cfg.n_train), "val": range(cfg.n_train, cfg.n_train + cfg.n_val)}
    (root / "ImageSets" / "SegmentationAug").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for split, indices in lists.items():
        ids = []
        for i in progress(indices, desc=f"demo {split}"):
            sample = render_demo(cfg.seed, i)
            image_id = demo_image_id(i)
            # PNG content under a .jpg name would confuse viewers; JPEG at quality 95 is the VOC norm.
            Image.fromarray(sample.image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            write_palette_png(root / "SegmentationClassAug" / f"{image_id}.png", sample.label)
            ids.append(image_id)
        (root / "ImageSets" / "SegmentationAug" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(DEMO_CLASSES) + "\n")


def generate(root: Path, cfg: DatasetConfig, progress: Progress = no_progress) -> None:
    """The source's ``generate``: the world of ``dataset.demo`` at ``root``."""
    generate_demo(root, cfg.demo, progress)


def demo_split(root: Path, split: str, cfg: DatasetConfig, progress: Progress = no_progress) -> SplitIndex:
    """The source's ``build``: the VOC builder over the generated tree, with the world's classes."""
    return voc_split(root, split, cfg, progress, DEMO_CLASSES, "demo")
