"""benchmarks/gpu_check_sam.py, the like-for-like SAM step of the GPU check, on the CPU with the
tiny random SAM: both generators get the paper's settings, and stock's mask counts equal ours with
the paper's changes off (a generator that keeps its changes on is caught)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check_sam
from gpu_check_sam import compare_generators, generators, paper_settings

from pipeline.sam.models import build_sam_predictor


def test_the_settings_are_the_papers_but_the_thresholds():
    settings = paper_settings()
    assert {k: settings[k] for k in ("points_per_side", "points_per_batch", "crop_n_layers",
                                     "crop_n_points_downscale_factor", "box_nms_thresh",
                                     "crop_nms_thresh", "min_mask_region_area")} == {
        "points_per_side": 32, "points_per_batch": 256, "crop_n_layers": 1,
        "crop_n_points_downscale_factor": 2, "box_nms_thresh": 0.7, "crop_nms_thresh": 0.7,
        "min_mask_region_area": 100}
    assert settings["crop_overlap_ratio"] == pytest.approx(512 / 1500)
    assert (settings["pred_iou_thresh"], settings["stability_score_thresh"]) == (0.0, 0.0)
    assert list(settings["score_thresh_offset"]) == [0.0, 0.0, 0.1]
    assert paper_settings(points_per_side=4)["points_per_side"] == 4


@pytest.fixture(scope="module")
def predictor():
    return build_sam_predictor("tiny", None, None, torch.device("cpu"))


@pytest.fixture(scope="module")
def setup():
    # box NMS off (as the tiny graph of gpu_check has it): random weights' masks span the image,
    # so at 0.7 one mask per image survives and the counts could not tell the generators apart
    settings = {**paper_settings(points_per_side=2), "box_nms_thresh": 1.0, "crop_nms_thresh": 1.0}
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    return settings, [image]


def test_stock_gets_the_same_settings(predictor, setup):
    settings, _ = setup
    stock = generators(predictor, settings)["stock"][0].__self__
    assert stock.predictor._inner is predictor
    for key in gpu_check_sam.STOCK_KEYS:
        if key != "points_per_side":  # stock keeps it as its point grids
            assert getattr(stock, key) == settings[key], key
    side = settings["points_per_side"]
    assert [len(g) for g in stock.point_grids] == [side ** 2, (side // 2) ** 2]


def test_stock_and_ours_with_the_changes_off_find_the_same_masks(predictor, setup):
    settings, images = setup
    result = compare_generators(predictor, images, settings, repeats=1, device=torch.device("cpu"))
    assert result.masks["stock"] == result.masks["ours, changes off"], result.line()
    assert result.masks["stock"][0] >= 3, result.line()
    assert result.mismatches() == []
    assert all(len(result.seconds[name]) == 1 for name in gpu_check_sam.GENERATORS)
    line = result.line()
    assert all(f"{name} " in line for name in gpu_check_sam.GENERATORS)


def test_a_mismatch_with_the_changes_left_on_is_reported(predictor, setup, monkeypatch):
    settings, images = setup
    monkeypatch.setattr(gpu_check_sam, "NEUTRAL", {})  # "changes off" keeps the occupation filter
    result = compare_generators(predictor, images, settings, repeats=0, device=torch.device("cpu"))
    assert result.masks["ours, changes off"] == result.masks["ours"] != result.masks["stock"]
    assert result.mismatches() and "image 0: stock" in result.mismatches()[0]


def test_each_call_is_split_into_encoder_decoder_and_postprocessing(predictor, setup):
    """Issue 32, item 4: per image, the encoder, decoder and post-processing milliseconds of each
    generator; ours' encoder passes (several crops at once, not set_image) are charged too."""
    settings, images = setup
    result = compare_generators(predictor, images, settings, repeats=2, device=torch.device("cpu"))
    for name in gpu_check_sam.GENERATORS:
        assert len(result.phases[name]) == 2
        for call, total in zip(result.phases[name], result.seconds[name]):
            assert set(call) == set(gpu_check_sam.PHASES)
            assert call["encoder"] > 0 and call["decoder"] > 0 and call["postprocess"] > 0, (name, call)
            assert sum(call.values()) == pytest.approx(total)
        ms = result.phase_ms(name)
        assert f"{name} " in result.line() and f"encoder {ms['encoder']:.1f} ms" in result.line()
