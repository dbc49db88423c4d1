"""CAA reproduces the authors' refined CAMs on every caa_cls_*.npz and caa_seg_*.npz vector."""
import numpy as np
import pytest

from conftest import golden_params
from pipeline.cams.caa import class_aware_attention_affinity


def _check(path):
    data = np.load(path)
    out = class_aware_attention_affinity(
        data["cam"], data["att"], sinkhorn_iters=int(data["sinkhorn_iters"]),
        box_thresh=float(data["box_thresh"]), power=int(data["power"]),
        propagate=str(data["propagate"]))
    expected = data["out"]
    assert out.shape == expected.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("path", golden_params("caa_cls"))
def test_golden_caa_cls(path):
    _check(path)


@pytest.mark.parametrize("path", golden_params("caa_seg"))
def test_golden_caa_seg(path):
    _check(path)
