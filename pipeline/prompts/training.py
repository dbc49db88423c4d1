"""One prompt-training step and the batched Grad-CAM it shares with CAM inference (§3, §6, §7).

Functions take the frozen CLIP (``pipeline.clip.model.FrozenClip``), the prompt learner or its
text features, and the cached last-block inputs; they return losses / CAMs as tensors.
"""
from __future__ import annotations

import math

import torch

from pipeline.cams.gradcam import cams_from_weights, gradcam_copies, gradcam_weights
from pipeline.precision import training_autocast
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
    grid_hw: tuple[int, int], create_graph: bool, with_weights: bool = False,
):
    """Raw Softmax-GradCAMs (P, h, w) of every positive of ``labels`` (N, C), row-major order.

    ``x`` (N, 1+hw, D) last-block inputs; one copy of the last block runs per (image, class)
    pair, all in one batched autograd call. ``text_features`` (G, E) with the C = ``n_fg``
    foreground prompts first. ``with_weights`` also returns the Grad-CAM weights (P, D).
    """
    n_bg = text_features.shape[0] - n_fg
    image_idx, target, mask = gradcam_copies(labels, n_bg)
    image_idx, target, mask = image_idx.to(x.device), target.to(x.device), mask.to(x.device)
    # The Grad-CAM runs in fp32 whatever autocast surrounds it: its inner gradient ∂p/∂A is not
    # the loss a GradScaler scales, so in fp16 it would underflow (and bf16 keeps 8 bits of it).
    # One block over the copies; the text encoder that made text_features keeps the autocast.
    with torch.autocast(x.device.type, enabled=False):
        acts, feats = clip.last_block_tail(x[image_idx].float(), requires_grad=True)
        logits = clip_logits(feats, text_features.float(), clip.logit_scale)
        weights = gradcam_weights(acts, logits, target, mask, create_graph=create_graph)
        cams = cams_from_weights(acts, weights, grid_hw)
    return (cams, weights) if with_weights else cams


