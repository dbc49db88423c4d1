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

from pipeline.atomic import write_json_atomic
from pipeline.config import to_dict
from pipeline.data.datasets import load_split
from pipeline.data.imageio import IMAGE_EXTS
from pipeline.errors import PipelineError
from pipeline.params import (
    ComputeConfig,
    DatasetConfig,
    PredictConfig,
    SamConfig,
    section,
)
from pipeline.provenance import image_inputs
from pipeline.schemas import open_masks
from pipeline.segmenter.model import load_segmenter
from pipeline.segmenter.predict import (
    PredictTotals, checkpoint_path, load_resources, prediction_for_image, summarise,
)
from pipeline.store import ImageStore
from stages.execution import run_per_image, worker_path
from stages.resources import WorkerResource, check_stage_device
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params

log = logging.getLogger("wsss.predict")


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
    _, meta = load_segmenter(model_path)
    info = meta["info"]
    checkpoint = {"which": cfg.checkpoint, "file": str(model_path), **info,
                  "output_stride": meta["output_stride"]}
    log.info("segmenter: %s", ", ".join(f"{k} {v}" for k, v in checkpoint.items()))
    sam = None
    if images_dir is not None:
        items = _folder_items(Path(images_dir))
        if cfg.postprocess:
            # the validated `sam` section as plain data (the generator travels to dask workers)
            sam = to_dict(section(params, "sam", SamConfig))
            sam["checkpoint"] = worker_path(sam["checkpoint"])
    else:
        split = load_split(index_dir, section(params, "dataset", DatasetConfig).eval_split)
        if list(split.class_names) != meta["class_names"]:
            raise PipelineError(f"the segmenter was trained on classes {meta['class_names']}, the "
                                f"index has {split.class_names}")
        items = [{"id": r.id, "image": worker_path(r.image), "label": worker_path(r.label),
                  "sam_inputs": image_inputs(r), "digest": r.digest}
                 for r in split.good()]
        if cfg.postprocess:
            store = open_masks(sam_masks)
            missing = [it["id"] for it in items if it["id"] not in store]
            if missing:
                raise PipelineError(f"no SAM masks for image {missing[0]} in {sam_masks} "
                                    f"({len(missing)} missing; run `wsss sam-masks`)")
    common = {"scales": list(cfg.scales), "flip": cfg.flip, "postprocess": cfg.postprocess,
              "alpha": cfg.alpha, "alpha_sweep": list(cfg.alpha_sweep), "out": worker_path(out),
              "sam_masks": worker_path(sam_masks), "precision": compute.precision}
    items = [{**common, **it} for it in items]
    resource = WorkerResource.of(load_resources, files=("model_path", "sam.checkpoint"),
                                 model_path=worker_path(model_path), device=compute.device,
                                 sam=sam)
    totals = PredictTotals()
    run_per_image(prediction_for_image, items, compute, resource, desc="predict", collect=totals.add)
    metrics = summarise(totals, cfg, meta["class_names"], meta["model"], checkpoint, compute.precision)
    # Random upstream models (the seeds' CLIP/SAM, or the post-processing's SAM) make the scores a
    # plumbing check: every metrics file says so.
    untrained = bool(info.get("untrained"))
    if cfg.postprocess and images_dir is None:
        untrained = untrained or bool(ImageStore(sam_masks).attrs.get("untrained"))
    elif sam is not None:
        from pipeline.sam.pretrained import pretrained_weights

        untrained = untrained or pretrained_weights(sam["model"]) is None
    metrics["untrained"] = untrained
    if metrics_path:
        write_json_atomic(Path(metrics_path), metrics)
    if "miou" in metrics:
        log.info("mIoU %.1f%% (raw %.1f%%) on %d images", metrics["miou"] or float("nan"),
                 metrics["raw"]["miou"] or float("nan"), metrics["images_with_ground_truth"])
