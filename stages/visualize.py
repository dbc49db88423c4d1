"""``wsss visualize``: one PNG panel per image id for inspecting the seeding.

Panel, left to right: image | quasi-superpixels of level 0, 1, 2 (sub-parts, parts, wholes; one
random colour per mask, the same every run) | CAM (max §3 score over classes, jet over the image)
| seed (VOC colours) | ground truth (when the split has it). A missing input (image not yet in a
store, seed not yet written) leaves its panel blank rather than failing, so the command works
part-way through a run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np

from pipeline.data.datasets import DatasetError, load_split
from pipeline.data.imageio import ImageReadError, read_label, read_rgb, write_png
from pipeline.seeds.sams import image_scores
from pipeline.store import ImageStore, StoreError
from pipeline.visualization import cam_panel, hstack_panels, label_panel, masks_panel
from stages.common import INDEX_OPTION, PARAMS_OPTION, StageError, load_params, section
from stages.prepare import DatasetConfig

log = logging.getLogger("wsss.visualize")
CAMS_OF = {"coarse": "cache/cams/cls.zarr", "fine": "cache/cams/seg.zarr"}
LEVELS = (0, 1, 2)


def _open(path: str) -> ImageStore | None:
    try:
        return ImageStore(path)
    except StoreError:
        log.warning("no store at %s: its panels stay blank", path)
        return None


def render(image: np.ndarray, qs: dict | None, cams: dict | None, seed: np.ndarray | None,
           gt: np.ndarray | None) -> np.ndarray:
    """The panel row of one image from whatever inputs exist."""
    h, w = image.shape[:2]
    panels = [image]
    for level in LEVELS:
        masks = np.zeros((0, h, w), bool)
        if qs is not None:
            masks = qs["masks"][qs["levels"] == level]
        panels.append(masks_panel(image, masks, seed=level))
    score = np.zeros((0, h, w), np.float32)
    if cams is not None:
        cam = cams.get("cam_caa", cams.get("cam"))
        score = image_scores(cam, (h, w))
    panels.append(cam_panel(image, score))
    panels.append(label_panel(seed) if seed is not None else np.zeros_like(image))
    if gt is not None:
        panels.append(label_panel(gt))
    return hstack_panels(panels)


@click.command("visualize")
@click.option("--ids", "ids", multiple=True, required=True, help="Image id (repeatable).")
@click.option("--which", type=click.Choice(["coarse", "fine"]), default="fine", show_default=True)
@PARAMS_OPTION
@INDEX_OPTION
@click.option("--cams", default=None, help="CAM store (default: that of --which).")
@click.option("--sam-masks", "sam_masks", default="cache/sam_masks.zarr", show_default=True)
@click.option("--seeds", "seeds_dir", default=None,
              help="Seed directory (default: cache/seeds/<which>).")
@click.option("--out", default="cache/visualize", show_default=True,
              type=click.Path(file_okay=False))
def command(ids: tuple[str, ...], which: str, params_path: str, index_dir: str, cams: str | None,
            sam_masks: str, seeds_dir: str | None, out: str) -> None:
    """PNG panels (image | masks by level | CAM | seed | ground truth) for a few ids."""
    dataset = section(load_params(params_path), "dataset", DatasetConfig)
    try:
        records = {r.id: r for r in load_split(index_dir, dataset.train_split).good()}
    except DatasetError as exc:
        raise StageError(str(exc)) from exc
    unknown = [i for i in ids if i not in records]
    if unknown:
        raise StageError(f"image id {unknown[0]!r} is not a usable image of split "
                         f"{dataset.train_split!r}")
    cam_store = _open(cams or CAMS_OF[which])
    sam_store = _open(sam_masks)
    seeds = Path(seeds_dir or f"cache/seeds/{which}")
    for image_id in ids:
        r = records[image_id]
        try:
            image = read_rgb(r.image)
        except ImageReadError as exc:
            raise StageError(f"image {image_id}: {exc}") from exc
        qs = sam_store.read(image_id) if sam_store and image_id in sam_store else None
        cam = cam_store.read(image_id) if cam_store and image_id in cam_store else None
        seed_png = seeds / f"{image_id}.png"
        seed = read_label(seed_png) if seed_png.is_file() else None
        gt = read_label(r.label) if r.label else None
        write_png(Path(out) / f"{image_id}.png", render(image, qs, cam, seed, gt))
    log.info("visualize: %d panels in %s", len(ids), out)
