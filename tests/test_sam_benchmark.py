"""benchmarks/sam_masks.py: the whole-generate comparison runs, and its stock side survives an
image where no mask passes (stock segment-anything raises IndexError there)."""
import importlib.util
import sys

import pytest
from segment_anything import SamAutomaticMaskGenerator

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_sam_masks",
                                                      REPO / "benchmarks" / "sam_masks.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def test_guarded_stock_generator_returns_no_masks_where_stock_crashes(bench):
    image = bench.synthetic_images(1, 60, 80)[0]
    settings = dict(points_per_side=4, pred_iou_thresh=1.5, crop_n_layers=1,
                    output_mode="binary_mask")
    stock = SamAutomaticMaskGenerator(bench._StockSamModel(), **settings)
    stock.predictor = bench.fake_predictor()
    with pytest.raises(IndexError):
        stock.generate(image)
    guarded = bench._guarded_stock_class()(bench._StockSamModel(), **settings)
    guarded.predictor = bench.fake_predictor()
    assert guarded.generate(image) == []


def test_whole_generate_benchmark_runs_and_verifies(bench):
    predictor, random_weights = bench.real_predictor("tiny")
    assert random_weights
    images = bench.synthetic_images(1, 48, 64)
    settings = dict(bench.PAPER, points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0,
                    stability_score_thresh=0.0, crop_n_layers=0)
    (row,) = bench.bench_generate(predictor, images, settings, repeats=1, verify=True)
    assert row["identical"] and row["ours_masks"] > 0 and row["stock_masks"] > 0
    assert row["stock_s"] > 0 and row["ours_s"] > 0
    (agreement,) = bench.bench_precision(predictor, images, settings)
    assert 0.0 <= agreement["iou"] <= 1.0 and agreement["fp32_masks"] > 0
