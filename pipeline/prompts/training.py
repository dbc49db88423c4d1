"""One prompt-training step and the batched Grad-CAM it shares with CAM inference (§3, §6, §7).

Functions take the frozen CLIP (``pipeline.clip.model.FrozenClip``), the prompt learner or its
text features, and the cached last-block inputs; they return losses / CAMs as tensors.
"""
from __future__ import annotations

import math

import torch

from pipeline.cams.gradcam import gradcam_copies, softmax_gradcam
from pipeline.prompts.losses import IGNORE_INDEX, cam_activation_loss, multilabel_contrastive_loss
from pipeline.prompts.learner import clip_logits


def warmup_cosine_factor(iteration: int, total: int, warmup: int, warmup_lr: float, lr: float) -> float:
    """Multiplier of the base ``lr`` at ``iteration`` (§7).

    Constant ``warmup_lr`` for the first ``warmup`` iterations, then cosine from ``lr`` to 0 over
    the remaining ``total − warmup`` iterations.
    """
    if iteration < warmup:
        return warmup_lr / lr
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(iteration - warmup, span) / span))


def batched_gradcam(
    clip, text_features: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, n_fg: int,
    grid_hw: tuple[int, int], create_graph: bool,
) -> torch.Tensor:
    """Raw Softmax-GradCAMs (P, h, w) of every positive of ``labels`` (N, C), row-major order.

    ``x`` (N, 1+hw, D) last-block inputs; one copy of the last block runs per (image, class)
    pair, all in one batched autograd call. ``text_features`` (G, E) with the C = ``n_fg``
    foreground prompts first.
    """
    n_bg = text_features.shape[0] - n_fg
    image_idx, target, mask = gradcam_copies(labels, n_bg)
    image_idx, target, mask = image_idx.to(x.device), target.to(x.device), mask.to(x.device)
    acts, feats = clip.last_block_tail(x[image_idx], requires_grad=True)
    logits = clip_logits(feats, text_features, clip.logit_scale)
    return softmax_gradcam(acts, logits, target, mask, grid_hw, create_graph=create_graph)


def classification_loss(clip, learner, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_MCL of a batch of cached views ``x`` (N, 1+hw, D) with image labels (N, C)."""
    with torch.no_grad():
        _, feats = clip.last_block_tail(x)
    logits = clip_logits(feats, learner.text_features(clip.model), clip.logit_scale)
    return multilabel_contrastive_loss(logits[:, : learner.n_fg], labels)


def present_classes(seed_crops: torch.Tensor, n_fg: int) -> torch.Tensor:
    """(N, C) multi-hot of the foreground classes present in each seed crop (N, H, W)."""
    values = seed_crops.long().flatten(1)
    valid = (values >= 1) & (values <= n_fg)
    hot = torch.zeros((values.shape[0], n_fg + 1), dtype=torch.float32, device=values.device)
    hot.scatter_(1, torch.where(valid, values, 0), 1.0)
    return hot[:, 1:]


def segmentation_loss(
    clip, learner, x: torch.Tensor, seed_crops: torch.Tensor, grid_hw: tuple[int, int] = (14, 14),
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, int]:
    """(L_CAL, number of present (image, class) pairs) of a batch against its seed crops.

    Present classes are those in each seed crop. With none, the loss is a zero that still
    reaches the context (so ``backward`` is harmless) and the count is 0: callers skip the step.
    """
    labels = present_classes(seed_crops, learner.n_fg)
    text = learner.text_features(clip.model)
    if not bool(labels.any()):
        return text.sum() * 0.0, 0
    cams = batched_gradcam(clip, text, x, labels, learner.n_fg, grid_hw, create_graph=True)
    loss_fg, loss_bg = cam_activation_loss(cams, labels, seed_crops, ignore_index)
    return loss_fg + loss_bg, int(labels.sum())
