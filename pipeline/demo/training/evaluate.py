"""Held-out quality of the demo models (``wsss demo-models --evaluate``), loaded through the
pipeline's real-checkpoint path as a user's ``clip.checkpoint`` / ``sam.checkpoint`` would be."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pipeline.errors import PipelineError

log = logging.getLogger("wsss.demo_models")


def evaluate_demo_models(world_seed: int, n: int, clip_file: str | None, sam_file: str | None = None,
                         only: str | None = None, sam_settings: dict | None = None,
                         device: torch.device | str = "cpu", precision: str = "fp32") -> dict:
    """Held-out quality of the demo models on ``n`` images of world ``world_seed``'s held-out
    stream, loaded through the pipeline's real-checkpoint path (the committed file's checksum
    is verified; a given file's is recorded).

    CLIP: classification mAP and Grad-CAM mIoU. SAM (``sam_file``, else the committed file when
    there is one): single positive point IoU per level (best of the three outputs), and the
    project's quasi-superpixel generator with ``sam_settings`` (params.yaml's ``sam:`` generator
    settings; the thresholds used are in the output): masks per image, the fraction of images
    with all three levels, object recall at IoU 0.5. The models run on ``device`` under
    ``precision`` (``pipeline.precision``)."""
    from pipeline.demo.training.clip import evaluation_images

    if n < 1:
        raise PipelineError(f"--n must be >= 1, got {n}")
    samples = evaluation_images(world_seed, n)
    out = {"world_seed": world_seed, "n_images": n}
    if only in (None, "clip"):
        out["clip"] = evaluate_demo_clip(samples, clip_file, device, precision)
    if only in (None, "sam"):
        sam = evaluate_demo_sam(samples, sam_file, sam_settings or {}, required=only == "sam", device=device,
                                precision=precision)
        if sam is not None:
            out["sam"] = sam
    return out


def evaluate_demo_clip(samples, clip_file: str | None, device="cpu", precision: str = "fp32") -> dict:
    """The ``clip`` entry of :func:`evaluate_demo_models` (``clip_file`` None: the committed file)."""
    from pipeline.clip.factory import build_clip, verify_clip
    from pipeline.demo.training.clip import (
        DEMO_CLIP_FILE,
        DEMO_CLIP_MODEL,
        DEMO_CLIP_SHA256,
        evaluate_clip,
    )
    from pipeline.params import ClipConfig

    cfg = ClipConfig(model=DEMO_CLIP_MODEL, checkpoint=str(clip_file or DEMO_CLIP_FILE),
                     checkpoint_sha256=None if clip_file else DEMO_CLIP_SHA256)
    if not Path(cfg.checkpoint).is_file():
        raise PipelineError(f"demo CLIP weights not found: {cfg.checkpoint} (make them with "
                            "`wsss demo-models --only clip --out DIR`)")
    sha = verify_clip(cfg)
    clip = build_clip(cfg.model, cfg.checkpoint, None, 0, str(device))
    result = evaluate_clip(clip.model, samples, precision=precision)
    log.info("demo CLIP %s (SHA-256 %s) on %d held-out images", cfg.checkpoint, sha, len(samples))
    return {"map": result["classification_map"], "cam_miou": result["cam_miou"],
            "cam_best_power": result["cam_best_power"],
            "all_background_miou": result["all_background_miou"], "sha256": sha}


def evaluate_demo_sam(samples, sam_file: str | None, settings: dict, required: bool, device="cpu",
                      precision: str = "fp32") -> dict | None:
    """The ``sam`` entry of :func:`evaluate_demo_models`; None when no file is given, none is
    committed and the SAM is not ``required``."""
    from pipeline.demo.training.sam import DEMO_SAM_FILE, evaluate_sam, point_iou
    from pipeline.sam.models import build_sam_predictor
    from pipeline.sam.pretrained import pretrained_weights
    from pipeline.weights import sha256sum

    path = Path(sam_file) if sam_file else DEMO_SAM_FILE
    if not path.is_file():
        if required or sam_file:
            raise PipelineError(f"demo SAM weights not found: {path} (make them with "
                                "`wsss demo-models --only sam --out DIR`)")
        return None
    # the committed file is verified against the pinned checksum; a given one is recorded
    predictor = build_sam_predictor("demo", path, sha256sum(path) if sam_file else None, device=device)
    sam = predictor.model
    start = time.perf_counter()
    points = point_iou(sam, samples, precision=precision)
    gen = evaluate_sam(sam, samples, precision=precision, **settings)
    log.info("demo SAM %s on %d held-out images in %.0f s", path, len(samples), time.perf_counter() - start)
    return {"point_iou": {k: points[k] for k in ("subpart", "part", "whole")},
            "point_iou_object_points": points["object_points"], "points": points["n_points"],
            "masks_per_image": round(gen["masks_per_image"], 3),
            "three_level_fraction": round(gen["three_level_percent"] / 100, 4),
            "object_recall": round(gen["object_recall_at_0.5_percent"] / 100, 4),
            "thresholds": {"pred_iou_thresh": settings.get("pred_iou_thresh"),
                           "stability_score_thresh": settings.get("stability_score_thresh")},
            "sha256": pretrained_weights("demo").sha256 if not sam_file else sha256sum(path)}
