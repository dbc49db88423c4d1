"""Segmentation evaluation (algorithms.md §8): confusion matrices, IoU, CAM background sweeps.

The confusion matrix counts pixels with ``0 <= gt < K`` (255 and any other value is ignored);
rows are ground truth, columns prediction. mIoU averages over the classes that have ground-truth
pixels, so a class absent from the evaluated images neither helps nor hurts.

Scores are fractions in memory and percentages (as papers report them, rounded to 0.001) in every
JSON summary (:meth:`SegmentationScores.as_dict`, :meth:`CamEvaluator.results`).
:class:`ConfusionTotals` sums a split's per-image matrices under named keys (the seeds and the
predictions both score that way) and turns each total into those summaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import numpy as np
import torch

#: Ground-truth value excluded from evaluation (VOC boundaries and "difficult" regions).
IGNORE_INDEX = 255


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 pixel counts, ``[gt, pred]``, over pixels with ``0 <= gt < num_classes``."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
    valid = (gt >= 0) & (gt < num_classes)
    pred, gt = pred[valid], gt[valid]
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction labels must lie in [0, {num_classes}) where gt is valid")
    counts = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one confusion matrix; per-class arrays are NaN where undefined."""

    iou: np.ndarray
    """(K,) TP / (TP + FP + FN); NaN for a class neither in ground truth nor predicted."""
    precision: np.ndarray
    """(K,) TP / (TP + FP); NaN for a class never predicted."""
    recall: np.ndarray
    """(K,) TP / (TP + FN); NaN for a class without ground-truth pixels."""
    present: np.ndarray
    """(K,) bool: the class has ground-truth pixels."""
    miou: float
    """Mean IoU over present classes (NaN when no pixel was evaluated)."""
    macro_precision: float
    """Mean precision over present classes, a never-predicted present class counting 0."""
    macro_recall: float
    """Mean recall over present classes."""
    accuracy: float
    """Correct pixels / evaluated pixels."""

    def as_dict(self, class_names: list[str] | None = None) -> dict:
        """JSON-able summary in percent; per-class IoU keyed by name (present classes only)."""
        names = class_names or [str(k) for k in range(len(self.iou))]
        return {
            "miou": percent(self.miou),
            "precision": percent(self.macro_precision),
            "recall": percent(self.macro_recall),
            "accuracy": percent(self.accuracy),
            "per_class_iou": {
                names[k]: percent(self.iou[k]) for k in range(len(self.iou)) if self.present[k]
            },
        }


