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

Also home of the ``clip`` section's typed config and of the per-process CLIP factory shared by
``train_prompts`` and ``cams``.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import NamedTuple

import click
import numpy as np
import torch

from pipeline.config import to_dict
from pipeline.data.datasets import DatasetError, load_split
from pipeline.data.imageio import ImageReadError, read_rgb
from pipeline.device import torch_device
from pipeline.errors import PipelineError
from pipeline.params import (
    CLIP_SOURCE,
    AugmentConfig,
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
from pipeline.store import ImageStore, finish, with_inputs, write_group
from pipeline.weights import CheckpointError, resolve_checkpoint, sha256sum
from stages.execution import (
    WorkerResource,
    check_stage_device,
    run_per_image,
    worker_path,
)
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params

# Modules whose code decides the cached features (code deps of the stage in dvc.yaml).
CODE_MODULES = ("pipeline.clip.model", "pipeline.prompts.augment", "pipeline.data.imageio",
                "pipeline.precision")
# Version of the stored layout (dtypes, chunking); part of the fingerprints so a store written
# with another layout is rebuilt instead of resumed. 2: fp16 attention, one chunk per view.
STORE_LAYOUT = 2

log = logging.getLogger("wsss.clip_features")
STAGE = "clip_features"
VIEWS_STORE = "train_views.zarr"
INFERENCE_STORE = "inference.zarr"



def verify_clip(cfg: ClipConfig) -> str | None:
    """Check the checkpoint once in the main process; returns its SHA-256 (None: no file).

    The expected checksum is ``clip.checkpoint_sha256``, else the published one of a known official
    file (OpenAI's ViT-B-16.pt). The Hugging Face conversion's checksum is not published: such a
    file is not verified, and its SHA-256 goes into every store's provenance instead.
    """
    from pipeline.clip.model import known_sha256

    if cfg.model == "tiny" or cfg.checkpoint is None:
        return None
    expected = cfg.checkpoint_sha256 or known_sha256(cfg.model, cfg.checkpoint)
    try:
        path = resolve_checkpoint(cfg.checkpoint, expected, f"CLIP {cfg.model}", CLIP_SOURCE,
                                  "clip.checkpoint")
    except CheckpointError as exc:
        raise PipelineError(str(exc)) from exc
    if expected:
        return expected.lower()
    actual = sha256sum(path)
    log.warning("CLIP checkpoint %s is not verified (no published checksum); its SHA-256 %s is "
                "recorded in the outputs' provenance; pin it with clip.checkpoint_sha256", path, actual)
    return actual


def clip_provenance(cfg: ClipConfig, sha256: str | None) -> dict:
    """What results depend on: architecture, weights checksum (not the file's location), seed."""
    return {
        "model": cfg.model, "checkpoint_sha256": sha256, "pretrained_tag": cfg.pretrained_tag,
        "seed": cfg.seed if sha256 is None and cfg.pretrained_tag is None else None,
        "untrained": cfg.model == "tiny" and cfg.pretrained_tag is None,
    }


def build_clip(model: str, checkpoint: str | None, pretrained_tag: str | None, seed: int, device: str):
    """Per-process CLIP factory (WorkerResource: module-level, plain-data kwargs)."""
    from pipeline.clip.model import create_clip

    clip = create_clip(model, checkpoint=None if model == "tiny" else checkpoint,
                       pretrained_tag=pretrained_tag, seed=seed)
    return clip.to(torch_device(device))


def clip_resource_kwargs(cfg: ClipConfig, device: str) -> dict:
    return dict(model=cfg.model, checkpoint=worker_path(cfg.checkpoint), pretrained_tag=cfg.pretrained_tag,
                seed=cfg.seed, device=device)



def view_rng(seed: int, image_id: str, *extra: int) -> np.random.Generator:
    """A generator that depends only on (seed, image id, extra): same views in every process."""
    key = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key, *extra])


def sample_views(rng: np.random.Generator, image_hw: tuple[int, int], n: int, augment: AugmentConfig):
    from pipeline.prompts.augment import sample_view

    return [sample_view(rng, image_hw, **to_dict(augment)) for _ in range(n)]


def encode_views(clip, image: np.ndarray | None, views, images=None, precision: str = "fp32") -> torch.Tensor:
    """Last-block input tokens (K, 1+g², D) of views of one ``image`` (or view k of images[k])."""
    from pipeline.clip.model import to_model_input
    from pipeline.precision import autocast
    from pipeline.prompts.augment import apply_view_image

    images = images if images is not None else [image] * len(views)
    crops = np.stack([apply_view_image(im, v) for im, v in zip(images, views)])
    device = clip.visual.proj.device
    with torch.no_grad(), autocast(device, precision):
        return clip.encode_to_last_block(to_model_input(crops).to(device)).float()


