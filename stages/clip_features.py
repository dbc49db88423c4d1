"""Stage ``clip_features``: train images -> ``cache/clip_features/`` (pipeline.md "CLIP feature cache").

CLIP is frozen, so everything before its last block is computed once here:

- ``train_views.zarr``: per train image, K augmented views (the §7 augmentation, drawn
  deterministically from the image id and ``clip_features.seed``): ``tokens`` (K, 1+g², D) fp16,
  the residual-stream input of the last block, one chunk per view (a training step reads only
  the view it draws); ``views`` (K, 18) f32, the view parameters
  (``pipeline.prompts.augment.ViewParams.to_array``) so seed maps can be given the same transform;
  ``labels`` (C,) uint8 multi-hot image labels.
- ``inference.zarr``: per train image at inference resolution (each side up to a multiple of 16,
  PIL bicubic, one scale, no flip; long side first capped at ``clip.max_side``): ``tokens``
  (1+hw, D) f32 and ``attention`` (hw, hw) f16 (the reference stores it in half precision too;
  CAA reloads it as f32), the last-``clip.attention_blocks`` mean attention; attrs ``height``,
  ``width`` (original), ``input_height``, ``input_width`` (what CLIP saw) and ``grid_h``,
  ``grid_w``.

The method is in :mod:`pipeline.clip.features` (views, features) and :mod:`pipeline.clip.factory`
(the model); the stores' schemas in :mod:`pipeline.schemas`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

from pipeline.clip.factory import build_clip, clip_kwargs, clip_provenance, verify_clip
# (test_golden_gradcam imports inference_features from here)
from pipeline.clip.features import FeaturesTask, features_for_image, inference_features  # noqa: F401
from pipeline.config import to_dict
from pipeline.data.datasets import load_split
from pipeline.errors import PipelineError
from pipeline.params import (
    ClipConfig,
    ClipFeaturesConfig,
    ComputeConfig,
    DatasetConfig,
    section,
)
from pipeline.provenance import (
    code_digest,
    fingerprint,
    image_inputs,
    labelled_inputs,
    package_version,
)
from pipeline.schemas import CLIP_FEATURES_LAYOUT, INFERENCE_STORE, VIEWS_STORE
from pipeline.store import ImageStore, finish
from stages.execution import fill_store, worker_path
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params
from stages.resources import WorkerResource, check_stage_device

# Modules whose code decides the cached features (code deps of the stage in dvc.yaml).
CODE_MODULES = ("pipeline.clip.model", "pipeline.clip.factory", "pipeline.clip.features",
                "pipeline.prompts.augment", "pipeline.data.imageio", "pipeline.precision")

log = logging.getLogger("wsss.clip_features")
STAGE = "clip_features"


@click.command("clip-features")
@PARAMS_OPTION
@INDEX_OPTION
@click.option("--out", default="cache/clip_features", show_default=True,
              type=click.Path(file_okay=False), help="Directory of the two feature stores.")
def command(params_path: str, index_dir: str, out: str) -> None:
    """Frozen-CLIP caches: last-block inputs of K training views and of the inference image."""
    params = load_params(params_path)
    clip_cfg = section(params, "clip", ClipConfig)
    cfg = section(params, "clip_features", ClipFeaturesConfig)
    dataset = section(params, "dataset", DatasetConfig)
    compute = section(params, "compute", ComputeConfig)
    if cfg.n_views < 1:
        raise PipelineError(f"params.yaml: clip_features.n_views must be >= 1, got {cfg.n_views}")
    sha = verify_clip(clip_cfg)
    check_stage_device(compute)
    split = load_split(index_dir, dataset.train_split)
    records = split.good()
    provenance = clip_provenance(clip_cfg, sha)
    common = {"stage": STAGE, "clip": provenance, "untrained": provenance["untrained"],
              "class_names": list(split.class_names), "dataset": split.dataset,
              "precision": compute.precision, "package_version": package_version()}
    # The code digest resets the stores when the feature code changes (DVC reruns; no stale resume).
    code_fp = (code_digest(*CODE_MODULES), CLIP_FEATURES_LAYOUT, compute.precision)
    views_attrs = {**common, "clip_features": to_dict(cfg),
                   "fingerprint": fingerprint("views", clip_cfg.model_identity(), code_fp, sha, cfg,
                                              split.class_names)}
    inf_attrs = {**common, "attention_blocks": clip_cfg.attention_blocks, "max_side": clip_cfg.max_side,
                 "fingerprint": fingerprint("inference", clip_cfg.result_identity(), code_fp, sha)}
    capped = [r for r in records if clip_cfg.max_side is not None
              and max(r.height, r.width) > clip_cfg.max_side]
    if capped:
        log.warning("clip.max_side=%d: %d of %d images are larger; CLIP sees them with the long "
                    "side at %d px (CAMs are mapped back to each image's size); null = native size",
                    clip_cfg.max_side, len(capped), len(records), clip_cfg.max_side)
    out_dir = Path(out)
    views = ImageStore.open_for_writing(out_dir / VIEWS_STORE, views_attrs)
    inference = ImageStore.open_for_writing(out_dir / INFERENCE_STORE, inf_attrs)

    def plan() -> list[FeaturesTask]:
        items = []
        pending_v = set(views.todo({r.id: labelled_inputs(r) for r in records}))
        pending_i = set(inference.todo({r.id: image_inputs(r) for r in records}))
        for r in records:
            todo_v = r.id in pending_v
            todo_i = r.id in pending_i
            if todo_v or todo_i:
                items.append(FeaturesTask(
                    r.id, worker_path(r.image), tuple(r.labels), len(split.class_names),
                    worker_path(views.path) if todo_v else None,
                    worker_path(inference.path) if todo_i else None,
                    cfg.n_views, cfg.seed, cfg.augment, clip_cfg.attention_blocks,
                    clip_cfg.max_side, compute.precision, labelled_inputs(r), image_inputs(r),
                    r.digest, views_attrs["fingerprint"], inf_attrs["fingerprint"],
                ))
        return items

    resource = WorkerResource.of(build_clip, files=("checkpoint",), thread_safe=True,
                                 **{**clip_kwargs(clip_cfg, compute.device),
                                    "checkpoint": worker_path(clip_cfg.checkpoint)})
    computed = fill_store(features_for_image, plan, compute, resource, desc="clip features")
    finish(views.path)
    finish(inference.path)
    log.info("clip_features: %d images computed, %d resumed, in %s", computed,
             len(records) - computed, out_dir)
