"""``wsss visualize``: one titled PNG panel per image id for inspecting the method.

Panels, left to right: image | quasi-superpixels of level 0, 1, 2 (sub-parts, parts, wholes; one
random colour per mask, the same every run) | CAM (max §3 score over classes, jet over the image)
| seed | ground truth | segmenter prediction (for images that have one). Seeds, ground truth and
predictions are drawn as class-colour overlays on the image, and a legend names the classes shown.
Ids may come from the train or the eval split. A missing input (image not yet in a store, seed or
prediction not yet written) leaves its panel blank rather than failing, so the command works
part-way through a run.

``--sample N`` draws the first N usable images of the train split and the first N of the eval
split (index order: the same images every run and every experiment). The DVC stage ``panels``
writes them to ``cache/plots/panels/``, an image plot: ``dvc plots show`` draws them with the
curves, and ``dvc plots diff`` shows two revisions' panels side by side.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

from pipeline.data.datasets import load_split, split_path
from pipeline.data.imageio import ImageReadError, read_label, read_rgb, write_png
from pipeline.errors import PipelineError
from pipeline.params import DatasetConfig, section
from pipeline.schemas import seed_path
from pipeline.store import ImageStore, StoreError
from pipeline.visualization import render
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params

log = logging.getLogger("wsss.visualize")
CAMS_OF = {"coarse": "cache/cams/cls.zarr", "fine": "cache/cams/seg.zarr"}


def _open(path: str) -> ImageStore | None:
    try:
        return ImageStore(path)
    except StoreError:
        log.warning("no store at %s: its panels stay blank", path)
        return None


@click.command("visualize")
@click.option("--ids", "ids", multiple=True, help="Image id (repeatable).")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Also the first N train and the first N eval images (a fixed sample).")
@click.option("--which", type=click.Choice(["coarse", "fine"]), default="fine", show_default=True)
@PARAMS_OPTION
@INDEX_OPTION
@click.option("--cams", default=None, help="CAM store (default: that of --which).")
@click.option("--sam-masks", "sam_masks", default="cache/sam_masks.zarr", show_default=True)
@click.option("--seeds", "seeds_dir", default=None,
              help="Seed directory (default: cache/seeds/<which>).")
@click.option("--predictions", "predictions_dir", default="cache/predictions", show_default=True,
              help="Segmenter predictions (eval-split images).")
@click.option("--out", default="cache/visualize", show_default=True,
              type=click.Path(file_okay=False))
def command(ids: tuple[str, ...], sample: int | None, which: str, params_path: str, index_dir: str,
            cams: str | None, sam_masks: str, seeds_dir: str | None, predictions_dir: str,
            out: str) -> None:
    """PNG panels (image | masks by level | CAM | seed | ground truth) for a few ids."""
    if not ids and sample is None:
        raise click.UsageError("give image ids (--ids, repeatable) or --sample N")
    dataset = section(load_params(params_path), "dataset", DatasetConfig)
    train = load_split(index_dir, dataset.train_split)
    records, class_names = {r.id: r for r in train.good()}, train.class_names
    drawn = [r.id for r in train.good()[:sample or 0]]
    if dataset.eval_split != dataset.train_split and split_path(index_dir, dataset.eval_split).is_file():
        evaluated = load_split(index_dir, dataset.eval_split).good()
        drawn += [r.id for r in evaluated[:sample or 0]]
        for r in evaluated:
            records.setdefault(r.id, r)
    ids = tuple(dict.fromkeys((*ids, *drawn)))
    unknown = [i for i in ids if i not in records]
    if unknown:
        raise PipelineError(f"image id {unknown[0]!r} is not a usable image of split "
                            f"{dataset.train_split!r} or {dataset.eval_split!r}")
    cam_store = _open(cams or CAMS_OF[which])
    sam_store = _open(sam_masks)
    seeds = Path(seeds_dir or f"cache/seeds/{which}")
    for image_id in ids:
        r = records[image_id]
        try:
            image = read_rgb(r.image)
        except ImageReadError as exc:
            raise PipelineError(f"image {image_id}: {exc}") from exc
        qs = sam_store.read(image_id) if sam_store and image_id in sam_store else None
        cam = cam_store.read(image_id) if cam_store and image_id in cam_store else None
        seed_png, pred_png = seed_path(seeds, image_id), Path(predictions_dir) / f"{image_id}.png"
        seed = read_label(seed_png) if seed_png.is_file() else None
        prediction = read_label(pred_png) if pred_png.is_file() else None
        gt = read_label(r.label) if r.label else None
        write_png(Path(out) / f"{image_id}.png",
                  render(image, qs, cam, seed, gt, prediction, class_names, which))
    log.info("visualize: %d panels in %s", len(ids), out)