def inference_features(clip, image: np.ndarray, attention_blocks: int, max_side: int | None,
                       precision: str = "fp32"):
    """The inference cache of one RGB image (§3): (last-block input (1+hw, D) f32 tensor,
    last-``attention_blocks`` mean attention (hw, hw) f32 tensor, grid (h, w), input (H', W')).

    One scale, no flip; the image is resized by ``pipeline.clip.model.inference_resize``.
    ``precision`` runs the encoder under ``pipeline.precision.autocast`` (fp32: the reference).
    """
    from pipeline.clip.model import inference_resize, to_model_input
    from pipeline.precision import autocast

    patch = clip.patch_size
    resized = inference_resize(image, max_side, patch)
    device = clip.visual.proj.device
    with torch.no_grad(), autocast(device, precision):
        x, att = clip.encode_with_attention(to_model_input(resized[None]).to(device), attention_blocks)
    grid = (resized.shape[0] // patch, resized.shape[1] // patch)
    return x[0].float(), att[0].float(), grid, resized.shape[:2]


class Item(NamedTuple):
    image_id: str
    image: str
    labels: tuple[int, ...]
    n_classes: int
    views_store: str | None
    inference_store: str | None
    n_views: int
    seed: int
    augment: AugmentConfig
    attention_blocks: int
    max_side: int | None
    precision: str
    views_inputs: str | None = None
    """What the views are computed from (image and labels), recorded with them."""
    inference_inputs: str | None = None
    """What the inference features are computed from (the image)."""


def features_for_image(clip, item: Item) -> str:
    """Both caches of one image (whichever is missing), each written atomically."""
    try:
        image = read_rgb(item.image)
    except ImageReadError as exc:
        raise PipelineError(f"image {item.image_id} ({item.image}): {exc}") from exc
    h, w = image.shape[:2]
    if item.views_store is not None:
        views = sample_views(view_rng(item.seed, item.image_id), (h, w), item.n_views, item.augment)
        tokens = encode_views(clip, image, views, precision=item.precision)
        labels = np.zeros(item.n_classes, np.uint8)
        labels[list(item.labels)] = 1
        write_views(item.views_store, item.image_id, tokens.cpu().numpy(),
                    np.stack([v.to_array() for v in views]), labels, h, w, item.views_inputs)
    if item.inference_store is not None:
        x, att, (gh, gw), (ih, iw) = inference_features(
            clip, image, item.attention_blocks, item.max_side, item.precision)
        write_inference(item.inference_store, item.image_id, x.cpu().numpy(), att.cpu().numpy(),
                        attrs=with_inputs({"height": h, "width": w, "input_height": ih,
                                           "input_width": iw, "grid_h": gh, "grid_w": gw},
                                          item.inference_inputs))
    return item.image_id


VIEWS_ARRAYS = {"tokens": ("float16", 3), "views": ("float32", 2), "labels": ("uint8", 1)}
"""(dtype, ndim) of the arrays of a ``train_views.zarr`` group, for its readers."""
INFERENCE_ARRAYS = {"tokens": ("float32", 2), "attention": ("float16", 2)}
"""(dtype, ndim) of the arrays of an ``inference.zarr`` group, for its readers."""


def write_views(store: str, image_id: str, tokens: np.ndarray, views: np.ndarray,
                labels: np.ndarray, height: int, width: int, inputs: str | None = None) -> None:
    """One image's group of ``train_views.zarr``: tokens (K, 1+g², D) as fp16, one chunk per view."""
    write_group(store, image_id, {
        "tokens": tokens.astype(np.float16),
        "views": views.astype(np.float32),
        "labels": labels,
    }, attrs=with_inputs({"height": height, "width": width}, inputs),
        chunks={"tokens": (1, *tokens.shape[1:])})


def write_inference(store: str, image_id: str, tokens: np.ndarray, attention: np.ndarray,
                    attrs: dict) -> None:
    """One image's group of ``inference.zarr``: tokens as given (f32), attention as fp16."""
    write_group(store, image_id, {"tokens": tokens, "attention": attention.astype(np.float16)},
                attrs=attrs)


def train_records(index_dir: str, dataset: DatasetConfig):
    try:
        split = load_split(index_dir, dataset.train_split)
    except DatasetError as exc:
        raise PipelineError(str(exc)) from exc
    return split


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
    split = train_records(index_dir, dataset)
    records = split.good()
    provenance = clip_provenance(clip_cfg, sha)
    common = {"stage": STAGE, "clip": provenance, "untrained": provenance["untrained"],
              "class_names": list(split.class_names), "dataset": split.dataset,
              "precision": compute.precision, "package_version": package_version()}
    # The code digest resets the stores when the feature code changes (DVC reruns; no stale resume).
    code_fp = (code_digest(*CODE_MODULES), STORE_LAYOUT, compute.precision)
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
    items = []
    pending_v = set(views.todo({r.id: labelled_inputs(r) for r in records}))
    pending_i = set(inference.todo({r.id: image_inputs(r) for r in records}))
    for r in records:
        todo_v = r.id in pending_v
        todo_i = r.id in pending_i
        if todo_v or todo_i:
            items.append(Item(
                r.id, worker_path(r.image), tuple(r.labels), len(split.class_names),
                worker_path(views.path) if todo_v else None,
                worker_path(inference.path) if todo_i else None,
                cfg.n_views, cfg.seed, cfg.augment, clip_cfg.attention_blocks, clip_cfg.max_side,
                compute.precision, labelled_inputs(r), image_inputs(r),
            ))
    resource = WorkerResource.of(build_clip, files=("checkpoint",), thread_safe=True,
                                 **clip_resource_kwargs(clip_cfg, compute.device))
    run_per_image(features_for_image, items, compute, resource, desc="clip features")
    finish(views.path)
    finish(inference.path)
    log.info("clip_features: %d images computed, %d resumed, in %s", len(items),
             len(records) - len(items), out_dir)
