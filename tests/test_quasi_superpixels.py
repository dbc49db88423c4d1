"""Unit tests of the quasi-superpixel generator's parts (algorithms.md §1)."""
import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils import amg

from pipeline.sam.quasi_superpixels import (
    QuasiSuperpixelGenerator,
    QuasiSuperpixels,
    occupation_filter,
    occupation_filter_batched,
    remove_small_regions,
    threshold_logits,
    threshold_logits_batched,
)
from tests.test_golden_samgen import fake_predictor

H, W = 4, 10


def row_mask(row: int, cols) -> np.ndarray:
    """A (H, W) mask with ``cols`` set in ``row``."""
    m = np.zeros((H, W), bool)
    m[row, list(cols)] = True
    return m


def kept(masks, levels, thresh=0.3) -> list[int]:
    """The box-window filter's choice, checked against the batched filter's."""
    masks, levels = np.stack(masks), np.array(levels, np.uint8)
    out = occupation_filter(masks, levels, thresh).tolist()
    batched = occupation_filter_batched(torch.from_numpy(masks), torch.from_numpy(levels), thresh)
    assert batched.dtype == torch.int64 and batched.tolist() == out
    return out


# -- occupation filter --------------------------------------------------------------------------
def test_occupation_is_strict():
    whole = row_mask(0, range(0, 3))
    at_thresh = row_mask(0, range(0, 10))  # 3 of 10 pixels inside the whole: 0.3, not < 0.3
    below = row_mask(0, range(1, 11 - 1)) | row_mask(1, [0])  # 2 of 10 inside: kept
    assert kept([whole, at_thresh, below], [2, 1, 1]) == [0, 2]
    assert kept([whole, at_thresh, below], [2, 1, 1], thresh=0.31) == [0, 1, 2]


def test_occupation_is_per_selected_mask_not_union():
    left, right = row_mask(0, range(0, 2)), row_mask(0, range(8, 10))
    part = row_mask(0, range(0, 10))  # 0.2 inside each whole, 0.4 inside their union
    assert kept([left, right, part], [2, 2, 1]) == [0, 1, 2]
    assert kept([left, right, part], [2, 2, 1], thresh=0.2) == [0, 1]


def test_candidates_of_one_level_are_not_tested_against_each_other():
    part = row_mask(1, range(10))
    assert kept([row_mask(0, [0]), part, part.copy()], [2, 1, 1]) == [0, 1, 2]


def test_sub_parts_are_tested_against_kept_parts_only():
    whole = row_mask(0, range(10))
    dropped_part = row_mask(0, range(5)) | row_mask(1, range(2))   # 5/7 inside the whole
    kept_part = row_mask(2, range(10))
    sub_in_dropped = row_mask(1, range(2))                          # only inside dropped_part
    sub_in_kept = row_mask(2, range(3))
    masks = [whole, dropped_part, kept_part, sub_in_dropped, sub_in_kept]
    assert kept(masks, [2, 1, 1, 0, 0]) == [0, 2, 3]


def test_empty_selection_takes_a_level_whole():
    a, b = row_mask(0, range(10)), row_mask(0, range(5))
    # No wholes: both (overlapping) parts are taken unfiltered; the sub-part is then tested.
    assert kept([a, b, b.copy()], [1, 1, 0]) == [0, 1]
    # No wholes and no parts: the sub-parts are taken whole.
    assert kept([a, b], [0, 0]) == [0, 1]
    # Wholes but no parts: the sub-parts are tested against the wholes.
    assert kept([a, b], [2, 0]) == [0]


def test_output_order_wholes_then_parts_then_sub_parts():
    cells = [(0, 0), (1, 0), (2, 0), (3, 0), (0, 5), (1, 5)]
    masks = [row_mask(r, range(c, c + 2)) for r, c in cells]
    assert kept(masks, [0, 2, 1, 2, 1, 0]) == [1, 3, 2, 4, 0, 5]


def test_occupation_of_no_masks():
    out = occupation_filter(np.zeros((0, H, W), bool), np.zeros(0, np.uint8), 0.3)
    assert out.shape == (0,)
    out = occupation_filter_batched(torch.zeros((0, H, W), dtype=torch.bool),
                                    torch.zeros(0, dtype=torch.uint8), 0.3)
    assert out.shape == (0,) and out.dtype == torch.int64


