"""Stage ``predict``: eval images + trained segmenter (+ SAMS post-processing) -> label maps, mIoU.

The segmenter is ``<segmenter>/best.pt`` (the best iteration on val, §9) or ``last.pt``
(``predict.checkpoint``); the metrics JSON records which file, iteration and val mIoU it was.
For every image: multi-scale + flip softmax probabilities (algorithms.md §9), the raw argmax
(``<out>/raw/<id>.png``) and, with ``predict.postprocess``, SAMS post-processing over the image's
quasi-superpixels (§5, ``<out>/<id>.png``; without post-processing that file is the raw map).
With ground truth, the metrics JSON holds mIoU and per-class IoU of both, and the mIoU of every
``predict.alpha_sweep`` value (the paper sweeps the background exponent 1-5).

``--images DIR`` predicts a folder of new images instead (no index, no ground truth); their
quasi-superpixels are computed on the fly with the ``sam`` params when post-processing is on.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipeline.atomic import write_json_atomic
from pipeline.config import to_dict
from pipeline.data.datasets import DatasetError, load_split
from pipeline.data.imageio import (
    ImageReadError,
    read_label,
    read_rgb,
    write_palette_png,
)
from pipeline.device import torch_device
from pipeline.errors import PipelineError
from pipeline.metrics import confusion_matrix, scores_from_confusion
from pipeline.params import (
    ComputeConfig,
    DatasetConfig,
    PredictConfig,
    SamConfig,
    section,
)
from pipeline.provenance import check_inputs, image_inputs
from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator, QuasiSuperpixels
from pipeline.seeds.sams import sams_postprocess
from pipeline.segmenter.model import load_segmenter, predict_probs
from pipeline.store import ImageStore, StoreError
from pipeline.weights import CheckpointError
from stages.execution import (
    WorkerResource,
    check_stage_device,
    run_per_image,
    worker_path,
)
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params
from stages.prepare import IMAGE_EXTS

log = logging.getLogger("wsss.predict")


# -- per-image work (module level, so dask workers can run it) ----------------------------------


def checkpoint_path(segmenter_dir: str | Path, which: str) -> Path:
    """``best.pt`` or ``last.pt`` in the folder ``train-segmenter`` wrote."""
    return Path(segmenter_dir) / f"{which}.pt"


def load_resources(model_path: str, device: str, sam: dict | None) -> dict[str, Any]:
    """The trained segmenter and, for folder mode with post-processing, a SAM generator."""
    net, meta = load_segmenter(model_path, torch_device(device))
    generator = None
    if sam is not None:
        from pipeline.sam.models import build_sam_predictor

        settings = dict(sam)
        predictor = build_sam_predictor(
            settings.pop("model"), settings.pop("checkpoint", None),
            settings.pop("checkpoint_sha256", None), torch_device(device),
            settings.pop("mask_threshold", 0.0),
        )
        generator = QuasiSuperpixelGenerator(predictor, **settings)
    return {"net": net, "meta": meta, "generator": generator}


def predict_image(res: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """Predict, post-process and write one image. Returns ``no_masks`` (post-processing had no
    quasi-superpixel) and, with ground truth, the confusion matrices ``raw`` and ``post``
    (per alpha); without ground truth those are None."""
    net, image_id = res["net"], item["id"]
    image = read_rgb(item["image"])
    probs = predict_probs(net, image, item["scales"], item["flip"], item["precision"])
    raw = probs.argmax(0).numpy().astype(np.uint8)
    out = Path(item["out"])
    write_palette_png(out / "raw" / f"{image_id}.png", raw)
    posts: dict[float, np.ndarray] = {}
    no_masks = False
    if item["postprocess"]:
        if res["generator"] is not None:
            qs = res["generator"].generate(image)
        else:
            store = ImageStore(item["sam_masks"], arrays=QuasiSuperpixels.STORE_ARRAYS)
            if item.get("sam_inputs") is not None:
                check_inputs(store, image_id, item["sam_inputs"], "wsss sam-masks")
            qs = QuasiSuperpixels.from_arrays(store.read(image_id))
        if qs.masks.shape[1:] != image.shape[:2]:
            raise PipelineError(f"image {image_id}: SAM masks are {qs.masks.shape[1:]}, image is {image.shape[:2]}")
        no_masks = len(qs) == 0
        alphas = [item["alpha"]] + (item["alpha_sweep"] if item["label"] else [])
        for a in dict.fromkeys(alphas):
            # Deviation: with no quasi-superpixel SAMS would paint all background; an image SAM
            # found nothing in keeps its raw prediction instead.
            posts[a] = sams_postprocess(probs, qs.masks, qs.levels, a) if not no_masks else raw
    write_palette_png(out / f"{image_id}.png", posts[item["alpha"]] if posts else raw)
    if not item["label"]:
        return {"no_masks": no_masks, "raw": None, "post": None}
    gt = read_label(item["label"])
    k = probs.shape[0]
    return {
        "no_masks": no_masks,
        "raw": confusion_matrix(raw, gt, k),
        "post": {a: confusion_matrix(p, gt, k) for a, p in posts.items()},
    }


# -- the command ------------------------------------------------------------------------------------


def _folder_items(images_dir: Path) -> list[dict[str, Any]]:
    if not images_dir.is_dir():
        raise PipelineError(f"--images: folder not found: {images_dir}")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise PipelineError(f"--images: no image files ({', '.join(IMAGE_EXTS)}) in {images_dir}")
    stems = [p.stem for p in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise PipelineError(f"--images: several files share the id {dupes[0]!r} in {images_dir}")
    return [{"id": p.stem, "image": worker_path(p), "label": None} for p in files]


def _sam_settings(params: dict) -> dict:
    """The validated ``sam`` section as plain data (the generator travels to dask workers)."""
    return to_dict(section(params, "sam", SamConfig))



class PredictTotals:
    """Running sums of :func:`predict_image`'s results (``run_per_image(collect=...)``): the
    metrics need only the summed confusions, so the stage keeps no matrix per image (COCO's
    40,137 val images at 81² × (raw + 6 alphas) would hold about 15 GB)."""

    def __init__(self):
        self.images = self.scored = self.no_masks = 0
        self.raw = None
        self.post: dict[float, np.ndarray] = {}

    def add(self, result: dict) -> None:
        self.images += 1
        self.no_masks += bool(result["no_masks"])
        if result["raw"] is None:
            return
        self.scored += 1
        self.raw = result["raw"] if self.raw is None else self.raw + result["raw"]
        for a, conf in result["post"].items():
            self.post[a] = conf if a not in self.post else self.post[a] + conf


def summarise(results: "PredictTotals | list[dict]", cfg: PredictConfig, class_names: list[str],
              model: str, checkpoint: dict | None = None, precision: str = "fp32") -> dict:
    """The metrics JSON: which checkpoint, raw and post-processed scores and the alpha sweep
    (over images with gt), from the totals or from a list of per-image results."""
    totals = results
    if not isinstance(totals, PredictTotals):
        totals = PredictTotals()
        for r in results:
            totals.add(r)
    names = ["background", *class_names]
    metrics: dict[str, Any] = {
        "images": totals.images, "images_with_ground_truth": totals.scored, "model": model,
        "images_without_sam_masks": totals.no_masks,
    }
    if checkpoint is not None:
        metrics["checkpoint"] = checkpoint
    metrics["compute_precision"] = precision  # not the "precision" score of raw/postprocessed
    if not totals.scored:
        return metrics
    metrics["raw"] = scores_from_confusion(totals.raw).as_dict(names)
    if cfg.postprocess:
        post = scores_from_confusion(totals.post[cfg.alpha]).as_dict(names)
        metrics["postprocessed"] = {"alpha": cfg.alpha, **post}
        if cfg.alpha_sweep:
            metrics["alpha_sweep"] = {
                f"{a:g}": scores_from_confusion(totals.post[a]).as_dict()["miou"]
                for a in cfg.alpha_sweep
            }
    metrics["miou"] = metrics["postprocessed" if cfg.postprocess else "raw"]["miou"]
    return metrics


@click.command("predict")
@PARAMS_OPTION
@INDEX_OPTION
@click.option("--images", "images_dir", default=None, type=click.Path(file_okay=False),
              help="Predict this folder of images instead of the eval split (no index, no metrics).")
@click.option("--segmenter", "segmenter_dir", default="cache/segmenter", show_default=True,
              type=click.Path(file_okay=False),
              help="Folder of train-segmenter's best.pt / last.pt (predict.checkpoint chooses).")
@click.option("--sam-masks", "sam_masks", default="cache/sam_masks.zarr", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--out", default="cache/predictions", show_default=True, type=click.Path(file_okay=False))
@click.option("--metrics", "metrics_path", default=None, type=click.Path(dir_okay=False),
              help="Metrics JSON (index mode; e.g. cache/metrics/predict.json).")
def command(params_path, index_dir, images_dir, segmenter_dir, sam_masks, out, metrics_path) -> None:
    """Multi-scale + flip inference with SAMS post-processing; mIoU on the eval split."""
    params = load_params(params_path)
    cfg = section(params, "predict", PredictConfig)
    compute = section(params, "compute", ComputeConfig)
    check_stage_device(compute)  # an unusable device or precision fails here with `local`
    model_path = checkpoint_path(segmenter_dir, cfg.checkpoint)
    try:
        _, meta = load_segmenter(model_path)
    except CheckpointError as exc:
        raise PipelineError(str(exc)) from exc
    info = meta["info"]
    checkpoint = {"which": cfg.checkpoint, "file": str(model_path), **info,
                  "output_stride": meta["output_stride"]}
    log.info("segmenter: %s", ", ".join(f"{k} {v}" for k, v in checkpoint.items()))
    sam = None
    if images_dir is not None:
        items = _folder_items(Path(images_dir))
        if cfg.postprocess:
            sam = _sam_settings(params)
            sam["checkpoint"] = worker_path(sam["checkpoint"])
    else:
        data = section(params, "dataset", DatasetConfig)
        try:
            split = load_split(index_dir, data.eval_split)
        except DatasetError as exc:
            raise PipelineError(str(exc)) from exc
        if list(split.class_names) != meta["class_names"]:
            raise PipelineError(
                f"the segmenter was trained on classes {meta['class_names']}, the index has {split.class_names}"
            )
        items = [{"id": r.id, "image": worker_path(r.image), "label": worker_path(r.label),
                  "sam_inputs": image_inputs(r)}
                 for r in split.good()]
        if cfg.postprocess:
            try:
                store = ImageStore(sam_masks, arrays=QuasiSuperpixels.STORE_ARRAYS)
            except StoreError as exc:
                raise PipelineError(str(exc)) from exc
            missing = [it["id"] for it in items if it["id"] not in store]
            if missing:
                raise PipelineError(
                    f"no SAM masks for image {missing[0]} in {sam_masks} ({len(missing)} missing; "
                    "run `wsss sam-masks`)"
                )
    common = {"scales": list(cfg.scales), "flip": cfg.flip, "postprocess": cfg.postprocess, "alpha": cfg.alpha,
              "alpha_sweep": list(cfg.alpha_sweep), "out": worker_path(out), "sam_masks": worker_path(sam_masks),
              "precision": compute.precision}
    items = [{**common, **it} for it in items]
    resource = WorkerResource.of(load_resources, files=("model_path", "sam.checkpoint"),
                                 model_path=worker_path(model_path), device=compute.device,
                                 sam=sam)
    try:
        totals = PredictTotals()
        run_per_image(predict_image, items, compute, resource, desc="predict", collect=totals.add)
    except (ImageReadError, CheckpointError) as exc:
        raise PipelineError(str(exc)) from exc
    metrics = summarise(totals, cfg, meta["class_names"], meta["model"], checkpoint, compute.precision)
    # Random upstream models (the seeds' CLIP/SAM, or the post-processing's SAM) make the scores a
    # plumbing check: every metrics file says so.
    untrained = bool(info.get("untrained"))
    if cfg.postprocess and images_dir is None:
        untrained = untrained or bool(ImageStore(sam_masks).attrs.get("untrained"))
    elif sam is not None:
        from pipeline.sam.models import SPECS

        untrained = untrained or SPECS[sam["model"]].checkpoint_name is None
    metrics["untrained"] = untrained
    if metrics_path:
        write_json_atomic(Path(metrics_path), metrics)
    if "miou" in metrics:
        log.info("mIoU %.1f%% (raw %.1f%%) on %d images", metrics["miou"] or float("nan"),
                 metrics["raw"]["miou"] or float("nan"), metrics["images_with_ground_truth"])
