"""Batches of the final segmenter (algorithms.md §9): what each training iteration draws, the
Dataset that decodes and augments one sample (in DataLoader workers), and validation batches.

Randomness is a pure function of ``(seed, iteration, row)``: iteration ``t`` draws its batch's
dataset indices from ``default_rng([seed, SAMPLER, t])`` and row ``r`` of that batch is augmented
with ``default_rng([seed, AUGMENT, t, r])``. So a batch is the same whichever worker builds it, how
many workers there are, how far the loader prefetches, and whether the run was resumed at ``t``
(nothing but ``t`` is needed to restart the stream). The second word keeps the two streams
apart: ``SeedSequence`` pads short entropy with zeros, so without it iteration t's indices
(``[s, t]``) and the augmentation of its row 0 (``[s, t, 0]``) would be one stream.

Validation images are batched only with images of the same size, so every image goes through the
network exactly as it would alone (no padding to a common size: DeepLabV3+'s image-pooling branch
and a ViT's attention see the whole input, so padding would change every pixel's prediction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.segmenter.inputs import to_input
from pipeline.segmenter.training import SegmentationAugment, collate

#: First entropy words of the two random streams (see the module docstring).
SAMPLER, AUGMENT = 0, 1


def batch_indices(seed: int, iteration: int, n: int, batch_size: int) -> np.ndarray:
    """Dataset indices of iteration ``iteration``'s batch: ``batch_size`` of ``range(n)``, without
    replacement unless the dataset is smaller than the batch."""
    rng = np.random.default_rng([seed, SAMPLER, iteration])
    return rng.choice(n, size=batch_size, replace=n < batch_size)


def sample_rng(seed: int, iteration: int, row: int) -> np.random.Generator:
    """The generator that augments row ``row`` of iteration ``iteration``'s batch."""
    return np.random.default_rng([seed, AUGMENT, iteration, row])


class IterationSampler(Sampler[list[tuple[int, int, int]]]):
    """A batch sampler yielding, for each iteration in ``[start, stop)``, the keys
    ``(iteration, row, index)`` of its samples (:func:`batch_indices`)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        if n < 1:
            raise ValueError("no samples to draw from")
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for t in range(self.start, self.stop):
            yield [(t, r, int(i)) for r, i in enumerate(batch_indices(self.seed, t, self.n, self.batch_size))]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclass(frozen=True)
class LoadFailure:
    """A sample whose ``load`` raised one of the Dataset's ``errors``: carried to the main
    process as a value, so the caller can report ``message`` as it is (an exception raised in a
    worker reaches the main process re-wrapped with the worker's traceback in its message)."""

    message: str


class Batch(NamedTuple):
    """One training batch: normalised images (B, 3, c, c) float32, labels (B, c, c) int64, and the
    iteration it belongs to."""

    images: torch.Tensor
    labels: torch.Tensor
    iteration: int


class TrainingSamples(Dataset):
    """Decoded and augmented training samples, keyed by :class:`IterationSampler`'s keys.

    Args:
        items: anything ``load`` takes (e.g. index records).
        load: ``load(item) -> (image (H, W, 3) uint8, label (H, W) uint8)``; a module-level
            function or a ``functools.partial`` of one, so that spawned workers can unpickle it.
        augment: the §9 augmentation, fed :func:`sample_rng` of the key.
        seed: the run's seed.
        errors: exception types of ``load`` that become a :class:`LoadFailure` instead of an
            exception (others propagate).
    """

    def __init__(self, items: Sequence[Any], load: Callable[[Any], tuple[np.ndarray, np.ndarray]],
                 augment: SegmentationAugment, seed: int, errors: tuple[type[BaseException], ...] = ()):
        self.items, self.load, self.augment, self.seed, self.errors = items, load, augment, seed, errors

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int, int]):
        iteration, row, index = key
        try:
            image, label = self.load(self.items[index])
        except self.errors as exc:
            return LoadFailure(str(exc))
        image, label = self.augment(image, label, sample_rng(self.seed, iteration, row))
        return iteration, image, label


def collate_training(samples: Sequence) -> Batch | LoadFailure:
    """Samples of one iteration -> a :class:`Batch` (or the first :class:`LoadFailure`)."""
    for s in samples:
        if isinstance(s, LoadFailure):
            return s
    iterations = {s[0] for s in samples}
    if len(iterations) != 1:
        raise ValueError(f"a batch mixes iterations {sorted(iterations)}")
    images, labels = collate([(s[1], s[2]) for s in samples])
    return Batch(images, labels, iterations.pop())


# -- validation ----------------------------------------------------------------------------------


class EvalBatch(NamedTuple):
    """Equal-size validation images, normalised (B, 3, H, W) float32 (:func:`to_input`, on the
    CPU as :func:`~pipeline.segmenter.model.predict_probs` does), and their ground truth
    (B, H, W) uint8."""

    images: torch.Tensor
    labels: torch.Tensor


class EvalSamples(Dataset):
    """Decoded (image, ground truth) pairs; ``load`` and ``errors`` as in :class:`TrainingSamples`."""

    def __init__(self, items: Sequence[Any], load: Callable[[Any], tuple[np.ndarray, np.ndarray]],
                 errors: tuple[type[BaseException], ...] = ()):
        self.items, self.load, self.errors = items, load, errors

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            return self.load(self.items[index])
        except self.errors as exc:
            return LoadFailure(str(exc))


def size_batches(sizes: Sequence[tuple[int, int]], max_pixels: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped by equal (H, W), in order of first appearance, each group cut
    into batches of at most ``max_pixels`` input pixels (always at least one image)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    batches = []
    for (h, w), indices in groups.items():
        per_batch = max(1, max_pixels // max(1, h * w))
        batches += [indices[k : k + per_batch] for k in range(0, len(indices), per_batch)]
    return batches


def collate_eval(samples: Sequence) -> EvalBatch | LoadFailure:
    """Equal-size (image, label) pairs -> an :class:`EvalBatch` (or the first :class:`LoadFailure`)."""
    for s in samples:
        if isinstance(s, LoadFailure):
            return s
    shapes = {s[0].shape for s in samples} | {s[1].shape + (3,) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a validation batch mixes sizes {sorted(shapes)}")
    return EvalBatch(to_input(np.stack([s[0] for s in samples])), torch.from_numpy(np.stack([s[1] for s in samples])))


# -- loaders -------------------------------------------------------------------------------------


def make_loader(dataset: Dataset, batch_sampler: Sampler | Sequence[Sequence[Any]], collate_fn: Callable,
                workers: int, pin_memory: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over ``batch_sampler``'s batches: ``workers`` processes (0: in the caller's
    thread), page-locked batches when ``pin_memory`` (CUDA: the copies can then be
    ``non_blocking``), workers kept for the loader's lifetime (a loader iterated again, e.g. for
    every validation, does not restart them).

    The loader's own generator is seeded here so that creating an iterator never draws from the
    global torch generator (the training's dropout stream). Samples do not depend on the
    workers' torch/numpy seeds: all their randomness comes from the keys.

    Workers are forked and keep OpenCV's thread pool as it is: ``cv2.setNumThreads`` in a forked
    child whose parent had used the pool waits forever on the parent's pool threads.
    """
    return DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed), prefetch_factor=2 if workers else None,
    )
