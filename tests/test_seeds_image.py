"""Seeds of one image from arrays (pipeline.seeds.image) and a split's totals (pipeline.seeds.totals),
without stores or files: what a notebook calls."""
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.metrics import cam_confusions, confusion_matrix
from pipeline.seeds.image import score_seed, seed_image
from pipeline.seeds.sams import cam_argmax_seed, image_scores, sams_seed
from pipeline.seeds.totals import SeedOutcome, SeedTotals, summarise

HW = (20, 30)
POWERS = (1.0, 2.0)


def _arrays(rng, caa=False):
    arrays = {"cam": rng.normal(size=(2, 2, 2)).astype(np.float32), "fg_cls": np.array([0, 2], np.int64)}
    if caa:
        arrays["cam_caa"] = np.abs(arrays["cam"]) * 2
    return arrays


def test_seed_image_seeds_the_refined_cams_when_there_are_any_else_falls_back():
    rng = np.random.default_rng(0)
    masks, levels = rng.random((5, *HW)) < 0.3, rng.integers(0, 3, 5).astype(np.uint8)
    arrays = _arrays(rng, caa=True)
    seed = seed_image(arrays, masks, levels, HW, 0.6)
    assert seed.cam_key == "cam_caa" and not seed.fallback
    np.testing.assert_array_equal(seed.seed, sams_seed(arrays["cam_caa"], arrays["fg_cls"], masks, levels, 0.6, HW))
    raw_cams = {"cam": arrays["cam"], "fg_cls": arrays["fg_cls"]}
    raw = seed_image(raw_cams, np.zeros((0, *HW), bool), np.zeros(0, np.uint8), HW, 0.6, fallback_thresh=0.4)
    assert raw.cam_key == "cam" and raw.fallback
    np.testing.assert_array_equal(raw.seed, cam_argmax_seed(arrays["cam"], arrays["fg_cls"], HW, 0.4))


@pytest.mark.parametrize("change, message", [
    (lambda a, m: ({**a, "fg_cls": np.array([1])}, m), r"image x: cam \(2, 2, 2\) does not match fg_cls \(1,\)"),
    (lambda a, m: (a, m[:, :10]), "image x: quasi-superpixels are 10x30, the image 20x30"),
])
def test_seed_image_names_the_image_of_inconsistent_arrays(change, message):
    rng = np.random.default_rng(1)
    arrays, masks = change(_arrays(rng), rng.random((3, *HW)) < 0.5)
    with pytest.raises(PipelineError, match=message):
        seed_image(arrays, masks, np.zeros(3, np.uint8), HW, 0.6, image_id="x")


def test_scores_and_totals_give_the_metrics_of_a_split():
    rng = np.random.default_rng(2)
    totals = SeedTotals(POWERS)
    expected_seed = np.zeros((4, 4), np.int64)
    for i, caa in enumerate((False, True, True)):
        arrays = _arrays(rng, caa)
        seed = seed_image(arrays, np.zeros((0, *HW), bool), np.zeros(0, np.uint8), HW, 0.6)
        gt = rng.integers(0, 4, HW).astype(np.uint8)
        scores = score_seed(arrays, seed.seed, gt, POWERS, 4)
        np.testing.assert_array_equal(scores.seed, confusion_matrix(seed.seed, gt, 4))
        np.testing.assert_array_equal(scores.cams["cam"], cam_confusions(
            image_scores(arrays["cam"], HW), arrays["fg_cls"], gt, POWERS, 4))
        assert set(scores.cams) == ({"cam", "cam_caa"} if caa else {"cam"})
        assert scores.background[:, 1:].sum() == 0  # all background
        expected_seed += scores.seed
        totals.add(SeedOutcome(f"i{i}", True, i == 0, seed.cam_key, scores))
    totals.add(SeedOutcome("no_gt", False, False, "cam", None))
    metrics, plots = summarise(totals, ["a", "b", "c"], "coarse", 0.6, False, "a note")
    assert list(metrics)[:10] == ["which", "alpha", "n_images", "n_evaluated", "n_fallback", "n_missing_masks",
                                  "fallback_ids", "cam_source", "untrained", "note"]
    assert metrics["n_images"] == 4 and metrics["n_evaluated"] == 3 and metrics["n_missing_masks"] == 1
    assert metrics["fallback_ids"] == ["i0", "i1", "i2"] and metrics["cam_source"] == ["cam", "cam_caa"]
    np.testing.assert_array_equal(totals.maps.sums["seed"], expected_seed)
    assert "cam" in metrics and "cam_caa" not in metrics  # cam_caa for 2 of 3 images: not scored
    assert list(metrics["cam"]["miou_by_power"]) == ["1", "2"]
    assert plots == [{"class": c, "iou": v} for c, v in metrics["seed"]["per_class_iou"].items()]
    with pytest.raises(PipelineError, match=r"ground truth is \(5, 5\), image \(20, 30\)"):
        score_seed(arrays, seed.seed, np.zeros((5, 5), np.uint8), POWERS, 4)
