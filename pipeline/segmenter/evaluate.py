"""Validation of the segmenter during training (algorithms.md §9): single-scale val mIoU.

The val mIoU of the training curve and of the best checkpoint's choice: the argmax of one forward
pass per image (no flip, no other scale), scored against ground truth over the whole val set.
Images are batched with images of their own size only (:mod:`pipeline.segmenter.data`), so the
score equals predicting one image at a time.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.datasets import Record
from pipeline.data.imageio import ImageReadError, read_label, read_rgb
from pipeline.errors import PipelineError
from pipeline.metrics import ConfusionAccumulator
from pipeline.segmenter.data import (
    EvalSamples,
    LoadFailure,
    collate_eval,
    make_loader,
    size_batches,
)
from pipeline.segmenter.model import predict_labels


def load_eval_pair(record: Record) -> tuple[np.ndarray, np.ndarray]:
    """A val image and its ground truth, at the size the index records (batches group by it)."""
    try:
        image, gt = read_rgb(record.image, record.digest), read_label(record.label)
    except (ImageReadError, OSError) as exc:
        raise PipelineError(f"image {record.id}: {exc}") from exc
    if image.shape[:2] != gt.shape or gt.shape != (record.height, record.width):
        raise PipelineError(f"image {record.id}: image is {image.shape[:2]}, ground truth {gt.shape}, "
                            f"the index says {(record.height, record.width)} (rerun `wsss prepare`)")
    return image, gt


def eval_loader(records: list[Record], max_pixels: int, workers: int = 0, pin_memory: bool = False):
    """Batches of equal-size val images, at most ``max_pixels`` input pixels each."""
    batches = size_batches([(r.height, r.width) for r in records], max_pixels)
    return make_loader(EvalSamples(records, load_eval_pair, errors=(PipelineError,)), batches,
                       collate_eval, workers, pin_memory)


def evaluate(net: torch.nn.Module, batches, num_classes: int, precision: str = "fp32") -> float:
    """Single-scale mIoU of the argmax prediction against ground truth over ``batches`` (from
    :func:`eval_loader`; training curve and best checkpoint; NaN when the ground truth has no
    labelled pixel). Equal to predicting one image at a time (``predict_probs``)."""
    acc = ConfusionAccumulator(num_classes)
    net.eval()
    for batch in batches:
        if isinstance(batch, LoadFailure):
            raise PipelineError(batch.message)
        for pred, gt in zip(predict_labels(net, batch.images, precision).numpy(), batch.labels.numpy()):
            acc.add(pred, gt)
    return acc.scores().miou
