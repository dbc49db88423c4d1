"""Stage ``cams@{cls,seg}``: inference cache + prompts -> ``cache/cams/<which>.zarr`` (§3, §4).

Per train image, from ``inference.zarr``: the last block on the cached tokens, logits against
the prompts (text encoder over all 77 positions; the context of ``prompts.<which>.cam_iteration``
when set), Softmax-GradCAM of every image-label class in one batched call, then CAA with the
cached last-8-block attention (stored fp16, computed in f32). Group arrays (docs/CONTRACT.md):
``cam`` (P, h, w) f32 raw on the grid of the (possibly ``clip.max_side``-capped) inference image,
``fg_cls`` (P,) i64 ascending, ``cam_caa`` (P, h, w) f32 (absent when CAA is off); attrs
``height``, ``width`` of the original image (consumers resize CAMs to it). Store attrs say
``untrained: true`` for the tiny CLIP.

The method is in :mod:`pipeline.cams.inference` (CAMs of one image, the per-process model); the
store's schema in :mod:`pipeline.schemas`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

# (test_golden_gradcam imports _build and image_cams from here)
from pipeline.cams.inference import CamsTask, cams_for_image, check_context, image_cams  # noqa: F401
from pipeline.cams.inference import build_cam_model as _build
from pipeline.clip.factory import clip_kwargs, clip_provenance, verify_clip
from pipeline.config import to_dict
from pipeline.data.datasets import load_split
from pipeline.errors import PipelineError
from pipeline.params import (
    CamsConfig,
    ClipConfig,
    ComputeConfig,
    DatasetConfig,
    PromptsConfig,
    section,
)
from pipeline.provenance import (
    check_inputs,
    code_digest,
    fingerprint,
    image_inputs,
    labelled_inputs,
    package_version,
)
from pipeline.schemas import INFERENCE_STORE, open_inference
from pipeline.store import ImageStore, finish
from pipeline.weights import sha256sum
from stages.execution import fill_store, worker_path
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params
from stages.resources import WorkerResource, check_stage_device

log = logging.getLogger("wsss.cams")
# Modules whose code decides the CAMs; a change resets the store instead of resuming stale CAMs.
CODE_MODULES = ("pipeline.clip.model", "pipeline.clip.factory", "pipeline.prompts.learner",
                "pipeline.prompts.checkpoints", "pipeline.prompts.training", "pipeline.cams.inference",
                "pipeline.cams.gradcam", "pipeline.cams.caa", "pipeline.cams.score",
                "pipeline.precision")
STAGE = "cams"


@click.command("cams")
@click.option("--which", type=click.Choice(["cls", "seg"]), required=True,
              help="Which prompts (and CAA settings) to use.")
@PARAMS_OPTION
@click.option("--features", default="cache/clip_features", show_default=True,
              type=click.Path(file_okay=False), help="CLIP feature cache (clip-features).")
@click.option("--prompts", default=None, type=click.Path(dir_okay=False),
              help="Trained prompts [default: cache/prompts/<which>.pt].")
@INDEX_OPTION
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="CAM store [default: cache/cams/<which>.zarr].")
def command(which, params_path, features, prompts, index_dir, out) -> None:
    """Softmax-GradCAMs (+ CAA) of every train image's present classes."""
    params = load_params(params_path)
    cfg = section(params, f"cams.{which}", CamsConfig)
    cam_iteration = section(params, f"prompts.{which}", PromptsConfig).cam_iteration
    clip_cfg = section(params, "clip", ClipConfig)
    dataset = section(params, "dataset", DatasetConfig)
    compute = section(params, "compute", ComputeConfig)
    prompts = prompts or f"cache/prompts/{which}.pt"
    out = out or f"cache/cams/{which}.zarr"
    if not Path(prompts).is_file():
        raise PipelineError(f"prompts not found: {prompts} (run train-prompts --which {which})")
    check_context(prompts, cam_iteration)
    sha = verify_clip(clip_cfg)
    check_stage_device(compute)
    split = load_split(index_dir, dataset.train_split)
    records = split.good()
    features_store = Path(features) / INFERENCE_STORE
    inference = open_inference(features)
    missing = [r.id for r in records if r.id not in inference]
    if missing:
        raise PipelineError(f"{features_store} lacks image {missing[0]!r} ({len(missing)} missing; "
                         "rerun `wsss clip-features`)")
    provenance = clip_provenance(clip_cfg, sha)
    prompts_sha = sha256sum(prompts)
    attrs = {
        "stage": STAGE, "which": which, "cams": to_dict(cfg), "clip": provenance,
        "untrained": provenance["untrained"], "prompts_sha256": prompts_sha,
        "cam_iteration": cam_iteration, "precision": compute.precision,
        "class_names": list(split.class_names), "package_version": package_version(),
        "fingerprint": fingerprint(STAGE, which, cfg, clip_cfg.result_identity(),
                                   sha, prompts_sha, cam_iteration, compute.precision,
                                   inference.attrs.get("fingerprint"), code_digest(*CODE_MODULES)),
    }
    store = ImageStore.open_for_writing(out, attrs)

    def plan() -> list[CamsTask]:
        pending = set(store.todo({r.id: labelled_inputs(r) for r in records}))
        todo = [r for r in records if r.id in pending]
        for r in todo:  # before any work: never CAMs of features of another version of the image
            check_inputs(inference, r.id, image_inputs(r), "wsss clip-features")
        return [CamsTask(r.id, tuple(r.labels), worker_path(features_store), worker_path(store.path),
                         cfg.caa, compute.precision, labelled_inputs(r), attrs["fingerprint"])
                for r in todo]

    resource = WorkerResource.of(_build, files=("prompts", "checkpoint"), thread_safe=True,
                                 prompts=worker_path(prompts), cam_iteration=cam_iteration,
                                 **{**clip_kwargs(clip_cfg, compute.device),
                                    "checkpoint": worker_path(clip_cfg.checkpoint)})
    computed = fill_store(cams_for_image, plan, compute, resource, desc=f"cams {which}")
    finish(out)
    log.info("cams@%s: %d images computed, %d resumed -> %s", which, computed,
             len(records) - computed, out)
