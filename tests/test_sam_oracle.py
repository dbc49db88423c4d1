"""``sam.model: world-oracle``: the demo world's own masks through the generator's unchanged code."""
import numpy as np
import pytest
import torch

import pipeline.sam.quasi_superpixels as qsp
from pipeline.demo.sam_oracle import WorldOracleGenerator
from pipeline.demo.world import point_masks, render
from pipeline.sam.quasi_superpixels import remove_small_regions
from pipeline.demo.dataset import demo_image_id, demo_index

#: The paper's thresholds (algorithms.md §1) on a 16 x 16 grid.
PAPER = dict(pred_iou_thresh=0.86, stability_score_thresh=0.92, points_per_side=16)
IMAGES = (0, 1, 2)
MIN_AREA = 100


def _oracle(crop_n_layers):
    return WorldOracleGenerator(crop_n_layers=crop_n_layers, min_mask_region_area=MIN_AREA, **PAPER)


def _expected_mask(sample, point, level, crop_xywh):
    """The world's mask under the stored prompt point, cut to its crop, then cleaned."""
    x, y = (int(np.floor(v)) for v in point)
    mask = point_masks(sample, y, x)[level]
    x0, y0, cw, ch = crop_xywh
    cut = np.zeros_like(mask)
    cut[y0:y0 + ch, x0:x0 + cw] = mask[y0:y0 + ch, x0:x0 + cw]
    return remove_small_regions(torch.from_numpy(cut[None]), MIN_AREA)[0][0].numpy()


def _own_level(sample, point, level) -> bool:
    """Whether the world has a mask of this level under the point (not a repeat of the one above)."""
    x, y = (int(np.floor(v)) for v in point)
    return level == 2 or (sample.part if level == 1 else sample.subpart)[y, x] > 0


def _check_world_masks(qs, sample):
    for mask, level, point, crop in zip(qs.masks, qs.levels, qs.point_coords, qs.crop_box_xywh):
        assert _own_level(sample, point, level), (level, point)
        assert np.array_equal(mask, _expected_mask(sample, point, level, crop)), (level, point)
    assert np.all(qs.predicted_iou == 1.0) and np.all(qs.stability_score == 1.0)


def _object_recall(qs, sample) -> float:
    ious = []
    for wid in np.flatnonzero(sample.instance_class >= 0):
        obj = sample.whole == wid
        if not obj.any():
            continue
        inter = (qs.masks & obj).sum((1, 2))
        union = (qs.masks | obj).sum((1, 2))
        ious.append((inter / union).max() if len(qs) else 0.0)
    return float(np.mean(np.array(ious) >= 0.5))


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_oracle_keeps_the_worlds_own_masks_at_paper_thresholds(crop_n_layers):
    generator = _oracle(crop_n_layers)
    recalls = []
    for i in IMAGES:
        sample = render(0, i)
        qs = generator.generate_world(sample.image, sample)
        assert len(qs) > 1
        _check_world_masks(qs, sample)
        recalls.append(_object_recall(qs, sample))
        # Every background region and object is a whole of the world: one kept whole each at most.
        whole_ids = [np.unique(sample.whole[m]) for m in qs.masks[qs.levels == 2]]
        assert len(whole_ids) <= len(np.unique(sample.whole))
    assert np.mean(recalls) >= 0.9, recalls


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_every_level_survives_thresholds_and_nms_at_its_own_level(crop_n_layers, monkeypatch):
    """Before the occupation filter (kept off here) the world's sub-parts, parts and wholes all
    come through, each at its own level: a part without sub-parts, which the oracle repeats at
    level 0 as SAM's multimask output would, is stored as a part."""
    monkeypatch.setattr(qsp, "occupation_filter",
                        lambda masks, levels, thresh, boxes=None: torch.arange(len(levels)))
    generator = _oracle(crop_n_layers)
    for i in IMAGES:
        sample = render(0, i)
        qs = generator.generate_world(sample.image, sample)
        _check_world_masks(qs, sample)
        world_levels = {level for level, ids in ((0, sample.subpart), (1, sample.part), (2, sample.whole))
                        if ids.any()}
        assert set(qs.levels.tolist()) == world_levels, i


def test_parts_of_a_kept_whole_are_dropped_by_the_occupation_filter():
    """The paper's t_r = 0.3 and a perfect SAM: a part lies wholly inside its whole, so a part or
    sub-part is kept only where its whole did not survive (the quasi-superpixels are then
    mostly wholes, and few images hold all three levels)."""
    generator = _oracle(1)
    for i in IMAGES:
        sample = render(0, i)
        qs = generator.generate_world(sample.image, sample)
        whole_at = [sample.whole[int(y), int(x)] for x, y in qs.point_coords]
        kept_wholes = {w for w, level in zip(whole_at, qs.levels) if level == 2}
        for w, level in zip(whole_at, qs.levels):
            assert level == 2 or w not in kept_wholes


def test_oracle_needs_the_sample_of_the_image():
    generator = _oracle(0)
    sample = render(0, 0)
    with pytest.raises(RuntimeError, match="generate_world"):
        generator.generate(sample.image)
    with pytest.raises(ValueError, match="world sample"):
        generator.generate_world(sample.image[:-1], sample)
    # A failed call leaves no sample behind for the next image.
    with pytest.raises(RuntimeError):
        generator.generate(sample.image)


def test_demo_ids_round_trip_and_others_are_refused():
    for i in (0, 7, 123, 12345):
        assert demo_index(demo_image_id(i)) == i
    for bad in ("demo_12", "demo_00012", "demo_-001", "demo_001a", "2007_000032", "demo0001",
                "demo_\u0661\u0662\u0663\u0664"):
        with pytest.raises(ValueError, match="not a demo image id"):
            demo_index(bad)
