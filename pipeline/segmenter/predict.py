"""Prediction of one image by the trained segmenter (algorithms.md §9), and a split's scores.

The segmenter is ``best.pt`` (the best iteration on val, §9) or ``last.pt`` of the folder
``train-segmenter`` wrote (:func:`checkpoint_path`). For one image: multi-scale + flip softmax
probabilities (:func:`pipeline.segmenter.model.predict_probs`), their argmax (the raw map) and,
given the image's quasi-superpixels, SAMS post-processing of the probabilities (§5) at each alpha.
With ground truth, :func:`prediction_confusions` scores both and :class:`PredictTotals` sums them
over a split; :func:`summarise` gives the metrics JSON (mIoU and per-class IoU, raw and
post-processed, and the mIoU of every swept alpha: the paper sweeps the background exponent 1-5).
:func:`prediction_for_image` reads one image file, predicts it and writes its label maps (the
``predict`` stage's per-image task).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from pipeline.data.imageio import read_label, read_rgb, write_palette_png
from pipeline.device import torch_device
from pipeline.errors import PipelineError
from pipeline.metrics import ConfusionTotals, confusion_matrix
from pipeline.params import PredictConfig
from pipeline.provenance import check_inputs
from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator, QuasiSuperpixels
from pipeline.schemas import open_masks
from pipeline.seeds.sams import sams_postprocess
from pipeline.segmenter.model import load_segmenter, predict_probs


def checkpoint_path(segmenter_dir: str | Path, which: str) -> Path:
    """``best.pt`` or ``last.pt`` in the folder ``train-segmenter`` wrote."""
    return Path(segmenter_dir) / f"{which}.pt"


def load_resources(model_path: str, device: str, sam: dict | None) -> dict[str, Any]:
    """The trained segmenter and, for new images with post-processing, a SAM generator (``sam``:
    the ``sam`` params as plain data)."""
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


class ImagePrediction(NamedTuple):
    """The segmenter's prediction of one image."""

    probs: torch.Tensor
    """(K + 1, H, W) float32 multi-scale + flip softmax probabilities."""
    raw: np.ndarray
    """(H, W) uint8 argmax of ``probs``."""
    postprocessed: dict[float, np.ndarray]
    """Alpha -> (H, W) uint8 SAMS post-processed map (empty without quasi-superpixels given)."""
    no_masks: bool
    """Quasi-superpixels were given but there were none: every post-processed map is ``raw``."""

    def labels(self, alpha: float) -> np.ndarray:
        """The map at ``alpha`` if post-processed, else the raw one."""
        return self.postprocessed[alpha] if self.postprocessed else self.raw


def predict_image(
    net: torch.nn.Module,
    image: np.ndarray,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    precision: str = "fp32",
    masks: QuasiSuperpixels | None = None,
    alphas: Sequence[float] = (),
    image_id: str = "",
) -> ImagePrediction:
    """Predict one (H, W, 3) uint8 RGB image with ``net`` (in eval mode) and, given its
    quasi-superpixels ``masks``, post-process at each of ``alphas``; ``image_id`` names the image
    in error messages."""
    if masks is not None and masks.masks.shape[1:] != image.shape[:2]:
        raise PipelineError(f"image {image_id}: SAM masks are {masks.masks.shape[1:]}, image is "
                            f"{image.shape[:2]}")
    probs = predict_probs(net, image, scales, flip, precision)
    raw = probs.argmax(0).numpy().astype(np.uint8)
    posts: dict[float, np.ndarray] = {}
    no_masks = False
    if masks is not None:
        no_masks = len(masks) == 0
        for a in dict.fromkeys(alphas):
            # Deviation: with no quasi-superpixel SAMS would paint all background; an image SAM
            # found nothing in keeps its raw prediction instead.
            posts[a] = sams_postprocess(probs, masks.masks, masks.levels, a) if not no_masks else raw
    return ImagePrediction(probs, raw, posts, no_masks)


