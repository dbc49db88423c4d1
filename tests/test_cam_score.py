"""CAM score (§3) and the CAA box rule (§4) on small hand-made maps."""
import numpy as np
import pytest
import torch

from pipeline.cams.caa import box_mask, class_aware_attention_affinity, score_boxes
from pipeline.cams.score import cam_score


def test_score_clamps_then_min_max_per_class():
    cam = np.array([[[-1.0, 0.0], [2.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]], dtype=np.float32)
    out = cam_score(cam)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], np.array([[0, 0], [2, 4]]) / (4 + 1e-7), rtol=1e-6)
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))  # flat CAM: 0, no division by zero
    t = cam_score(torch.from_numpy(cam))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), out)


def test_score_resizes_bilinearly_first():
    cam = np.array([[[0.0, 1.0]]], dtype=np.float32)
    out = cam_score(cam, size=(1, 4))
    # align_corners=False: samples at x = -0.25, 0.25, 0.75, 1.25, clamped to the edge pixels
    np.testing.assert_allclose(out[0, 0], np.array([0.0, 0.25, 0.75, 1.0]) / (1 + 1e-7), rtol=1e-6)


def test_boxes_threshold_clip_and_empty():
    s = np.zeros((6, 8), dtype=np.float32)
    s[1:3, 1:3] = 1.0   # blob A
    s[3:6, 5:8] = 0.6   # blob B touching the bottom-right corner
    s[0, 7] = 0.4       # 0.4*255 = 102 is not > int(0.4*255) = 102: not a box
    boxes = score_boxes(s, 0.4)
    assert sorted(map(tuple, boxes.tolist())) == [(1, 1, 3, 3), (5, 3, 7, 5)]  # x1/y1 clipped to w-1/h-1
    assert score_boxes(np.zeros((4, 4), np.float32), 0.4).tolist() == [[0, 0, 0, 0]]
    mask = box_mask(boxes, (6, 8))
    expected = np.zeros((6, 8), np.float32)
    expected[1:3, 1:3] = 1
    expected[3:5, 5:7] = 1
    np.testing.assert_array_equal(mask, expected)


def test_caa_propagates_only_from_boxes():
    cam = np.zeros((1, 2, 3), dtype=np.float32)
    cam[0, 0, 0] = 1.0
    att = np.ones((6, 6), dtype=np.float32)
    out = class_aware_attention_affinity(cam, att, sinkhorn_iters=1, box_thresh=0.4, power=2,
                                         propagate="score")
    # uniform attention: A = 1/6 everywhere, A^2 = 1/6; only the box [0:1, 0:1] propagates 1
    np.testing.assert_allclose(out, np.full((1, 2, 3), 1 / 6 * (1 / (1 + 1e-7))), rtol=1e-6)
    with pytest.raises(ValueError, match="propagate"):
        class_aware_attention_affinity(cam, att, propagate="both")
    with pytest.raises(ValueError, match="does not match"):
        class_aware_attention_affinity(cam, att[:5, :5])


def test_cam_score_with_no_present_class_is_empty():
    out = cam_score(np.zeros((0, 4, 5), np.float32), (16, 20))
    assert out.shape == (0, 16, 20) and out.dtype == np.float32
    assert cam_score(torch.zeros(0, 4, 5)).shape == (0, 4, 5)
