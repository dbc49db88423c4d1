"""Conformance: the quasi-superpixel generator reproduces every samgen_*.npz (algorithms.md §1)."""
import importlib.util

import numpy as np
import pytest

from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator
from tests.conftest import GOLDEN_DIR, golden_params

# Settings the golden files do not carry (golden/README.md, kind `samgen`).
FIXED = dict(points_per_batch=64, stability_score_offset=1.0, box_nms_thresh=0.7,
             crop_nms_thresh=0.7, crop_overlap_ratio=512 / 1500,
             score_thresh_offset=(0.0, 0.0, 0.1), score_nms_offset=(0.0, 0.0, 1.0))
INT_KEYS = ("masks", "levels", "bbox_xywh", "point_coords", "crop_box_xywh")
FLOAT_KEYS = ("predicted_iou", "stability_score")


def fake_predictor():
    spec = importlib.util.spec_from_file_location("fake_sam", GOLDEN_DIR / "fake_sam.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeSamPredictor()


def generator_for(golden) -> QuasiSuperpixelGenerator:
    return QuasiSuperpixelGenerator(
        fake_predictor(),
        points_per_side=int(golden["param_points_per_side"]),
        pred_iou_thresh=float(golden["param_pred_iou_thresh"]),
        stability_score_thresh=float(golden["param_stability_score_thresh"]),
        crop_n_layers=int(golden["param_crop_n_layers"]),
        crop_n_points_downscale_factor=int(golden["param_crop_n_points_downscale_factor"]),
        min_mask_region_area=int(golden["param_min_mask_region_area"]),
        occupation_thresh=float(golden["param_rock_sand_water_thresh"]),
        **FIXED,
    )


@pytest.mark.parametrize("path", golden_params("samgen"))
def test_golden_samgen(path):
    golden = np.load(path)
    assert str(golden["kind"]) == "samgen"
    out = generator_for(golden).generate(golden["image"]).to_arrays()
    for key in INT_KEYS:
        assert out[key].dtype == golden[key].dtype, key
        assert out[key].shape == golden[key].shape, key
        np.testing.assert_array_equal(out[key], golden[key], err_msg=key)
    for key in FLOAT_KEYS:
        assert out[key].dtype == golden[key].dtype, key
        np.testing.assert_allclose(out[key], golden[key], rtol=1e-5, atol=0, err_msg=key)
