"""CAM score (algorithms.md §3): the normalised CAM used by CAA boxes, seeds and CAM evaluation."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SCORE_EPS = 1e-7
"""Added to the per-class range so a flat CAM scores 0 instead of dividing by zero."""


def cam_score(cam, size: tuple[int, int] | None = None, eps: float = SCORE_EPS):
    """Per-class min–max normalised CAM: ``(x − min) / (max − min + eps)`` after ``clamp(x, 0)``.

    ``cam`` (P, h, w) numpy array or tensor; ``size`` (H, W) resizes it first, bilinearly with
    align_corners=False (None keeps the patch resolution). Returns the same kind as the input
    (numpy in, numpy out), float32 for numpy input.
    """
    as_numpy = isinstance(cam, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32)) if as_numpy else cam
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = x.float()
    if x.shape[0] == 0:  # no present class: an empty score map of the requested size
        out = x.new_zeros((0, *(tuple(int(s) for s in size) if size is not None else x.shape[-2:])))
        return out.numpy() if as_numpy else out
    if size is not None and tuple(size) != tuple(x.shape[-2:]):
        x = F.interpolate(x[None], size=tuple(int(s) for s in size), mode="bilinear",
                          align_corners=False)[0]
    x = x.clamp_min(0.0)
    flat = x.flatten(1)
    lo = flat.amin(dim=1)[:, None, None]
    hi = flat.amax(dim=1)[:, None, None]
    out = (x - lo) / (hi - lo + eps)
    return out.numpy() if as_numpy else out