def scores_from_confusion(conf: np.ndarray) -> SegmentationScores:
    """IoU, precision, recall and accuracy of a (K, K) ``[gt, pred]`` confusion matrix."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    gt_count = conf.sum(axis=1)
    pred_count = conf.sum(axis=0)
    union = gt_count + pred_count - tp
    present = gt_count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        precision = np.where(pred_count > 0, tp / pred_count, np.nan)
        recall = np.where(present, tp / gt_count, np.nan)
    total = conf.sum()
    if not present.any():
        nan = float("nan")
        return SegmentationScores(iou, precision, recall, present, nan, nan, nan, nan)
    return SegmentationScores(
        iou=iou,
        precision=precision,
        recall=recall,
        present=present,
        miou=float(iou[present].mean()),
        macro_precision=float(np.nan_to_num(precision[present], nan=0.0).mean()),
        macro_recall=float(recall[present].mean()),
        accuracy=float(tp.sum() / total),
    )


class ConfusionAccumulator:
    """Sums confusion matrices over images."""

    def __init__(self, num_classes: int):
        """``num_classes``: K = foreground classes + 1 (background is label 0)."""
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.matrix += confusion_matrix(pred, gt, self.num_classes)

    def scores(self) -> SegmentationScores:
        return scores_from_confusion(self.matrix)


def quasi_superpixel_stats(levels: list[np.ndarray], n_levels: int = 3) -> dict:
    """How many quasi-superpixels the images have: ``levels`` holds each image's (S,) mask levels.

    ``masks_per_image`` (mean S), ``masks_per_level`` (mean count of each level), the fraction
    of images with masks of every level (``three_level_fraction`` for SAM's three levels) and of
    images with none.
    """
    if not levels:
        return {"n_images": 0}
    counts = np.stack([np.bincount(np.asarray(l, np.int64), minlength=n_levels)[:n_levels]
                       for l in levels])
    return {
        "n_images": len(levels),
        "masks_per_image": round(float(counts.sum(1).mean()), 3),
        "masks_per_level": [round(float(c), 3) for c in counts.mean(0)],
        "three_level_fraction": round(float((counts > 0).all(1).mean()), 4),
        "no_mask_fraction": round(float((counts.sum(1) == 0).mean()), 4),
    }


def cam_labels(score: np.ndarray | torch.Tensor, fg_cls: np.ndarray, bg_power: float) -> np.ndarray:
    """Label map of §3 scores (P, H, W): argmax over ``[(1 - max score) ** p, scores]``.

    Ties go to the first channel (background first). With no present class, all background.
    """
    score = torch.as_tensor(np.asarray(score, dtype=np.float32))
    fg_cls = np.asarray(fg_cls, dtype=np.int64).reshape(-1)
    if score.shape[0] == 0:
        return np.zeros(tuple(score.shape[1:]), np.uint8)
    bg = (1 - score.max(dim=0).values) ** bg_power
    k = torch.cat([bg[None], score], 0).argmax(dim=0).numpy()
    return np.concatenate([[0], fg_cls + 1])[k].astype(np.uint8)


def cam_confusions(
    score: np.ndarray | torch.Tensor,
    fg_cls: np.ndarray,
    gt: np.ndarray,
    bg_powers: list[float] | tuple[float, ...],
    num_classes: int,
) -> np.ndarray:
    """(n_powers, K, K) confusion matrices of one image's CAM labels, one per background power."""
    return np.stack([
        confusion_matrix(cam_labels(score, fg_cls, p), gt, num_classes) for p in bg_powers
    ])


class CamEvaluator:
    """Confusion matrices of CAM label maps for a sweep of background powers (§8)."""

    def __init__(self, num_classes: int, bg_powers: list[float] | tuple[float, ...]):
        """
        Args:
            num_classes: K = foreground classes + 1.
            bg_powers: the exponents p of the background score ``(1 - max score) ** p`` to try;
                the best one (highest mIoU) is reported.
        """
        if not bg_powers:
            raise ValueError("bg_powers must list at least one background power")
        self.bg_powers = [float(p) for p in bg_powers]
        self.num_classes = int(num_classes)
        self.accumulators = [ConfusionAccumulator(num_classes) for _ in self.bg_powers]

    def add(self, score: np.ndarray | torch.Tensor, fg_cls: np.ndarray, gt: np.ndarray) -> None:
        """One image: its §3 scores (P, H, W), their classes (P,), and ground truth (H, W)."""
        self.add_confusions(cam_confusions(score, fg_cls, gt, self.bg_powers, self.num_classes))

    def add_confusions(self, confusions: np.ndarray) -> None:
        """Add (n_powers, K, K) matrices from :func:`cam_confusions` (computed elsewhere)."""
        for acc, conf in zip(self.accumulators, confusions):
            acc.matrix += conf

    def results(self) -> dict:
        """``{"miou_by_power": {p: miou}, "best_power": p, "best_miou": miou}`` (percent)."""
        return power_sweep([acc.matrix for acc in self.accumulators], self.bg_powers)


def power_sweep(
    confusions: np.ndarray | list[np.ndarray], bg_powers: list[float] | tuple[float, ...]
) -> dict:
    """The background-power sweep of (n_powers, K, K) summed confusions (one per power, §8):
    ``{"miou_by_power": {p: miou}, "best_power": p, "best_miou": miou}`` (percent; the first of
    equal best scores wins)."""
    bg_powers = [float(p) for p in bg_powers]
    mious = [scores_from_confusion(conf).miou for conf in confusions]
    finite = [(m, i) for i, m in enumerate(mious) if np.isfinite(m)]
    best = max(finite, key=lambda t: (t[0], -t[1]))[1] if finite else 0
    return {
        "miou_by_power": {_key(p): percent(m) for p, m in zip(bg_powers, mious)},
        "best_power": bg_powers[best],
        "best_miou": percent(mious[best]),
    }


class ConfusionTotals:
    """Per-image confusion matrices summed under named keys (``"seed"``, ``"raw"``, an alpha, a
    CAM array...), with how many images added to each: all that a split's metrics need, so a
    stage keeps no matrix per image (``run_per_image(collect=...)``). A key holds (K, K) matrices,
    or (n, K, K) stacks of a sweep (:func:`cam_confusions`)."""

    def __init__(self):
        self.sums: dict[Hashable, np.ndarray] = {}
        """Key -> the summed int64 matrices, in the order the keys first came."""
        self.counts: dict[Hashable, int] = {}
        """Key -> how many images added to it."""

    def add(self, key: Hashable, confusion: np.ndarray) -> None:
        """Add one image's matrix (or stack) under ``key``."""
        if key in self.sums:
            self.sums[key] += confusion
        else:
            self.sums[key] = np.array(confusion, dtype=np.int64)  # a copy: never the caller's array
        self.counts[key] = self.counts.get(key, 0) + 1

    def __contains__(self, key: Hashable) -> bool:
        return key in self.sums

    def keys(self) -> list[Hashable]:
        return list(self.sums)

    def count(self, key: Hashable) -> int:
        return self.counts.get(key, 0)

    def scores(self, key: Hashable) -> SegmentationScores:
        return scores_from_confusion(self.sums[key])

    def summary(self, key: Hashable, class_names: list[str] | None = None) -> dict:
        """The percent summary of ``key``'s (K, K) total (:meth:`SegmentationScores.as_dict`)."""
        return self.scores(key).as_dict(class_names)

    def miou(self, key: Hashable) -> float | None:
        """The mIoU of ``key``'s (K, K) total in percent (null when undefined)."""
        return percent(self.scores(key).miou)

    def power_sweep(self, key: Hashable, bg_powers: list[float] | tuple[float, ...]) -> dict:
        """:func:`power_sweep` of ``key``'s (n_powers, K, K) total."""
        return power_sweep(self.sums[key], bg_powers)


def percent(x: float) -> float | None:
    """A fraction as a JSON percentage rounded to 0.001; undefined (NaN) becomes null."""
    return None if not np.isfinite(x) else round(100.0 * float(x), 3)


def _key(p: float) -> str:
    return f"{p:g}"
