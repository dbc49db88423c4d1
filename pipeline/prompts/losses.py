"""Prompt-training losses (algorithms.md §6): multi-label contrastive L_MCL and CAM activation L_CAL.

Both take the per-batch tensors the training step already has and return scalar tensors that
backpropagate to the prompts (through the logits, or through the Grad-CAM weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
"""Seed-map value that is neither foreground nor background (VOC convention)."""


def multilabel_contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_MCL: each positive class against all negatives of its own image.

    ``logits`` (N, C) are the *foreground* logits only (background prompts are never negatives);
    ``labels`` (N, C) is the multi-hot image-level label. Per positive (n, c) of a valid image
    (one with at least one positive and one negative)
    ``ℓ = −(Y[n,c] − log(exp Y[n,c] + Σ_{negatives j} exp Y[n,j]))``; the loss is the mean of ℓ
    over all those positives. A batch with no valid image returns ``0 · mean(Y)`` so that the
    backward pass still runs (and gives zero gradients).
    """
    pos = labels.to(torch.bool)
    neg = ~pos
    valid = pos.any(dim=1) & neg.any(dim=1)
    if not bool(valid.any()):
        return logits.mean() * 0.0
    neg_lse = torch.logsumexp(logits.masked_fill(pos, float("-inf")), dim=1, keepdim=True)
    per_entry = torch.logaddexp(logits, neg_lse) - logits
    selected = pos & valid[:, None]
    return per_entry[selected].mean()


def positive_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, class index) of every positive of ``labels`` (N, C), row-major order.

    This is the order in which the CAMs of a batch are stacked (ascending class per image).
    """
    image_idx, class_idx = torch.nonzero(labels.to(torch.bool), as_tuple=True)
    return image_idx, class_idx


def cam_activation_loss(
    cams: torch.Tensor, labels: torch.Tensor, seed_map: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_CAL = (L_fg, L_bg) on raw Grad-CAMs against the coarse seed crop.

    ``cams`` (P, h, w) are the raw CAMs of the positives of ``labels`` (N, C) in row-major order
    (see :func:`positive_pairs`); ``seed_map`` (N, H, W) uint8 holds 0 = background, c+1 = class c
    and ``ignore_index``. CAMs are upsampled bilinearly (align_corners=False) to H×W. For CAM i of
    class c_i in image n_i: fg = seed == c_i+1, bg = seed ∉ {c_i+1, ignore} (other classes count
    as background); m_i = max(0, max cam_i·fg) is detached so the foreground is pulled towards the
    CAM's own peak; L_fg = Σ_fg |m_i − cam_i| / N and L_bg = Σ_bg relu(cam_i) / N with N the total
    number of fg and bg pixels. With no positive (or no counted pixel) both losses are zero
    tensors that still carry the graph of ``cams``.
    """
    image_idx, class_idx = positive_pairs(labels)
    if cams.shape[0] != image_idx.numel():
        raise ValueError(f"{cams.shape[0]} CAMs for {image_idx.numel()} positive labels")
    if cams.shape[0] == 0:
        zero = cams.sum() * 0.0
        return zero, zero.clone()
    up = F.interpolate(cams[:, None], size=tuple(seed_map.shape[-2:]), mode="bilinear",
                       align_corners=False)[:, 0]
    seeds = seed_map.to(up.device).long()[image_idx]
    target = (class_idx.to(up.device) + 1)[:, None, None]
    fg = seeds == target
    bg = (seeds != target) & (seeds != ignore_index)
    fgf = fg.to(up.dtype)
    bgf = bg.to(up.dtype)
    peak = (up * fgf).flatten(1).amax(dim=1).clamp_min(0.0).detach()
    count = fgf.sum() + bgf.sum()
    if float(count) == 0.0:
        zero = up.sum() * 0.0
        return zero, zero.clone()
    loss_fg = ((peak[:, None, None] - up).abs() * fgf).sum() / count
    loss_bg = (up.clamp_min(0.0) * bgf).sum() / count
    return loss_fg, loss_bg