def reference_occupation(masks: np.ndarray, levels: np.ndarray, thresh: float) -> list[int]:
    """§1 change 3 spelled out over whole images: every candidate against every selected mask."""
    flat = torch.from_numpy(masks).flatten(1).to(torch.float64)
    area = flat.sum(1)
    levels = torch.from_numpy(levels).to(torch.int64)
    selected = torch.nonzero(levels == 2).flatten()
    for level in (1, 0):
        candidates = torch.nonzero(levels == level).flatten()
        if len(selected) and len(candidates):
            occupation = (flat[candidates] @ flat[selected].T / area[candidates, None]).amax(1)
            candidates = candidates[occupation < thresh]
        selected = torch.cat([selected, candidates])
    return selected.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_occupation_filter_matches_the_whole_image_reference(seed):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 90, 30, 40)
    masks[rng.random(90) < 0.1] = False  # empty candidates (0/0: dropped) and selected masks
    levels = rng.integers(0, 3, 90).astype(np.uint8)
    boxes = amg.batched_mask_to_box(torch.from_numpy(masks))
    empty = ~masks.any((1, 2))
    boxes[torch.from_numpy(empty)] = torch.tensor([5, 7, 5, 7])  # an empty mask's box is free
    for thresh in (0.0, 0.3, 0.6, 1.0, float("inf")):
        expected = reference_occupation(masks, levels, thresh)
        got = occupation_filter(masks, levels, thresh, boxes=boxes)
        assert got.dtype == torch.int64 and got.tolist() == expected, thresh
        assert occupation_filter(masks, levels, thresh).tolist() == expected, thresh
        batched = occupation_filter_batched(torch.from_numpy(masks), torch.from_numpy(levels),
                                            thresh)
        assert batched.tolist() == expected, thresh
    assert 0 < len(reference_occupation(masks, levels, 0.3)) < len(masks)


# -- thresholding ---------------------------------------------------------------------------------
def test_threshold_logits_matches_segment_anything():
    """Stability scores and boxes of segment-anything's helpers, crops of the thresholded masks,
    for a subset of planes read in place: empty masks, full masks, NaN and infinite logits, and
    logits exactly at the thresholds."""
    rng = np.random.default_rng(3)
    n, h, w = 40, 37, 53
    yy, xx = np.mgrid[0:h, 0:w]
    logits = np.empty((n, h, w), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(-10, h + 10), rng.uniform(-10, w + 10), rng.uniform(0, 30)
        logits[i] = (r - np.hypot(yy - cy, xx - cx)) * rng.uniform(0.1, 3)
    logits += rng.normal(0, 0.3, logits.shape).astype(np.float32)
    logits[0] = -5.0                                    # empty at every threshold
    logits[1] = 5.0                                     # full
    logits[2] = -0.5                                    # empty mask, full lower mask
    logits[3, 4:9, 6:20] = np.nan
    logits[4, 10, 10] = np.inf
    logits[4, 11, 11] = -np.inf
    # Values exactly at the thresholds (0, +-1, +-2) in a disc, -3 around it.
    disc = np.hypot(yy - 20, xx - 25) < 12
    logits[5] = np.where(disc, (yy + 2 * xx) % 5 - 2, -3)
    logits[6] = np.nan
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6] + list(range(8, n, 2)))
    planes = torch.from_numpy(logits)
    for threshold, offset in ((0.0, 1.0), (0.0, 0.0), (0.5, 2.5), (0.0, -1.0)):
        stability, boxes, crops = threshold_logits(planes, rows, threshold, offset)
        chosen = planes[rows]
        expected_stability = amg.calculate_stability_score(chosen, threshold, offset)
        masks = chosen > threshold
        assert stability.dtype == torch.float32 and boxes.dtype == torch.int64
        np.testing.assert_array_equal(stability.numpy(), expected_stability.numpy())
        assert torch.equal(boxes, amg.batched_mask_to_box(masks))
        keep = [0, 1, 2, 3, 4, 5, 6, len(rows) - 1]
        for k, crop in zip(keep, crops(keep)):
            x0, y0, x1, y1 = boxes[k].tolist()
            pasted = torch.zeros(h, w, dtype=torch.bool)
            pasted[y0:y1 + 1, x0:x1 + 1] = crop
            assert torch.equal(pasted, masks[k]), k
        assert crops([]) == []
        b_stability, b_boxes, b_masks = threshold_logits_batched(planes, rows, threshold, offset)
        assert b_stability.dtype == torch.float32 and b_boxes.dtype == torch.int64
        np.testing.assert_array_equal(b_stability.numpy(), expected_stability.numpy())
        assert torch.equal(b_boxes, boxes) and torch.equal(b_masks, masks)
        every = threshold_logits_batched(chosen, None, threshold, offset)
        np.testing.assert_array_equal(every[0].numpy(), b_stability.numpy())  # nan: 0/0
        assert torch.equal(every[1], b_boxes) and torch.equal(every[2], b_masks)
    empty = threshold_logits(planes, torch.zeros(0, dtype=torch.int64), 0.0, 1.0)
    assert empty[0].shape == (0,) and empty[1].shape == (0, 4) and empty[2]([]) == []
    empty = threshold_logits_batched(planes, torch.zeros(0, dtype=torch.int64), 0.0, 1.0)
    assert empty[0].shape == (0,) and empty[1].shape == (0, 4) and empty[2].shape == (0, h, w)


