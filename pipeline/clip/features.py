"""What the frozen CLIP computes once per image (pipeline.md "CLIP feature cache").

CLIP is frozen, so everything before its last block is computed once:

- training views: K augmented views of an image (the §7 augmentation, drawn deterministically
  from the image id and a seed: :func:`view_rng`, :func:`sample_views`) and their last-block
  inputs (:func:`encode_views`), which prompt training then runs the last block on;
- the inference input: the image at inference resolution (each side up to a multiple of 16, PIL
  bicubic, one scale, no flip; long side first capped at ``max_side``), its last-block input and
  the mean attention of the last ``attention_blocks`` blocks (:func:`inference_features`), which
  the CAMs and CAA use.

The stores these go to are described in :mod:`pipeline.schemas`; :func:`features_for_image`
computes and writes both of one image (the ``clip_features`` stage's per-image task).
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import torch

from pipeline.config import to_dict
from pipeline.data.imageio import ImageReadError, read_rgb
from pipeline.errors import PipelineError
from pipeline.params import AugmentConfig
from pipeline.schemas import write_inference, write_views
from pipeline.store import with_inputs


def view_rng(seed: int, image_id: str, *extra: int) -> np.random.Generator:
    """A generator that depends only on (seed, image id, extra): same views in every process."""
    key = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key, *extra])


def sample_views(rng: np.random.Generator, image_hw: tuple[int, int], n: int, augment: AugmentConfig):
    """``n`` view parameters (``pipeline.prompts.augment.ViewParams``) of an image of size
    ``image_hw``, drawn from ``rng`` with the ``augment`` settings."""
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


def training_views(clip, image: np.ndarray, image_id: str, n_views: int, seed: int,
                   augment: AugmentConfig, precision: str = "fp32"):
    """The ``n_views`` training views of one RGB image, drawn from (``seed``, ``image_id``) only,
    and their last-block inputs: (tokens (K, 1+g², D) f32 tensor, list of ``ViewParams``)."""
    views = sample_views(view_rng(seed, image_id), image.shape[:2], n_views, augment)
    return encode_views(clip, image, views, precision=precision), views


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


class FeaturesTask(NamedTuple):
    """One image's work for the two caches (plain data, so it can travel to a worker)."""

    image_id: str
    image: str
    labels: tuple[int, ...]
    n_classes: int
    views_store: str | None
    """``train_views.zarr`` to write the training views to; None: they are not needed."""
    inference_store: str | None
    """``inference.zarr`` to write the inference features to; None: they are not needed."""
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
    digest: str | None = None
    """The image file's content digest as the index recorded it (checked on the bytes read)."""
    views_fingerprint: str | None = None
    """The fingerprint of the views store the task computes for (``pipeline.store.write_group``)."""
    inference_fingerprint: str | None = None
    """The fingerprint of the inference store the task computes for."""


def features_for_image(clip, task: FeaturesTask) -> str:
    """Both caches of one image (whichever is missing), each written atomically. Returns the id."""
    try:
        image = read_rgb(task.image, task.digest)
    except ImageReadError as exc:
        raise PipelineError(f"image {task.image_id} ({task.image}): {exc}") from exc
    h, w = image.shape[:2]
    if task.views_store is not None:
        tokens, views = training_views(clip, image, task.image_id, task.n_views, task.seed,
                                       task.augment, task.precision)
        labels = np.zeros(task.n_classes, np.uint8)
        labels[list(task.labels)] = 1
        write_views(task.views_store, task.image_id, tokens.cpu().numpy(),
                    np.stack([v.to_array() for v in views]), labels, h, w, task.views_inputs,
                    task.views_fingerprint)
    if task.inference_store is not None:
        x, att, (gh, gw), (ih, iw) = inference_features(
            clip, image, task.attention_blocks, task.max_side, task.precision)
        write_inference(task.inference_store, task.image_id, x.cpu().numpy(), att.cpu().numpy(),
                        attrs=with_inputs({"height": h, "width": w, "input_height": ih,
                                           "input_width": iw, "grid_h": gh, "grid_w": gw},
                                          task.inference_inputs),
                        fingerprint=task.inference_fingerprint)
    return task.image_id
