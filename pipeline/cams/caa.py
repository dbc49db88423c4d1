"""Class-aware attention affinity, CAA (algorithms.md §4): refine CAMs with the ViT's attention.

The last-8-block attention is made doubly stochastic (Sinkhorn), symmetrised and raised to a power,
then each class propagates its score (or raw CAM) only from inside the boxes of its own
high-score regions, so attention from other objects cannot leak into the class.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from pipeline.cams.score import cam_score

PROPAGATE = ("score", "cam")
"""What is propagated through the affinity: the min–max score or the raw CAM."""


def sinkhorn_affinity(att: torch.Tensor, sinkhorn_iters: int, power: int) -> torch.Tensor:
    """Column- then row-normalise ``att`` (hw, hw) ``sinkhorn_iters`` times, symmetrise, ``A^power``."""
    a = att
    for _ in range(sinkhorn_iters):
        a = a / a.sum(dim=0, keepdim=True)
        a = a / a.sum(dim=1, keepdim=True)
    a = (a + a.T) / 2
    return torch.linalg.matrix_power(a, power)


def score_boxes(score: np.ndarray, box_thresh: float) -> np.ndarray:
    """Bounding boxes (K, 4) ``[x0, y0, x1, y1]`` of every contour of one thresholded score map.

    ``score`` (h, w) in [0, 1]. Binarisation follows the reference exactly (on 8-bit values):
    ``uint8(s·255) > int(box_thresh · max(uint8(s·255)))``. All contours count (RETR_TREE, holes
    included, which only adds boxes inside outer ones). x1/y1 are clipped to w−1/h−1 (the
    reference's clipping, kept although it drops the last row/column under exclusive slicing).
    No contour gives the single empty box [0, 0, 0, 0].
    """
    height, width = score.shape
    img = (score * 255).astype(np.uint8)
    binary = (img > int(box_thresh * img.max())).astype(np.uint8) * 255
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return np.zeros((1, 4), dtype=np.int64)
    rects = np.array([cv2.boundingRect(c) for c in contours], dtype=np.int64)
    x0, y0, w, h = rects.T
    x1 = np.minimum(x0 + w, width - 1)
    y1 = np.minimum(y0 + h, height - 1)
    return np.stack([x0, y0, x1, y1], axis=1)


def box_mask(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 mask, 1 inside any box ``[x0:x1, y0:y1]`` (exclusive ends)."""
    h, w = hw
    ys = np.arange(h)[None, :, None]
    xs = np.arange(w)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    return inside.any(axis=0).astype(np.float32)


def class_aware_attention_affinity(
    cam, att, sinkhorn_iters: int = 1, box_thresh: float = 0.4, power: int = 2,
    propagate: str = "score",
):
    """CAA-refined CAMs (P, h, w), unnormalised.

    ``cam`` (P, h, w) raw CAMs at patch resolution; ``att`` (hw, hw) last-8-block mean attention
    (class token dropped, rows not renormalised). ``sinkhorn_iters``: alternating column/row
    normalisations (1 in the paper's runs, 3 for CLIP-ES); ``power``: matrix power of the
    symmetrised affinity (2); ``box_thresh``: fraction of the 8-bit score maximum that a box
    region must exceed (VOC cls 0.4, VOC seg 0.5, COCO cls 0.6); ``propagate``: ``"score"``
    propagates the min–max score, ``"cam"`` the raw CAM. Numpy in → numpy out, tensor in →
    tensor out; computed in float32 like the reference.
    """
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
    as_numpy = isinstance(cam, np.ndarray)
    cam_t = torch.as_tensor(cam, dtype=torch.float32)
    att_t = torch.as_tensor(att, dtype=torch.float32, device=cam_t.device)
    n_cls, h, w = cam_t.shape
    if att_t.shape != (h * w, h * w):
        raise ValueError(f"attention {tuple(att_t.shape)} does not match a {h}x{w} CAM grid")
    affinity = sinkhorn_affinity(att_t, sinkhorn_iters, power)
    score = cam_score(cam_t)
    score_np = score.detach().cpu().numpy()
    masks = np.stack([box_mask(score_boxes(s, box_thresh), (h, w)) for s in score_np])
    values = score if propagate == "score" else cam_t
    masked = values.reshape(n_cls, h * w) * torch.from_numpy(masks).reshape(n_cls, h * w).to(values)
    # out_p = (A ∘ m_p) v_p with the box mask on A's columns, batched over classes.
    out = (masked @ affinity.T).reshape(n_cls, h, w)
    return out.cpu().numpy() if as_numpy else out
