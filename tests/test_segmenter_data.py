"""The segmenter's batches (pipeline/segmenter/data.py): keyed randomness, workers, resume, and
batched validation equal to one image at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics import ConfusionAccumulator
from pipeline.segmenter.data import (
    AUGMENT, SAMPLER, EvalSamples, IterationSampler, LoadFailure, TrainingSamples, batch_indices, collate_eval,
    collate_training, make_loader, sample_rng, size_batches,
)
from pipeline.segmenter.model import build_segmenter, predict_labels, predict_probs
from pipeline.segmenter.training import SegmentationAugment, collate

AUGMENT_32 = SegmentationAugment(crop_size=32, scale_range=(0.5, 2.0), flip_prob=0.5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _items(n: int = 5):
    """In-memory (image, label) pairs of different sizes, every pixel distinct enough that a
    different crop, scale or flip gives a different batch."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        h, w = 30 + 3 * i, 44 - 2 * i
        items.append((rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
                      rng.integers(0, 4, size=(h, w), dtype=np.uint8)))
    return items


def _identity(item):  # module level: workers may need to unpickle it
    return item


class _Unreadable(Exception):
    pass


def _load_or_fail(item):
    if item is None:
        raise _Unreadable("image x: cannot identify image file")
    return item


def _batches(workers: int, seed: int = 7, start: int = 0, stop: int = 6, items=None):
    items = _items() if items is None else items
    samples = TrainingSamples(items, _identity, AUGMENT_32, seed)
    loader = make_loader(samples, IterationSampler(len(items), 3, seed, start, stop), collate_training, workers,
                         pin_memory=False, seed=seed)
    return list(loader)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.iteration == y.iteration
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels), x.iteration


def test_batches_are_a_function_of_seed_iteration_and_row():
    items = _items()
    batches = _batches(0, items=items)
    assert [b.iteration for b in batches] == list(range(6))
    for b in batches:
        indices = np.random.default_rng([7, SAMPLER, b.iteration]).choice(5, size=3, replace=False)
        np.testing.assert_array_equal(indices, batch_indices(7, b.iteration, 5, 3))
        pairs = [AUGMENT_32(*items[i], np.random.default_rng([7, AUGMENT, b.iteration, r]))
                 for r, i in enumerate(indices)]
        x, y = collate(pairs)
        assert torch.equal(b.images, x) and torch.equal(b.labels, y)
    # really random: iterations differ, rows of one image differ, another seed differs
    assert not torch.equal(batches[0].images, batches[1].images)
    a, b = sample_rng(7, 0, 0).random(4), sample_rng(7, 0, 1).random(4)
    assert not np.array_equal(a, b)
    assert not torch.equal(_batches(0, seed=8)[0].images, batches[0].images)


def test_two_workers_give_identical_batches_across_runs_and_equal_to_no_workers():
    import cv2

    # The parent's OpenCV thread pool exists before the fork (as after a run at 0 workers):
    # the workers must not reconfigure it (that hangs).
    cv2.resize(np.zeros((600, 800, 3), np.uint8), (1600, 1200))
    first, second = _batches(2), _batches(2)
    _assert_same(first, second)
    _assert_same(first, _batches(0))
    _assert_same(first, _batches(1))


def test_a_resumed_sampler_continues_the_same_stream():
    full = _batches(0)
    _assert_same(full[4:], _batches(2, start=4))


def test_dataset_smaller_than_the_batch_draws_with_replacement():
    indices = batch_indices(0, 3, 2, 5)
    assert len(indices) == 5 and set(indices.tolist()) <= {0, 1}
    assert len(set(batch_indices(0, 3, 8, 5).tolist())) == 5


def test_the_loader_leaves_the_global_torch_generator_alone():
    """The global generator drives the training's dropout: a loader iterator created at a resume
    must not shift it (a DataLoader without its own generator draws its base seed from it)."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _batches(2)
    _batches(0)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("workers", [0, 2])
def test_load_errors_arrive_as_one_line_values(workers):
    items = _items(3)
    items[1] = None
    samples = TrainingSamples(items, _load_or_fail, AUGMENT_32, 0, errors=(_Unreadable,))
    loader = make_loader(samples, [[(0, 0, 0), (0, 1, 1)], [(1, 0, 0), (1, 1, 2)]], collate_training, workers,
                         pin_memory=False)
    first, second = list(loader)
    assert first == LoadFailure("image x: cannot identify image file")
    assert second.iteration == 1 and second.images.shape == (2, 3, 32, 32)
    # errors not listed are not swallowed
    with pytest.raises(_Unreadable):
        TrainingSamples(items, _load_or_fail, AUGMENT_32, 0)[(0, 0, 1)]


def test_collate_refuses_mixed_iterations_and_sizes():
    items = _items(2)
    samples = TrainingSamples(items, _identity, AUGMENT_32, 0)
    with pytest.raises(ValueError, match="mixes iterations"):
        collate_training([samples[(0, 0, 0)], samples[(1, 0, 1)]])
    with pytest.raises(ValueError, match="mixes sizes"):
        collate_eval(list(items))


# -- batched validation -------------------------------------------------------------------------


def test_size_batches_groups_equal_sizes_within_the_pixel_budget():
    sizes = [(2, 3), (4, 4), (2, 3), (2, 3), (4, 4), (3, 2)]
    assert size_batches(sizes, 12) == [[0, 2], [3], [1], [4], [5]]
    assert size_batches(sizes, 100) == [[0, 2, 3], [1, 4], [5]]
    assert size_batches(sizes, 1) == [[0], [2], [3], [1], [4], [5]]  # never an empty batch
    assert size_batches([], 100) == []


def _val_set():
    """Images of three sizes (some shared), ground truth with an ignore band."""
    rng = np.random.default_rng(1)
    sizes = [(40, 56), (37, 53), (40, 56), (40, 56), (56, 40), (37, 53), (40, 56)]
    items = []
    for h, w in sizes:
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        image[: h // 2] //= 3  # some structure, so that the random net predicts several classes
        gt = rng.integers(0, 3, size=(h, w), dtype=np.uint8)
        gt[:, :2] = 255
        items.append((image, gt))
    return items


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_validation_equals_one_image_at_a_time(workers):
    torch.manual_seed(0)
    net = build_segmenter("tiny", 3, seed=0)
    net.train()
    with torch.no_grad():  # a few train-mode passes move BatchNorm's running statistics off 0/1
        for _ in range(3):
            net(torch.randn(2, 3, 48, 48))
    net.eval()
    items = _val_set()
    single, batched = ConfusionAccumulator(3), ConfusionAccumulator(3)
    preds_single = []
    for image, gt in items:
        pred = predict_probs(net, image, scales=(1.0,), flip=False).argmax(0).numpy()
        preds_single.append(pred)
        single.add(pred, gt)
    batches = size_batches([gt.shape for _, gt in items], 3 * 40 * 56)
    assert max(len(b) for b in batches) == 3  # really batched
    loader = make_loader(EvalSamples(items, _identity), batches, collate_eval, workers, pin_memory=False)
    order = [i for b in batches for i in b]
    preds_batched = []
    for batch in loader:
        for pred, gt in zip(predict_labels(net, batch.images).numpy(), batch.labels.numpy()):
            preds_batched.append(pred)
            batched.add(pred, gt)
    for i, pred in zip(order, preds_batched):
        np.testing.assert_array_equal(pred, preds_single[i])
    assert len(np.unique(np.concatenate([p.ravel() for p in preds_single]))) > 1  # not a constant net
    np.testing.assert_array_equal(batched.matrix, single.matrix)
    assert batched.scores().miou == single.scores().miou