# -- small-region clean-up ----------------------------------------------------------------------
def test_remove_small_regions_matches_segment_anything():
    rng = np.random.default_rng(0)
    masks = rng.random((12, 40, 50)) < np.linspace(0.2, 0.8, 12)[:, None, None]
    masks[0] = False                       # empty: unchanged
    masks[1] = False
    masks[1, 3:5, 3:5] = masks[1, 20:23, 30:33] = True   # every island small: keep the largest
    masks[2] = True
    masks[2, 10, 10] = False               # one small hole
    out, changed = remove_small_regions(torch.from_numpy(masks), 10)
    for i, mask in enumerate(masks):
        ref, ref_holes = amg.remove_small_regions(mask, 10, mode="holes")
        ref, ref_islands = amg.remove_small_regions(ref, 10, mode="islands")
        np.testing.assert_array_equal(out[i].numpy(), ref, err_msg=str(i))
        assert changed[i].item() == (ref_holes or ref_islands), i
    assert changed.tolist()[:3] == [False, True, True]
    assert out[1].sum() == 9 and out[2].all()


def reference_clean(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    ref, holes = amg.remove_small_regions(mask, min_area, mode="holes")
    ref, islands = amg.remove_small_regions(ref, min_area, mode="islands")
    return ref, holes or islands


def blob_masks(rng, n: int, height: int, width: int) -> np.ndarray:
    """Masks with holes and islands of every size, many of them at or next to the image edges
    (the cases the box window has to get right)."""
    masks = np.zeros((n, height, width), bool)
    for i in range(n):
        for _ in range(rng.integers(1, 6)):
            h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
            y, x = rng.integers(-2, height - h + 3), rng.integers(-2, width - w + 3)
            y, x = min(max(y, 0), height - h), min(max(x, 0), width - w)
            masks[i, y:y + h, x:x + w] ^= rng.random() < 0.8
        masks[i] ^= rng.random((height, width)) < rng.choice([0.0, 0.02, 0.1])
    return masks


@pytest.mark.parametrize("height,width,min_area", [(40, 50, 10), (23, 31, 30), (9, 12, 40),
                                                   (30, 30, 2), (60, 17, 25)])
def test_remove_small_regions_matches_segment_anything_on_random_blobs(height, width, min_area):
    rng = np.random.default_rng(height * width + min_area)
    masks = blob_masks(rng, 150, height, width)
    # Edge cases: one pixel off each image edge (a one-pixel outside strip), full-width and
    # full-height bands (the outside splits in two), the whole image, and a tie between the
    # largest of several small islands (the survivor is OpenCV's first label).
    masks[0] = False
    masks[0, 1:-1, 1:-1] = True
    masks[0, height // 2, width // 2] = False
    masks[1] = False
    masks[1, 2:5, :] = True
    masks[2] = False
    masks[2, :, 1:4] = True
    masks[2, :, -4:-1] = True
    masks[3] = True
    masks[4] = False
    masks[4, 0, 0] = masks[4, 0, 2] = masks[4, 2, 0] = masks[4, height - 1, width - 1] = True
    masks[5] = False
    masks[5, 1, 1:3] = masks[5, 4, 4:6] = masks[5, height - 2, 3:5] = True
    masks[6] = ~masks[5]
    out, changed = remove_small_regions(torch.from_numpy(masks), min_area)
    assert changed.dtype == torch.bool and out.dtype == torch.bool
    n_changed = 0
    for i, mask in enumerate(masks):
        ref, ref_changed = reference_clean(mask, min_area)
        np.testing.assert_array_equal(out[i].numpy(), ref, err_msg=str(i))
        assert changed[i].item() == ref_changed, i
        n_changed += ref_changed
    assert 0 < n_changed < len(masks)


# -- container ------------------------------------------------------------------------------------
def test_arrays_round_trip():
    rng = np.random.default_rng(1)
    qs = QuasiSuperpixels(
        masks=rng.random((3, 5, 6)) < 0.5, levels=np.array([2, 1, 0], np.uint8),
        predicted_iou=rng.random(3).astype(np.float32),
        stability_score=rng.random(3).astype(np.float32),
        bbox_xywh=rng.integers(0, 5, (3, 4)), point_coords=rng.random((3, 2)),
        crop_box_xywh=rng.integers(0, 5, (3, 4)),
    )
    arrays = qs.to_arrays()
    assert sorted(arrays) == sorted(QuasiSuperpixels._DTYPES)
    back = QuasiSuperpixels.from_arrays({**arrays, "extra": np.zeros(1)})
    assert len(back) == 3
    for key, value in arrays.items():
        assert getattr(back, key).dtype == value.dtype
        np.testing.assert_array_equal(getattr(back, key), value)
    with pytest.raises(KeyError, match="levels"):
        QuasiSuperpixels.from_arrays({k: v for k, v in arrays.items() if k != "levels"})


def test_empty_container_shapes():
    qs = QuasiSuperpixels.empty(7, 9)
    assert len(qs) == 0
    shapes = {k: (v.shape, v.dtype) for k, v in qs.to_arrays().items()}
    assert shapes == {
        "masks": ((0, 7, 9), np.bool_), "levels": ((0,), np.uint8),
        "predicted_iou": ((0,), np.float32), "stability_score": ((0,), np.float32),
        "bbox_xywh": ((0, 4), np.int64), "point_coords": ((0, 2), np.float64),
        "crop_box_xywh": ((0, 4), np.int64),
    }


# -- generator ------------------------------------------------------------------------------------
def shapes_image() -> np.ndarray:
    image = np.full((60, 80, 3), 30, np.uint8)
    image[5:35, 10:50] = (200, 40, 40)
    image[15:30, 20:35] = (220, 60, 60)
    image[40:58, 45:78] = (40, 200, 40)
    return image


def test_nothing_passes_gives_empty_output():
    image = shapes_image()
    gen = QuasiSuperpixelGenerator(fake_predictor(), points_per_side=4, crop_n_layers=1,
                                   pred_iou_thresh=1.5)  # IoU + 0.1 never exceeds 1.5
    qs = gen.generate(image)
    assert len(qs) == 0
    empty = QuasiSuperpixels.empty(60, 80).to_arrays()
    for key, value in qs.to_arrays().items():
        assert (value.shape, value.dtype) == (empty[key].shape, empty[key].dtype), key


class _FakeSam:
    """Just enough of a Sam model for SamAutomaticMaskGenerator's constructor."""

    class image_encoder:  # noqa: N801 - attribute name of segment_anything.Sam
        img_size = 1024


def test_matches_stock_generator_with_the_changes_neutralised():
    """Offsets 0 and no occupation filter: the stock masks, regrouped by level, order kept."""
    settings = dict(points_per_side=8, points_per_batch=64, pred_iou_thresh=0.8,
                    stability_score_thresh=0.85, crop_n_layers=1,
                    crop_n_points_downscale_factor=2, min_mask_region_area=30)
    image = shapes_image()
    ours = QuasiSuperpixelGenerator(
        fake_predictor(), score_thresh_offset=(0, 0, 0), score_nms_offset=(0, 0, 0),
        occupation_thresh=float("inf"), **settings).generate(image)
    stock = SamAutomaticMaskGenerator(_FakeSam(), output_mode="binary_mask", **settings)
    stock.predictor = fake_predictor()
    records = stock.generate(image)

    assert len(ours) == len(records) > 3
    assert set(ours.levels.tolist()) == {0, 1, 2}
    index = []
    for mask, point, crop in zip(ours.masks, ours.point_coords, ours.crop_box_xywh):
        hits = [i for i, r in enumerate(records) if np.array_equal(r["segmentation"], mask)
                and r["point_coords"][0] == point.tolist() and r["crop_box"] == crop.tolist()]
        assert len(hits) == 1
        index.append(hits[0])
    assert sorted(index) == list(range(len(records)))
    for level in (0, 1, 2):
        at_level = [i for i, lv in zip(index, ours.levels) if lv == level]
        assert at_level == sorted(at_level)  # stock order within a level
    for k, i in enumerate(index):
        assert ours.bbox_xywh[k].tolist() == records[i]["bbox"]
        assert ours.predicted_iou[k] == pytest.approx(records[i]["predicted_iou"], rel=1e-6)
        assert ours.stability_score[k] == pytest.approx(records[i]["stability_score"], rel=1e-6)
