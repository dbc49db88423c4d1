"""Stage ``cams@{cls,seg}``: inference cache + prompts -> ``cache/cams/<which>.zarr`` (§3, §4).

Per train image, from ``inference.zarr``: the last block on the cached tokens, logits against
the prompts (text encoder over all 77 positions; the context of ``prompts.<which>.cam_iteration``
when set), Softmax-GradCAM of every image-label class in one batched call, then CAA with the
cached last-8-block attention (stored fp16, computed in f32). Group arrays (docs/CONTRACT.md):
``cam`` (P, h, w) f32 raw on the grid of the (possibly ``clip.max_side``-capped) inference image,
``fg_cls`` (P,) i64 ascending, ``cam_caa`` (P, h, w) f32 (absent when CAA is off); attrs
``height``, ``width`` of the original image (consumers resize CAMs to it). Store attrs say
``untrained: true`` for the tiny CLIP.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import click
import numpy as np
import torch

from pipeline.config import to_dict
from pipeline.errors import PipelineError
from pipeline.params import (
    CaaConfig,
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
from pipeline.store import ImageStore, StoreError, finish, with_inputs, write_group
from pipeline.weights import sha256sum
from stages.clip_features import (
    INFERENCE_ARRAYS,
    INFERENCE_STORE,
    build_clip,
    clip_provenance,
    clip_resource_kwargs,
    train_records,
    verify_clip,
)
from stages.execution import (
    WorkerResource,
    check_stage_device,
    run_per_image,
    worker_path,
)
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params
from stages.train_prompts import read_prompts

log = logging.getLogger("wsss.cams")
# Modules whose code decides the CAMs; a change resets the store instead of resuming stale CAMs.
CODE_MODULES = ("pipeline.clip.model", "pipeline.prompts.learner", "pipeline.prompts.training",
                "pipeline.cams.gradcam", "pipeline.cams.caa", "pipeline.cams.score",
                "pipeline.precision")
STAGE = "cams"



class Resource(NamedTuple):
    clip: object
    text_features: torch.Tensor
    n_fg: int


def _build(prompts: str, cam_iteration: int | None = None, **clip_kwargs) -> Resource:
    """Per-process CLIP + trained prompts (the context of ``cam_iteration``, None: final), text
    features computed once over all 77 positions (the reference's inference)."""
    from stages.train_prompts import load_learner

    clip = build_clip(**clip_kwargs)
    learner, _ = load_learner(clip, prompts, cam_iteration)
    with torch.no_grad():
        text = learner.text_features(clip.model)
    return Resource(clip, text, learner.n_fg)


class Item(NamedTuple):
    image_id: str
    labels: tuple[int, ...]
    features: str
    out: str
    caa: CaaConfig
    precision: str
    inputs: str | None = None
    """What the CAMs are computed from (the image, through its features, and its labels)."""


def image_cams(clip, text_features: torch.Tensor, n_fg: int, tokens, labels, grid_hw,
               precision: str = "fp32"):
    """Raw CAMs (P, h, w) f32 and fg_cls (P,) i64 of one image's cached last-block input
    (``tokens`` (1+hw, D)). The Grad-CAM (last block and its gradient) runs in fp32 whatever
    ``precision`` (``pipeline.prompts.training.batched_gradcam``)."""
    from pipeline.precision import autocast
    from pipeline.prompts.training import batched_gradcam

    fg_cls = np.array(sorted(set(int(c) for c in labels)), dtype=np.int64)
    hot = torch.zeros((1, n_fg))
    hot[0, torch.from_numpy(fg_cls)] = 1.0
    device = clip.visual.proj.device
    x = torch.as_tensor(tokens).float().to(device)[None]
    with autocast(device, precision):
        cams = batched_gradcam(clip, text_features, x, hot.to(device), n_fg, grid_hw, create_graph=False)
    return cams.detach().float().cpu().numpy(), fg_cls


def cams_for_image(resource: Resource, item: Item) -> str:
    from pipeline.cams.caa import class_aware_attention_affinity

    store = ImageStore(item.features, arrays=INFERENCE_ARRAYS)
    data, attrs = store.read(item.image_id), store.read_attrs(item.image_id)
    grid = (int(attrs["grid_h"]), int(attrs["grid_w"]))
    cam, fg_cls = image_cams(resource.clip, resource.text_features, resource.n_fg, data["tokens"],
                             item.labels, grid, item.precision)
    arrays = {"cam": cam, "fg_cls": fg_cls}
    if item.caa.enabled:
        # The attention is stored in float16 (as the reference stores it); CAA runs in float32.
        arrays["cam_caa"] = class_aware_attention_affinity(
            cam, data["attention"].astype(np.float32), sinkhorn_iters=item.caa.n_sinkhorn,
            box_thresh=item.caa.t_box, power=item.caa.n_power, propagate=item.caa.propagate,
        ).astype(np.float32)
    write_cams(item.out, item.image_id, arrays, int(attrs["height"]), int(attrs["width"]),
               item.inputs)
    return item.image_id


CAM_ARRAYS = {"cam": ("float32", 3), "fg_cls": ("int64", 1), "cam_caa": ("float32", 3)}
"""(dtype, ndim) of the arrays of a CAM store's group (``cam_caa`` only with CAA), for readers."""


def write_cams(store: str, image_id: str, arrays: dict, height: int, width: int,
               inputs: str | None = None) -> None:
    """One image's group of a CAM store: ``cam``, ``fg_cls`` (and ``cam_caa``), image size."""
    write_group(store, image_id, arrays,
                attrs=with_inputs({"height": height, "width": width}, inputs))


def _check_context(prompts: str, cam_iteration: int | None) -> None:
    """Fail before any work when the checkpoint is not plain data (never unpickled as code) or
    lacks the context the CAMs are to use."""
    state = read_prompts(prompts)
    if cam_iteration is None:
        return
    if cam_iteration not in state.get("contexts", {}):
        raise PipelineError(f"prompts checkpoint {prompts} holds no context of iteration {cam_iteration} "
                         f"(prompts.*.cam_iteration); rerun train-prompts with this cam_iteration")


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
    _check_context(prompts, cam_iteration)
    sha = verify_clip(clip_cfg)
    check_stage_device(compute)
    split = train_records(index_dir, dataset)
    records = split.good()
    features_store = Path(features) / INFERENCE_STORE
    try:
        inference = ImageStore(features_store, arrays=INFERENCE_ARRAYS)
    except StoreError as exc:
        raise PipelineError(str(exc)) from exc
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
    pending = set(store.todo({r.id: labelled_inputs(r) for r in records}))
    todo = [r for r in records if r.id in pending]
    for r in todo:  # before any work: never CAMs of features of another version of the image
        check_inputs(inference, r.id, image_inputs(r), "wsss clip-features")
    items = [Item(r.id, tuple(r.labels), worker_path(features_store), worker_path(store.path), cfg.caa,
                  compute.precision, labelled_inputs(r)) for r in todo]
    resource = WorkerResource.of(_build, files=("prompts", "checkpoint"), thread_safe=True,
                                 prompts=worker_path(prompts), cam_iteration=cam_iteration,
                                 **clip_resource_kwargs(clip_cfg, compute.device))
    run_per_image(cams_for_image, items, compute, resource, desc=f"cams {which}")
    finish(out)
    log.info("cams@%s: %d images computed, %d resumed -> %s", which, len(items),
             len(records) - len(items), out)
