"""§7 training views: sampled from a seed, stored as a vector, replayed on image and label alike."""
import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from pipeline.prompts.augment import ViewParams, apply_view_image, apply_view_label, color_jitter, sample_view

COLOURS = np.array([[200, 30, 30], [30, 180, 40], [40, 60, 220], [230, 220, 50]], dtype=np.uint8)


def _scene(h=150, w=200):
    """An image of four flat colour quadrants (off-centre) and its region-index label map."""
    label = np.zeros((h, w), dtype=np.uint8)
    label[: h // 3, w // 4 :] = 1
    label[h // 3 :, : w // 2] = 2
    label[h // 3 :, w // 2 :] = 3
    return COLOURS[label], label


def _interior(label, margin=6):
    """Pixels with one label within ``margin`` (beyond the reach of bicubic ringing at 2.4x)."""
    size = 2 * margin + 1
    return ndimage.minimum_filter(label, size, mode="nearest") == ndimage.maximum_filter(
        label, size, mode="nearest")


def test_sampling_is_deterministic_and_in_range():
    a = [sample_view(np.random.default_rng(7), (375, 500)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    views = [sample_view(rng, (375, 500)) for _ in range(200)]
    assert len({v.to_array().tobytes() for v in views}) == 200
    for v in views:
        h, w = v.resize_hw
        assert 288 <= w <= 480 and h >= 224  # long side = width here; short side never below the crop
        assert 0 <= v.crop_yx[0] <= h - 224 and 0 <= v.crop_yx[1] <= w - 224
        assert sorted(v.jitter_order) == [0, 1, 2, 3]
        assert -25 <= v.brightness <= 25 and 0.6 <= v.contrast <= 1.4 and 0.5 <= v.saturation <= 1.5
        assert -25 <= v.hue <= 25
    assert 60 < sum(v.flip for v in views) < 140
    # a small image: scale is set by the short side so the crop fits
    small = sample_view(np.random.default_rng(3), (100, 400))
    assert small.resize_hw == (224, 896)


def test_array_round_trip():
    view = sample_view(np.random.default_rng(11), (333, 444))
    arr = view.to_array()
    assert arr.shape == (ViewParams.ARRAY_LENGTH,) and arr.dtype == np.float64
    assert ViewParams.from_array(arr) == view
    assert ViewParams.from_array(arr.astype(np.float32)).resize_hw == view.resize_hw
    with pytest.raises(ValueError, match="shape"):
        ViewParams.from_array(arr[:-1])


@pytest.mark.parametrize("seed", range(6))
def test_image_and_label_stay_aligned(seed):
    image, label = _scene()
    view = sample_view(np.random.default_rng(seed), label.shape, jitter_p=1.0)
    out_img = apply_view_image(image, view)
    out_lab = apply_view_label(label, view)
    assert out_img.shape == (224, 224, 3) and out_img.dtype == np.uint8
    assert out_lab.shape == (224, 224) and out_lab.dtype == np.uint8
    # jitter is a per-pixel colour map, so each region keeps one (jittered) colour
    full = color_jitter(image, view)
    jittered = np.stack([full[label == k][0] for k in range(len(COLOURS))]).astype(int)
    assert all((full[label == k] == jittered[k]).all() for k in range(len(COLOURS)))
    assert len({tuple(c) for c in jittered}) == len(COLOURS)  # regions stay distinguishable
    inner = _interior(out_lab)
    assert inner.sum() > 10_000
    err = np.abs(out_img[inner].astype(int) - jittered[out_lab[inner]])
    assert err.max() == 0
    # at region edges: classifying each pixel by its nearest region colour agrees with the label
    # better than with the label shifted by one pixel in any direction
    dist = ((out_img.astype(int)[:, :, None, :] - jittered[None, None]) ** 2).sum(-1)
    seen = np.argmin(dist, axis=-1)[2:-2, 2:-2]
    miss = (seen != out_lab[2:-2, 2:-2]).sum()
    for shift in [(0, 1), (1, 0), (0, -1), (-1, 0)]:
        assert miss < (seen != np.roll(out_lab, shift, axis=(0, 1))[2:-2, 2:-2]).sum()


def test_flip_mirrors_the_crop():
    image, label = _scene()
    view = dataclasses.replace(sample_view(np.random.default_rng(5), label.shape), flip=False)
    flipped = dataclasses.replace(view, flip=True)
    np.testing.assert_array_equal(apply_view_image(image, flipped), apply_view_image(image, view)[:, ::-1])
    np.testing.assert_array_equal(apply_view_label(label, flipped), apply_view_label(label, view)[:, ::-1])


def test_no_jitter_nearest_label_and_padding():
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    view = ViewParams((0, 1, 2, 3), (False,) * 4, 0.0, 1.0, 1.0, 0, resize_hw=(6, 8),
                      crop_yx=(2, 4), crop=5, flip=False)
    out = apply_view_label(label, view)
    expected = np.full((5, 5), 255, dtype=np.uint8)
    expected[:4, :4] = np.repeat(np.repeat(label, 2, 0), 2, 1)[2:, 4:]
    np.testing.assert_array_equal(out, expected)
    image = np.full((3, 4, 3), 77, dtype=np.uint8)
    img = apply_view_image(image, view)
    assert (img[:4, :4] == 77).all() and (img[4:] == 0).all() and (img[:, 4:] == 0).all()


def test_jitter_operations():
    grey = np.full((4, 4, 3), 100, dtype=np.uint8)
    base = ViewParams((0, 1, 2, 3), (True, False, False, False), 20.4, 1.0, 1.0, 0, (4, 4), (0, 0), 4, False)
    assert (color_jitter(grey, base) == 120).all()
    assert (color_jitter(np.full((2, 2, 3), 250, np.uint8), base) == 255).all()
    # saturation 0 gives grey; hue leaves grey untouched
    colour = np.broadcast_to(COLOURS[:1], (2, 2, 3)).copy()
    sat = dataclasses.replace(base, jitter_apply=(False, False, True, False), saturation=0.0)
    out = color_jitter(colour, sat)
    assert (out == out[..., :1]).all()
    hue = dataclasses.replace(base, jitter_apply=(False, False, False, True), hue=25)
    assert (color_jitter(grey, hue) == 100).all()
    assert not (color_jitter(colour, hue) == colour).all()
    # order matters: brightness then contrast differs from contrast then brightness on a non-flat image
    ramp = np.repeat(np.linspace(0, 250, 16, dtype=np.uint8)[None, :, None], 3, axis=2)
    bc = dataclasses.replace(base, jitter_apply=(True, True, False, False), contrast=1.4)
    cb = dataclasses.replace(bc, jitter_order=(1, 0, 2, 3))
    assert not np.array_equal(color_jitter(ramp, bc), color_jitter(ramp, cb))
