"""Evaluation (algorithms.md §8): confusion matrix, IoU family, CAM background-power sweep."""
import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from pipeline.metrics import (
    CamEvaluator,
    ConfusionAccumulator,
    cam_labels,
    confusion_matrix,
    scores_from_confusion,
)

GT = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
PRED = np.array([[0, 1, 1, 1], [0, 2, 0, 3]])


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(PRED, GT, 4)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = 2  # (0,0), (1,0)
    expected[0, 1] = 1  # (0,1)
    expected[1, 1] = 2
    expected[2, 2] = 1
    expected[2, 0] = 1
    # the 255 pixel (predicted 3) is ignored
    np.testing.assert_array_equal(conf, expected)


def test_scores_by_hand():
    s = scores_from_confusion(confusion_matrix(PRED, GT, 4))
    # class 0: TP 2, FP 1 (gt 2 -> 0), FN 1 (-> 1): IoU 2/4; class 1: TP 2, FP 1: 2/3;
    # class 2: TP 1, FN 1: 1/2; class 3: no gt, never predicted on valid pixels: undefined.
    np.testing.assert_allclose(s.iou[:3], [0.5, 2 / 3, 0.5])
    assert np.isnan(s.iou[3])
    np.testing.assert_array_equal(s.present, [True, True, True, False])
    assert s.miou == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert s.macro_precision == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert s.macro_recall == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert s.accuracy == pytest.approx(5 / 7)
    d = s.as_dict(["background", "a", "b", "c"])  # JSON summaries are in percent
    assert d["per_class_iou"] == {"background": 50.0, "a": 66.667, "b": 50.0}
    assert d["miou"] == 55.556 and d["accuracy"] == 71.429


def test_false_positive_class_without_ground_truth_has_iou_zero_but_not_in_mean():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    s = scores_from_confusion(confusion_matrix(pred, gt, 3))
    assert s.iou[2] == 0.0 and not s.present[2]
    assert s.miou == pytest.approx((0.5 + 1.0) / 2)
    # a present class that is never predicted counts precision 0 in the macro average
    s2 = scores_from_confusion(confusion_matrix(np.array([0, 0, 0, 0]), gt, 3))
    assert s2.macro_precision == pytest.approx((0.5 + 0.0) / 2)


def test_accumulator_sums_images():
    acc = ConfusionAccumulator(4)
    acc.add(PRED[:1], GT[:1])
    acc.add(PRED[1:], GT[1:])
    np.testing.assert_array_equal(acc.matrix, confusion_matrix(PRED, GT, 4))


def test_no_valid_pixel_gives_undefined_scores():
    s = scores_from_confusion(confusion_matrix(np.zeros(3), np.full(3, 255), 2))
    assert np.isnan(s.miou) and np.isnan(s.accuracy)
    assert s.as_dict()["miou"] is None


def test_prediction_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="prediction labels"):
        confusion_matrix(np.array([5]), np.array([0]), 3)


def test_matches_torchmetrics_on_random_maps():
    rng = np.random.default_rng(1)
    K = 6
    gt = rng.integers(0, K - 1, (4, 37, 41))  # class K-1 never in ground truth
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, K, gt.shape)
    acc = ConfusionAccumulator(K)
    for p, g in zip(pred, gt):
        acc.add(p, g)
    s = acc.scores()
    tm = MulticlassJaccardIndex(num_classes=K, average=None, ignore_index=255)
    tm_iou = tm(torch.from_numpy(pred), torch.from_numpy(gt)).numpy()
    np.testing.assert_allclose(s.iou[s.present], tm_iou[s.present], rtol=1e-6)
    assert not s.present[K - 1]
    assert s.miou == pytest.approx(float(tm_iou[s.present].mean()), rel=1e-6)


def test_cam_labels_background_power():
    score = np.array([[[0.9, 0.4, 0.1]], [[0.2, 0.5, 0.0]]], np.float32)
    fg = np.array([3, 7])
    # bg = (1 - max)^p: p=1 -> .1, .5, .9; p=2 -> .01, .25, .81
    np.testing.assert_array_equal(cam_labels(score, fg, 1.0), [[4, 0, 0]])  # .5 ties -> bg first
    np.testing.assert_array_equal(cam_labels(score, fg, 2.0), [[4, 8, 0]])
    assert not cam_labels(np.zeros((0, 1, 3)), np.zeros(0), 1.0).any()


def test_cam_evaluator_reports_best_power():
    score = np.array([[[0.9, 0.4, 0.1]], [[0.2, 0.5, 0.0]]], np.float32)
    fg = np.array([0, 1])
    gt = np.array([[1, 2, 0]])
    ev = CamEvaluator(3, [1.0, 2.0])
    ev.add(score, fg, gt)
    r = ev.results()
    assert r["miou_by_power"] == {"1": 50.0, "2": 100.0}  # percent
    assert r["best_power"] == 2.0 and r["best_miou"] == 100.0
    with pytest.raises(ValueError):
        CamEvaluator(3, [])


def test_quasi_superpixel_stats_by_hand():
    from pipeline.metrics import quasi_superpixel_stats

    levels = [np.array([2, 1, 1, 0], np.uint8), np.array([2, 2], np.uint8), np.array([], np.uint8),
              np.array([2, 1, 0, 0, 0], np.uint8)]
    stats = quasi_superpixel_stats(levels)
    assert stats == {"n_images": 4, "masks_per_image": 2.75, "masks_per_level": [1.0, 0.75, 1.0],
                     "three_level_fraction": 0.5, "no_mask_fraction": 0.25}
    assert quasi_superpixel_stats([]) == {"n_images": 0}


def test_confusion_totals_sum_named_keys_and_match_the_accumulators():
    """One helper sums per-image matrices under names (the seeds' and the predictions' totals):
    the same numbers as an accumulator per name, the CAM sweep as CamEvaluator's."""
    from pipeline.metrics import ConfusionTotals, cam_confusions

    rng = np.random.default_rng(0)
    totals, acc, cams = ConfusionTotals(), ConfusionAccumulator(4), CamEvaluator(4, (1, 2.5))
    for _ in range(3):
        pred, gt = rng.integers(0, 4, (2, 5, 6))
        conf = confusion_matrix(pred, gt, 4)
        totals.add("seed", conf)
        acc.add(pred, gt)
        score, fg_cls = rng.random((2, 5, 6), np.float32), np.array([0, 2])
        totals.add(("cam", "cam"), cam_confusions(score, fg_cls, gt, (1, 2.5), 4))
        cams.add(score, fg_cls, gt)
        assert conf.sum() == 30  # the caller's matrix is copied, never summed into
    totals.add(2.5, confusion_matrix(PRED, GT, 4))
    assert totals.keys() == ["seed", ("cam", "cam"), 2.5] and "seed" in totals and "raw" not in totals
    assert totals.count("seed") == 3 and totals.count(2.5) == 1 and totals.count("raw") == 0
    np.testing.assert_array_equal(totals.sums["seed"], acc.matrix)
    names = ["background", "a", "b", "c"]
    assert totals.summary("seed", names) == acc.scores().as_dict(names)
    assert totals.miou("seed") == acc.scores().as_dict()["miou"]
    assert totals.miou(2.5) == 55.556
    assert totals.power_sweep(("cam", "cam"), (1, 2.5)) == cams.results()
    assert list(cams.results()["miou_by_power"]) == ["1", "2.5"] and cams.results()["best_power"] in (1.0, 2.5)
