"""CAMs of one image with trained prompts (algorithms.md §3, §4).

From an image's inference cache (``pipeline.clip.features.inference_features``): the last block
on the cached tokens, logits against the prompts (text encoder over all 77 positions; the context
of ``prompts.<which>.cam_iteration`` when set), Softmax-GradCAM of every image-label class in one
batched call (:func:`image_cams`), then CAA with the cached last-``attention_blocks`` attention
(:func:`cams_with_caa`). :func:`build_cam_model` builds what these need once per process;
:func:`cams_for_image` reads one image's cache, computes its CAMs and writes them (the ``cams``
stage's per-image task).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from pipeline.clip.factory import build_clip
from pipeline.errors import PipelineError
from pipeline.params import CaaConfig
from pipeline.prompts.checkpoints import load_learner, read_prompts
from pipeline.schemas import INFERENCE_ARRAYS, write_cams
from pipeline.store import ImageStore


class CamModel(NamedTuple):
    """The frozen CLIP, the prompts' text features (G, E), foreground prompts first, and how many
    of them are foreground."""

    clip: object
    text_features: torch.Tensor
    n_fg: int


def build_cam_model(prompts: str, cam_iteration: int | None = None, **clip_kwargs) -> CamModel:
    """Per-process CLIP + trained prompts (the context of ``cam_iteration``, None: final), text
    features computed once over all 77 positions (the reference's inference). ``clip_kwargs``:
    :func:`pipeline.clip.factory.build_clip`'s (plain data, so it can be a worker resource)."""
    clip = build_clip(**clip_kwargs)
    learner, _ = load_learner(clip, prompts, cam_iteration)
    with torch.no_grad():
        text = learner.text_features(clip.model)
    return CamModel(clip, text, learner.n_fg)


def check_context(prompts: str, cam_iteration: int | None) -> None:
    """Fail before any work when the checkpoint is not plain data (never unpickled as code) or
    lacks the context the CAMs are to use."""
    state = read_prompts(prompts)
    if cam_iteration is None:
        return
    if cam_iteration not in state.get("contexts", {}):
        raise PipelineError(f"prompts checkpoint {prompts} holds no context of iteration {cam_iteration} "
                         f"(prompts.*.cam_iteration); rerun train-prompts with this cam_iteration")


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


def cams_with_caa(model: CamModel, tokens, attention: np.ndarray, labels, grid_hw,
                  caa: CaaConfig, precision: str = "fp32") -> dict[str, np.ndarray]:
    """One image's CAM arrays (``pipeline.schemas.CAM_ARRAYS``): ``cam`` (P, h, w) f32 raw,
    ``fg_cls`` (P,) i64 and, when ``caa.enabled``, ``cam_caa`` (P, h, w) f32, from its cached
    last-block input ``tokens`` (1+hw, D) and mean ``attention`` (hw, hw)."""
    from pipeline.cams.caa import class_aware_attention_affinity

    cam, fg_cls = image_cams(model.clip, model.text_features, model.n_fg, tokens, labels, grid_hw,
                             precision)
    arrays = {"cam": cam, "fg_cls": fg_cls}
    if caa.enabled:
        # The attention is stored in float16 (as the reference stores it); CAA runs in float32.
        arrays["cam_caa"] = class_aware_attention_affinity(
            cam, attention.astype(np.float32), sinkhorn_iters=caa.n_sinkhorn,
            box_thresh=caa.t_box, power=caa.n_power, propagate=caa.propagate,
        ).astype(np.float32)
    return arrays


class CamsTask(NamedTuple):
    """One image's CAM work (plain data, so it can travel to a worker)."""

    image_id: str
    labels: tuple[int, ...]
    features: str
    """The ``inference.zarr`` store holding the image's inference cache."""
    out: str
    """The CAM store to write to."""
    caa: CaaConfig
    precision: str
    inputs: str | None = None
    """What the CAMs are computed from (the image, through its features, and its labels)."""
    fingerprint: str | None = None
    """The CAM store's fingerprint the task computes for (``pipeline.store.write_group``)."""


def cams_for_image(model: CamModel, task: CamsTask) -> str:
    """One image's CAMs from its inference cache, written atomically. Returns the image id."""
    store = ImageStore(task.features, arrays=INFERENCE_ARRAYS)
    data, attrs = store.read(task.image_id), store.read_attrs(task.image_id)
    grid = (int(attrs["grid_h"]), int(attrs["grid_w"]))
    arrays = cams_with_caa(model, data["tokens"], data["attention"], task.labels, grid, task.caa,
                           task.precision)
    write_cams(task.out, task.image_id, arrays, int(attrs["height"]), int(attrs["width"]),
               task.inputs, task.fingerprint)
    return task.image_id