def classification_loss(clip, learner, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_MCL of a batch of cached views ``x`` (N, 1+hw, D) with image labels (N, C)."""
    with torch.no_grad():
        _, feats = clip.last_block_tail(x)
    logits = clip_logits(feats, learner.text_features(clip.model), clip.logit_scale)
    return multilabel_contrastive_loss(logits[:, : learner.n_fg], labels)


def classification_weight(labels: torch.Tensor) -> int:
    """How many terms L_MCL averages over: the positives of images with a positive and a negative.

    A batch split into sub-batches gets the full-batch gradient when each sub-batch loss is
    weighted by its share of this count (see :func:`sub_batches`).
    """
    pos = labels.to(torch.bool)
    valid = pos.any(dim=1) & (~pos).any(dim=1)
    return int(pos[valid].sum())


def present_classes(seed_crops: torch.Tensor, n_fg: int) -> torch.Tensor:
    """(N, C) multi-hot of the foreground classes present in each seed crop (N, H, W)."""
    values = seed_crops.long().flatten(1)
    valid = (values >= 1) & (values <= n_fg)
    hot = torch.zeros((values.shape[0], n_fg + 1), dtype=torch.float32, device=values.device)
    hot.scatter_(1, torch.where(valid, values, 0), 1.0)
    return hot[:, 1:]


LOSS_CLASSES = ("crop", "image")
"""Which classes the seg loss explains per view: those present in the augmented seed crop (VOC,
the reference default) or the image-level labels (COCO: a labelled class absent from the crop
still gets a CAM, an all-background L_bg term and a place in the softmax mask)."""


def segmentation_labels(
    image_labels: torch.Tensor, seed_crops: torch.Tensor, loss_classes: str = "crop"
) -> torch.Tensor:
    """(N, C) multi-hot of the classes L_CAL uses for each view (see :data:`LOSS_CLASSES`)."""
    if loss_classes == "crop":
        return present_classes(seed_crops, image_labels.shape[1]).to(image_labels.device)
    if loss_classes == "image":
        return image_labels.to(torch.float32)
    raise ValueError(f"loss_classes must be one of {LOSS_CLASSES}, got {loss_classes!r}")


def segmentation_weight(labels: torch.Tensor, seed_crops: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many pixels L_CAL divides by: for every (view, class) pair of ``labels``, the view's
    pixels that are not ``ignore_index`` (each is foreground or background of that class)."""
    counted = (seed_crops != ignore_index).flatten(1).sum(dim=1).to(labels.device)
    return int((labels.to(torch.bool).sum(dim=1) * counted).sum())


def segmentation_loss(
    clip, learner, x: torch.Tensor, seed_crops: torch.Tensor, labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, int]:
    """(L_CAL, number of (view, class) pairs) of a batch against its seed crops.

    ``labels`` (N, C): the classes to explain per view (:func:`segmentation_labels`); None: the
    classes present in each seed crop. The token grid is the crop's (``seed_crops`` (N, H, W)
    is cropped like the view, so any crop that is a multiple of the patch size works). With no
    class, the loss is a zero that still reaches the context (so ``backward`` is harmless) and
    the count is 0: callers skip the step (the reference crashes there).
    """
    if labels is None:
        labels = present_classes(seed_crops, learner.n_fg)
    labels = labels.to(x.device)
    text = learner.text_features(clip.model)
    if not bool(labels.any()):
        return text.sum() * 0.0, 0
    patch = clip.patch_size
    grid_hw = (seed_crops.shape[-2] // patch, seed_crops.shape[-1] // patch)
    cams = batched_gradcam(clip, text, x, labels, learner.n_fg, grid_hw, create_graph=True)
    loss_fg, loss_bg = cam_activation_loss(cams, labels, seed_crops, ignore_index)
    return loss_fg + loss_bg, int(labels.sum())


def sub_batches(n: int, k: int) -> list[slice]:
    """``k`` contiguous, nearly equal slices of a batch of ``n`` samples (§7 memory split).

    The reference splits each batch of 16 into 4 (COCO cls) or 8 (COCO seg) sub-batches and
    accumulates their gradients before one optimizer step. Both losses are means over terms that
    do not interact across samples (L_MCL over positives, L_CAL over counted pixels), so the
    trainer weights sub-batch loss j by ``weight_j / Σ weight`` (:func:`classification_weight`,
    :func:`segmentation_weight`): the accumulated gradient is the full-batch gradient.
    """
    if not 1 <= k <= n:
        raise ValueError(f"cannot split a batch of {n} into {k} sub-batches")
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def optimizer_iteration(which: str, cfg, clip, learner, batch, device,
                        optimizer, scheduler, scaler, precision: str = "fp32") -> float:
    """One training iteration on ``batch`` = (x, labels, crops or None): gradients by
    :func:`batch_step`, the optimizer step (skipped for a segmentation batch without any class),
    the scheduler step. ``precision``: one of ``pipeline.precision.TRAINING_PRECISIONS``, with
    ``scaler`` from ``pipeline.precision.grad_scaler``. Returns the batch loss."""
    x, labels, crops = batch
    optimizer.zero_grad(set_to_none=True)
    loss, stepped = batch_step(which, cfg, clip, learner, x.to(device), labels.to(device),
                               None if crops is None else crops.to(device), scaler, precision)
    if stepped:
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()
    return loss


def batch_step(which: str, cfg, clip, learner, x: torch.Tensor,
               labels: torch.Tensor, crops: torch.Tensor | None, scaler,
               precision: str = "fp32") -> tuple[float, bool]:
    """Gradient of one batch into ``learner.ctx.grad`` (sub-batch by sub-batch); returns
    (full-batch loss, whether the optimizer should step). ``cfg`` carries ``sub_batches`` and
    ``loss_classes`` (the stage's ``prompts.<which>`` config).

    Sub-batch j's loss (a mean over its own terms) is weighted by ``w_j / Σ w`` with w its term
    count, so the accumulated gradient is the full-batch gradient (pipeline.prompts.training).
    A classification batch always steps (a batch without a valid image has a zero loss, as in
    the reference); a segmentation batch without any class skips its step (the reference crashes).
    """
    parts = sub_batches(x.shape[0], cfg.sub_batches)
    if which == "cls":
        part_labels = [labels[p] for p in parts]
        weights = [classification_weight(l) for l in part_labels]
    else:
        part_labels = [segmentation_labels(labels[p], crops[p], cfg.loss_classes) for p in parts]
        weights = [segmentation_weight(l, crops[p]) for l, p in zip(part_labels, parts)]
    total = sum(weights)
    if which == "seg" and total == 0:
        return 0.0, False
    loss_value = 0.0
    for p, l, w in zip(parts, part_labels, weights):
        if which == "seg" and w == 0:
            continue
        share = w / total if total else 0.0
        with training_autocast(x.device, precision):
            if which == "cls":
                loss = classification_loss(clip, learner, x[p], l)
            else:
                loss, _ = segmentation_loss(clip, learner, x[p], crops[p], l)
        scaler.scale(loss * share).backward()
        loss_value += float(loss.detach()) * share
    return loss_value, True
