"""SAM-based seeding, SAMS (algorithms.md §5): CAM scores averaged inside quasi-superpixels.

Every quasi-superpixel gets one label (background or a present class) and one confidence; the
masks are then painted in (level, confidence) order so wholes overwrite parts and sub-parts, and
more confident masks overwrite less confident ones of the same level.

All per-mask work is one matrix product of the (P, HW) class maps by the (HW, S) masks, and the
painting is one reduction over masks (the last covering mask in paint order wins), so there is no
Python loop over masks, classes or pixels. Arithmetic is float32 torch, as in the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cams.score import cam_score

#: Added to the per-class min-max denominator over masks (§5), so a flat class scores 0.
MINMAX_EPS = 1e-7


@dataclass(frozen=True)
class SeedResult:
    """A seed map and how it was made."""

    seed: np.ndarray
    """(H, W) uint8 labels: 0 background, c + 1 foreground class c; never 255."""
    fallback: bool
    """True when the image had no quasi-superpixels and the seed is a thresholded CAM argmax."""


def resize_cam(cam: np.ndarray | torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Raw CAMs (P, h, w) resized bilinearly (align_corners=False) to (P, H, W), clamped at 0."""
    cam = torch.as_tensor(np.asarray(cam, dtype=np.float32))
    H, W = int(image_hw[0]), int(image_hw[1])
    if cam.shape[0] == 0:
        return torch.zeros((0, H, W), dtype=torch.float32)
    up = F.interpolate(cam[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return up.clamp_min(0)


def image_scores(cam: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """§3 scores (P, H, W) float32 of raw CAMs (P, h, w); (0, H, W) when no class is present."""
    return cam_score(np.asarray(cam, dtype=np.float32), tuple(int(v) for v in image_hw))


def sams_seed(
    cam: np.ndarray,
    fg_cls: np.ndarray,
    masks: np.ndarray,
    levels: np.ndarray,
    alpha: float,
    image_hw: tuple[int, int],
) -> np.ndarray:
    """The SAMS seed map (H, W) uint8 of one image (§5).

    Args:
        cam: (P, h, w) raw CAMs of the present classes at patch resolution.
        fg_cls: (P,) ascending 0-based foreground class indices of the CAM channels.
        masks: (S, H, W) bool quasi-superpixels in generator order.
        levels: (S,) mask levels (0 sub-part, 1 part, 2 whole).
        alpha: background exponent in ``bg = (1 - max score) ** alpha`` (paper: VOC coarse 0.6,
            fine 0.7).
        image_hw: (H, W) of the image.

    With no present class every pixel is background; with no mask nothing is painted (all
    background too; :func:`seed_or_fallback` replaces that case by a CAM argmax).
    """
    H, W = int(image_hw[0]), int(image_hw[1])
    masks_a = _masks_array(masks, (H, W))
    fg_cls = np.asarray(fg_cls, dtype=np.int64).reshape(-1)
    if np.shape(cam)[0] != fg_cls.size:
        raise ValueError(f"cam has {np.shape(cam)[0]} channels but fg_cls {fg_cls.size} classes")
    if fg_cls.size == 0 or masks_a.shape[0] == 0:
        return np.zeros((H, W), np.uint8)
    M = resize_cam(cam, (H, W))
    m = _mask_means(M, masks_a).clamp_min(0)  # (P, S)
    lo = m.min(dim=1, keepdim=True).values
    hi = m.max(dim=1, keepdim=True).values
    S_ = (m - lo) / (hi - lo + MINMAX_EPS)
    bg = (1 - S_.max(dim=0).values) ** alpha
    channel_labels = np.concatenate([[0], fg_cls + 1])
    return _label_and_paint(torch.cat([bg[None], S_], 0), channel_labels, masks_a, levels)


def seed_or_fallback(
    cam: np.ndarray,
    fg_cls: np.ndarray,
    masks: np.ndarray,
    levels: np.ndarray,
    alpha: float,
    image_hw: tuple[int, int],
    fallback_thresh: float = 0.5,
) -> SeedResult:
    """:func:`sams_seed`, or a thresholded CAM argmax when the image has no quasi-superpixels.

    Args:
        fallback_thresh: with no mask (S = 0), a pixel is background where its highest §3 score
            is below this value, else the argmax class. The reference does not define this case
            (it would paint nothing); this is the project's deviation, so an image SAM found
            nothing in still gets foreground seeds.

    The other arguments are those of :func:`sams_seed`.
    """
    H, W = int(image_hw[0]), int(image_hw[1])
    masks_arr = np.asarray(masks)
    if masks_arr.shape[0] > 0:
        return SeedResult(sams_seed(cam, fg_cls, masks_arr, levels, alpha, (H, W)), False)
    return SeedResult(cam_argmax_seed(cam, fg_cls, (H, W), fallback_thresh), True)


def cam_argmax_seed(
    cam: np.ndarray, fg_cls: np.ndarray, image_hw: tuple[int, int], thresh: float
) -> np.ndarray:
    """Per-pixel argmax of the §3 scores; background where the best score is below ``thresh``."""
    H, W = int(image_hw[0]), int(image_hw[1])
    fg_cls = np.asarray(fg_cls, dtype=np.int64).reshape(-1)
    if fg_cls.size == 0:
        return np.zeros((H, W), np.uint8)
    score = torch.from_numpy(image_scores(cam, (H, W)))
    k = score.argmax(dim=0)
    best = score.gather(0, k[None])[0]
    label = torch.as_tensor(fg_cls + 1)[k]
    label[best < thresh] = 0
    return label.numpy().astype(np.uint8)


def sams_postprocess(
    probs: np.ndarray | torch.Tensor, masks: np.ndarray, levels: np.ndarray, alpha: float
) -> np.ndarray:
    """SAMS as post-processing of a segmenter's prediction (§5, paper §4.4), (H, W) uint8.

    Args:
        probs: (K + 1, H, W) softmax probabilities over background and all K foreground classes.
        masks: (S, H, W) bool quasi-superpixels in generator order.
        levels: (S,) mask levels.
        alpha: exponent of the background channel's per-mask mean (paper sweeps 1-5).

    The channels are background (always, so labels never shift when no pixel is predicted
    background) plus the classes present in the argmax prediction; the per-mask means of the
    probabilities are used as they are (no clamp, no min-max). Labels are in the full label
    space. Pixels no mask covers are background (as in seeding; with S = 0 that is every pixel,
    so callers keep the raw prediction for images without quasi-superpixels).
    """
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().to("cpu", torch.float32)
    else:
        probs = torch.from_numpy(np.asarray(probs, dtype=np.float32))
    H, W = probs.shape[1:]
    masks_a = _masks_array(masks, (H, W))
    if masks_a.shape[0] == 0:
        return np.zeros((H, W), np.uint8)
    present = torch.unique(probs.argmax(dim=0))
    channels = torch.cat([torch.zeros(1, dtype=present.dtype), present[present != 0]])
    m = _mask_means(probs[channels], masks_a)
    m[0] = m[0] ** alpha
    return _label_and_paint(m, channels.numpy(), masks_a, levels)


# -- helpers -----------------------------------------------------------------------------------


def _masks_array(masks: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    masks = np.asarray(masks, dtype=bool)
    if masks.size == 0:
        return np.zeros((0, *image_hw), dtype=bool)
    if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(image_hw):
        raise ValueError(f"masks must be (S, {image_hw[0]}, {image_hw[1]}), got {masks.shape}")
    return masks


def _mask_means(maps: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    """(C, S) mean of each of the (C, H, W) maps inside each (S, H, W) mask (one matmul)."""
    # numpy's bool -> float32 cast is several times faster than torch's on CPU.
    flat = torch.from_numpy(masks.reshape(masks.shape[0], -1).astype(np.float32))  # (S, HW)
    # An empty mask has no mean; dividing its zero sum by 1 scores it 0 instead of NaN.
    area = flat.sum(dim=1).clamp_min(1)
    return (maps.flatten(1) @ flat.T) / area


def _label_and_paint(
    scores: torch.Tensor, channel_labels: np.ndarray, masks: np.ndarray, levels: np.ndarray
) -> np.ndarray:
    """Label masks by their best channel and paint them in (level, confidence) order.

    ``scores`` (C, S): channel 0 is background; ``torch.argmax`` returns the first maximum, so
    ties go to the lower channel (background first), as in the reference.
    """
    k = scores.argmax(dim=0)
    conf = scores.gather(0, k[None])[0].numpy()
    mask_label = np.asarray(channel_labels, dtype=np.int64)[k.numpy()]
    levels = np.asarray(levels, dtype=np.int64).reshape(-1)
    # Stable lexsort, last key primary: by level, then confidence; ties keep generator order.
    order = np.lexsort((conf, levels))
    S = len(order)
    # Painting in order with later masks on top == each pixel takes the covering mask of the
    # highest paint rank (1-based; 0 = uncovered): one max over masks instead of S writes.
    rank_dtype = np.uint8 if S < 2**8 else np.uint16 if S < 2**16 else np.int64
    rank = np.empty(S, rank_dtype)
    rank[order] = np.arange(1, S + 1)
    top = (masks.reshape(S, -1) * rank[:, None]).max(axis=0)
    label_by_rank = np.zeros(S + 1, np.uint8)
    label_by_rank[1:] = mask_label[order]
    return label_by_rank[top].reshape(masks.shape[1:])
