"""The batched post-processing (``QuasiSuperpixelGenerator(batched=True)``, the path of any device
but the CPU) gives the quasi-superpixels of the box-crop path, bit for bit: on the golden
vectors, on the stand-in predictor at several settings, and on the simulated CUDA device."""
import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from pipeline.sam import quasi_superpixels as qsp
from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator
from tests.conftest import golden_params
from tests.simulated_cuda import logical_device, simulated_cuda
from tests.test_golden_samgen import FLOAT_KEYS, INT_KEYS, fake_predictor, generator_for
from tests.test_quasi_superpixels import shapes_image

SETTINGS = dict(points_per_side=8, points_per_batch=32, pred_iou_thresh=0.8,
                stability_score_thresh=0.85, crop_n_layers=1, crop_n_points_downscale_factor=2,
                min_mask_region_area=30)
VARIANTS = {
    "paper": {},
    "changes off": dict(score_thresh_offset=(0, 0, 0), score_nms_offset=(0, 0, 0),
                        occupation_thresh=float("inf")),
    "one crop, no clean-up": dict(crop_n_layers=0, min_mask_region_area=0),
    "level biases": dict(stability_score_bias=(0.05, 0.0, -0.02), occupation_thresh=0.5),
    "no thresholds": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0),
}


def image() -> np.ndarray:
    out = shapes_image()
    out[45:55, 5:15] = (90, 90, 200)
    out[2:4, 70:79] = (200, 200, 0)
    return out


def same(a, b) -> bool:
    a, b = a.to_arrays(), b.to_arrays()
    return all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
               and a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("path", golden_params("samgen"))
def test_batched_path_reproduces_the_golden_files(path):
    golden = np.load(path)
    generator = generator_for(golden)
    generator.batched = True
    out = generator.generate(golden["image"]).to_arrays()
    for key in INT_KEYS:
        assert out[key].dtype == golden[key].dtype, key
        np.testing.assert_array_equal(out[key], golden[key], err_msg=key)
    for key in FLOAT_KEYS:
        np.testing.assert_allclose(out[key], golden[key], rtol=1e-5, atol=0, err_msg=key)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_batched_path_equals_the_box_crop_path(variant):
    settings = dict(SETTINGS, **VARIANTS[variant])
    boxed = QuasiSuperpixelGenerator(fake_predictor(), batched=False, **settings).generate(image())
    batched = QuasiSuperpixelGenerator(fake_predictor(), batched=True, **settings).generate(image())
    assert len(boxed) > 2
    assert same(batched, boxed)


class _OnDevice:
    """The stand-in predictor with its answers on ``device`` (as a network's would be)."""

    def __init__(self, device):
        self.inner = fake_predictor()
        self.transform, self.model = self.inner.transform, self.inner.model
        self.device = torch.device(device)

    def set_image(self, image):
        self.inner.set_image(image)

    def reset_image(self):
        self.inner.reset_image()

    def predict_torch(self, point_coords, point_labels, **kwargs):
        out = self.inner.predict_torch(point_coords.cpu(), point_labels.cpu(), **kwargs)
        return tuple(t.to(self.device) for t in out)


@pytest.mark.parametrize("variant", ["paper", "changes off"])
def test_simulated_cuda_gives_the_cpu_output(variant, monkeypatch):
    settings = dict(SETTINGS, **VARIANTS[variant])
    expected = QuasiSuperpixelGenerator(fake_predictor(), **settings).generate(image())
    seen = []
    original = qsp.occupation_filter_batched

    def spy(masks, levels, thresh):
        seen.append(logical_device(masks))
        return original(masks, levels, thresh)

    monkeypatch.setattr(qsp, "occupation_filter_batched", spy)
    with simulated_cuda():
        out = QuasiSuperpixelGenerator(_OnDevice("cuda"), **settings).generate(image())
    assert seen == [torch.device("cuda", 0)]  # the device ran the batched path
    assert same(out, expected)


def test_device_nms_keeps_the_cpu_order_of_tied_scores():
    """Above 1,000 boxes torchvision's batched_nms re-sorts on the CPU (tied scores come out in
    its unstable sort's order) but not on CUDA: a device's NMS runs on the host."""
    g = torch.Generator().manual_seed(0)
    n = 1500
    xy = torch.randint(0, 400, (n, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(1, 100, (n, 2), generator=g)], 1).to(torch.int64)
    scores = torch.randint(0, 3, (n,), generator=g).float()  # ties, as 1 / crop area has
    expected = batched_nms(boxes.float(), scores, torch.zeros(n), 0.7)
    with simulated_cuda():
        keep = qsp._nms(boxes.to("cuda"), scores.to("cuda"), 0.7)
        assert keep.device.type == "cuda"
        device_order = batched_nms(boxes.float().to("cuda"), scores.to("cuda"),
                                   torch.zeros(n, device="cuda"), 0.7)
    assert torch.equal(keep.cpu(), expected)
    assert not torch.equal(device_order.cpu(), expected)  # what a device's own NMS would give
