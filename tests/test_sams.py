"""SAMS seeding (algorithms.md §5) on hand-built cases, degenerate inputs and post-processing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.seeds.sams import cam_argmax_seed, sams_postprocess, sams_seed, seed_or_fallback


def _masks(hw, *regions):
    """Boolean masks of shape (len(regions), *hw) from (row slice, col slice) pairs."""
    out = np.zeros((len(regions), *hw), bool)
    for i, (rows, cols) in enumerate(regions):
        out[i][rows, cols] = True
    return out


def _loop_seed(cam, fg_cls, masks, levels, alpha, hw):
    """The §5 formula written mask by mask (the reference's reading, no vectorisation)."""
    M = F.interpolate(torch.from_numpy(cam)[None], size=hw, mode="bilinear",
                      align_corners=False)[0].clamp_min(0)
    m = torch.stack([(M * torch.from_numpy(mk)).sum((1, 2)) / mk.sum() for mk in masks], 1)
    s = (m - m.min(1, keepdim=True).values) / (m.max(1, keepdim=True).values
                                               - m.min(1, keepdim=True).values + 1e-7)
    scores = torch.cat([((1 - s.max(0).values) ** alpha)[None], s])
    entries = []
    for i in range(len(masks)):
        k = int(scores[:, i].argmax())
        label = 0 if k == 0 else int(fg_cls[k - 1]) + 1
        entries.append((int(levels[i]), float(scores[k, i]), i, label))
    seed = np.zeros(hw, np.uint8)
    for level, conf, i, label in sorted(entries, key=lambda e: (e[0], e[1], e[2])):
        seed[masks[i]] = label
    return seed


def test_class_mask_and_background_mask():
    hw = (2, 4)
    cam = np.zeros((1, 2, 4), np.float32)  # same size as the image: resizing is the identity
    cam[0, :, :2] = 1.0
    masks = _masks(hw, (slice(None), slice(0, 2)), (slice(None), slice(2, 4)))
    seed = sams_seed(cam, np.array([3]), masks, np.array([2, 2]), 0.6, hw)
    np.testing.assert_array_equal(seed, [[4, 4, 0, 0], [4, 4, 0, 0]])


def test_negative_cam_is_clamped_before_averaging():
    hw = (1, 4)
    # Mask 0 averages -5 and 1 (clamped: 0.5); mask 1 is 0.25 flat: mask 0 is the class peak.
    cam = np.array([[[-5.0, 1.0, 0.25, 0.25]]], np.float32)
    masks = _masks(hw, (slice(None), slice(0, 2)), (slice(None), slice(2, 4)))
    seed = sams_seed(cam, np.array([0]), masks, np.array([1, 1]), 1.0, hw)
    np.testing.assert_array_equal(seed, [[1, 1, 0, 0]])


def test_identical_classes_tie_to_the_first():
    hw = (2, 2)
    cam = np.zeros((2, 2, 2), np.float32)
    cam[:, 0] = 1.0
    masks = _masks(hw, (slice(0, 1), slice(None)), (slice(1, 2), slice(None)))
    seed = sams_seed(cam, np.array([2, 5]), masks, np.array([0, 0]), 0.6, hw)
    np.testing.assert_array_equal(seed, [[3, 3], [0, 0]])


def test_higher_level_overwrites_higher_confidence():
    hw = (1, 4)
    cam = np.array([[[1.0, 1.0, 0.6, 0.0]]], np.float32)
    masks = _masks(hw, (slice(None), slice(0, 1)), (slice(None), slice(None)),
                   (slice(None), slice(3, 4)))
    # Means 1, .65, 0 -> scores 1, .65, 0: labels class (conf 1), class (conf .65),
    # background (conf 1). The whole (level 2) overwrites the confident background sub-part.
    seed = sams_seed(cam, np.array([6]), masks, np.array([0, 2, 0]), 1.0, hw)
    np.testing.assert_array_equal(seed, [[7, 7, 7, 7]])
    # At equal levels the more confident background mask is painted last and wins pixel 3.
    seed = sams_seed(cam, np.array([6]), masks, np.array([1, 1, 1]), 1.0, hw)
    np.testing.assert_array_equal(seed, [[7, 7, 7, 0]])


def test_same_level_higher_confidence_wins_and_ties_keep_generator_order():
    hw = (1, 3)
    cam = np.array([[[1.0, 0.5, 0.0]], [[0.0, 0.5, 1.0]]], np.float32)
    # Masks 0 and 1 overlap on pixel 1; mask 1 (class 1, conf 1) is painted after mask 0
    # (class 0, conf 1): equal (level, conf) keep generator order, so the later mask wins.
    masks = _masks(hw, (slice(None), slice(0, 2)), (slice(None), slice(1, 3)))
    seed = sams_seed(cam, np.array([0, 1]), masks, np.array([1, 1]), 0.6, hw)
    np.testing.assert_array_equal(seed, [[1, 2, 2]])
    seed_rev = sams_seed(cam, np.array([0, 1]), masks[::-1], np.array([1, 1]), 0.6, hw)
    np.testing.assert_array_equal(seed_rev, [[1, 1, 2]])


def test_matches_loop_formula_on_random_inputs():
    rng = np.random.default_rng(0)
    for trial in range(5):
        hw = (int(rng.integers(30, 60)), int(rng.integers(30, 60)))
        P, S = int(rng.integers(1, 4)), int(rng.integers(1, 25))
        cam = rng.normal(size=(P, (hw[0] + 15) // 16, (hw[1] + 15) // 16)).astype(np.float32)
        fg_cls = np.sort(rng.choice(20, P, replace=False))
        masks = rng.random((S, *hw)) < 0.2
        masks[:, 0, 0] = True  # no empty mask
        levels = rng.integers(0, 3, S)
        expected = _loop_seed(cam, fg_cls, masks, levels, 0.7, hw)
        np.testing.assert_array_equal(sams_seed(cam, fg_cls, masks, levels, 0.7, hw), expected)


def test_no_present_class_is_all_background():
    hw = (3, 5)
    masks = _masks(hw, (slice(None), slice(None)))
    seed = sams_seed(np.zeros((0, 1, 1), np.float32), np.zeros(0, np.int64), masks, [2], 0.6, hw)
    assert seed.dtype == np.uint8 and seed.shape == hw and not seed.any()


def test_no_masks_falls_back_to_thresholded_cam_argmax():
    hw = (1, 4)
    cam = np.array([[[0.0, 0.2, 1.0, 1.0]], [[1.0, 0.0, 0.0, 0.5]]], np.float32)
    empty = np.zeros((0, *hw), bool)
    assert not sams_seed(cam, np.array([1, 4]), empty, np.zeros(0), 0.6, hw).any()
    result = seed_or_fallback(cam, np.array([1, 4]), empty, np.zeros(0), 0.6, hw,
                              fallback_thresh=0.5)
    assert result.fallback
    # scores: class 1 (0, .2, 1, 1), class 4 (1, 0, 0, .5); pixel 1's best .2 < .5 -> background
    np.testing.assert_array_equal(result.seed, [[5, 0, 2, 2]])
    np.testing.assert_array_equal(cam_argmax_seed(cam, np.array([1, 4]), hw, 0.1), [[5, 2, 2, 2]])


def test_with_masks_does_not_fall_back():
    hw = (2, 4)
    cam = np.zeros((1, 2, 4), np.float32)
    cam[0, :, :2] = 1.0
    masks = _masks(hw, (slice(None), slice(0, 2)))
    result = seed_or_fallback(cam, np.array([3]), masks, np.array([2]), 0.6, hw)
    assert not result.fallback
    np.testing.assert_array_equal(result.seed, sams_seed(cam, [3], masks, [2], 0.6, hw))


def test_mask_shape_must_match_image():
    with pytest.raises(ValueError, match="masks must be"):
        sams_seed(np.ones((1, 1, 1), np.float32), [0], np.ones((1, 3, 3), bool), [0], 0.6, (4, 4))


# -- post-processing -----------------------------------------------------------------------------

# 1 x 5 image, channels (bg, c1, c2, c3); argmax per pixel: 2, 0, 0, 0, 2 -> channels {bg, c2}.
PROBS = np.array([
    [0.10, 0.50, 0.50, 0.60, 0.00],
    [0.00, 0.00, 0.00, 0.00, 0.00],
    [0.90, 0.10, 0.10, 0.38, 1.00],
    [0.00, 0.40, 0.40, 0.02, 0.00],
], np.float32)[:, None, :]
HW = (1, 5)
A = (slice(None), slice(0, 1))
B = (slice(None), slice(1, 3))
C = (slice(None), slice(3, 4))
ALL = (slice(None), slice(None))


def test_postprocess_background_power_and_absent_class_excluded():
    masks = _masks(HW, A, B, C)
    # A: bg .1^2 vs c2 .9 -> 2.  B: bg .25 vs c2 .1 -> bg (c3's .4 would win, but no pixel
    # predicts c3).  C: bg .36 vs c2 .38 -> 2 ((1 - max)^2 = .3844 would have said bg).
    # Pixel 4 is covered by no mask -> background.
    seed = sams_postprocess(PROBS, masks, np.array([2, 1, 1]), alpha=2.0)
    np.testing.assert_array_equal(seed, [[2, 0, 0, 2, 0]])
    # alpha 1: C's bg .6 beats .38.
    seed = sams_postprocess(PROBS, masks, np.array([2, 1, 1]), alpha=1.0)
    np.testing.assert_array_equal(seed, [[2, 0, 0, 0, 0]])


def test_postprocess_lower_level_fills_uncovered_pixels_only():
    masks = _masks(HW, ALL, A, B, C)
    # ALL (level 0): bg mean .34^2 = .1156 vs c2 .496 -> 2, overwritten by the level-1/2 masks.
    seed = sams_postprocess(PROBS, masks, np.array([0, 2, 1, 1]), alpha=2.0)
    np.testing.assert_array_equal(seed, [[2, 0, 0, 2, 2]])


def test_postprocess_keeps_label_space_without_background_pixels():
    probs = np.zeros((4, 2, 2), np.float32)
    probs[0], probs[3] = 0.3, 0.7  # argmax is class 3 everywhere: no background pixel
    seed = sams_postprocess(probs, _masks((2, 2), ALL), np.array([2]), alpha=1.0)
    np.testing.assert_array_equal(seed, np.full((2, 2), 3))