def prediction_confusions(prediction: ImagePrediction, gt: np.ndarray) -> dict[str, Any]:
    """``{"no_masks", "raw", "post"}``: the (K, K) confusion matrices of the raw map and of each
    post-processed one (by alpha) against ground truth ``gt``, what :class:`PredictTotals` adds."""
    k = prediction.probs.shape[0]
    return {
        "no_masks": prediction.no_masks,
        "raw": confusion_matrix(prediction.raw, gt, k),
        "post": {a: confusion_matrix(p, gt, k) for a, p in prediction.postprocessed.items()},
    }



def prediction_for_image(res: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """Predict, post-process and write one image: ``<out>/raw/<id>.png`` and ``<out>/<id>.png``.

    ``res``: :func:`load_resources`'s. ``item``: ``id``, ``image`` (its file), ``label`` (its
    ground truth PNG, or None), ``out``, ``scales``, ``flip``, ``precision``, ``postprocess``,
    ``alpha``, ``alpha_sweep``, ``sam_masks`` (the quasi-superpixel store, unless ``res`` has a
    generator) and optionally ``sam_inputs`` (what the image's masks must be computed from).
    Returns ``no_masks`` (post-processing had no quasi-superpixel) and, with ground truth, the
    confusion matrices ``raw`` and ``post`` (per alpha); without ground truth those are None."""
    image_id = item["id"]
    image = read_rgb(item["image"], item.get("digest"))
    qs = None
    if item["postprocess"]:
        if res["generator"] is not None:
            qs = res["generator"].generate(image)
        else:
            store = open_masks(item["sam_masks"])
            if item.get("sam_inputs") is not None:
                check_inputs(store, image_id, item["sam_inputs"], "wsss sam-masks")
            qs = QuasiSuperpixels.from_arrays(store.read(image_id))
    alphas = [item["alpha"]] + (item["alpha_sweep"] if item["label"] else [])
    pred = predict_image(res["net"], image, item["scales"], item["flip"], item["precision"], qs,
                         alphas, image_id)
    out = Path(item["out"])
    write_palette_png(out / "raw" / f"{image_id}.png", pred.raw)
    write_palette_png(out / f"{image_id}.png", pred.labels(item["alpha"]))
    if not item["label"]:
        return {"no_masks": pred.no_masks, "raw": None, "post": None}
    return prediction_confusions(pred, read_label(item["label"]))

class PredictTotals:
    """Running sums of per-image results (:func:`prediction_confusions`, or ``raw`` and ``post``
    None for an image without ground truth; ``run_per_image(collect=...)``): the metrics need
    only the summed confusions, so the stage keeps no matrix per image (COCO's 40,137 val images
    at 81² × (raw + 6 alphas) would hold about 15 GB)."""

    def __init__(self):
        self.images = self.scored = self.no_masks = 0
        self.confusions = ConfusionTotals()
        """``"raw"`` and ``("post", alpha)``."""

    def add(self, result: dict) -> None:
        self.images += 1
        self.no_masks += bool(result["no_masks"])
        if result["raw"] is None:
            return
        self.scored += 1
        self.confusions.add("raw", result["raw"])
        for a, conf in result["post"].items():
            self.confusions.add(("post", a), conf)


def summarise(results: PredictTotals | list[dict], cfg: PredictConfig, class_names: list[str],
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
    metrics["raw"] = totals.confusions.summary("raw", names)
    if cfg.postprocess:
        post = totals.confusions.summary(("post", cfg.alpha), names)
        metrics["postprocessed"] = {"alpha": cfg.alpha, **post}
        if cfg.alpha_sweep:
            metrics["alpha_sweep"] = {
                f"{a:g}": totals.confusions.miou(("post", a)) for a in cfg.alpha_sweep
            }
    metrics["miou"] = metrics["postprocessed" if cfg.postprocess else "raw"]["miou"]
    return metrics
