"""§7 training views: sampled from a seed, stored as a vector, replayed on image and label alike."""
import dataclasses

import cv2
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
    # magnitudes are uniform floats (the reference's np.random.uniform), hue included
    assert len({v.hue for v in views}) == 200
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
    # jitter is a per-pixel colour map, so each region keeps one (jittered) colour, up to 1:
    # OpenCV's vectorised and scalar HSV->RGB paths round the same pixel differently by one
    # (the reference's OpenCV does the same)
    full = color_jitter(image, view)
    jittered = np.stack([np.median(full[label == k], axis=0) for k in range(len(COLOURS))]).astype(int)
    assert all(np.abs(full[label == k] - jittered[k]).max() <= 1 for k in range(len(COLOURS)))
    assert len({tuple(c) for c in jittered}) == len(COLOURS)  # regions stay distinguishable
    inner = _interior(out_lab)
    assert inner.sum() > 10_000
    err = np.abs(out_img[inner].astype(int) - jittered[out_lab[inner]])
    assert err.max() <= 1
    # at region edges: classifying each pixel by its nearest region colour agrees with the label
    # better than with the label shifted by one pixel in any direction
    # (among the regions in the crop: a strong hue shift can bring an absent region's colour
    # close to a present one)
    present = np.unique(out_lab)
    dist = ((out_img.astype(int)[:, :, None, :] - jittered[present][None, None]) ** 2).sum(-1)
    seen = present[np.argmin(dist, axis=-1)][2:-2, 2:-2]
    # (a tie is possible: a region edge that falls mid-pixel is a 50/50 blend in the image)
    miss = (seen != out_lab[2:-2, 2:-2]).sum()
    shifted = [(seen != np.roll(out_lab, shift, axis=(0, 1))[2:-2, 2:-2]).sum()
               for shift in [(0, 1), (1, 0), (0, -1), (-1, 0)]]
    assert miss <= min(shifted) and miss < np.mean(shifted)


def test_flip_mirrors_the_crop():
    image, label = _scene()
    view = dataclasses.replace(sample_view(np.random.default_rng(5), label.shape), flip=False)
    flipped = dataclasses.replace(view, flip=True)
    np.testing.assert_array_equal(apply_view_image(image, flipped), apply_view_image(image, view)[:, ::-1])
    np.testing.assert_array_equal(apply_view_label(label, flipped), apply_view_label(label, view)[:, ::-1])


def test_no_jitter_nearest_label_and_padding():
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    view = ViewParams((0, 1, 2, 3), (False,) * 4, 0.0, 1.0, 1.0, 0.0, resize_hw=(6, 8),
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
    base = ViewParams((0, 1, 2, 3), (True, False, False, False), 20.4, 1.0, 1.0, 0.0, (4, 4), (0, 0), 4, False)
    assert (color_jitter(grey, base) == 120).all()
    assert (color_jitter(np.full((2, 2, 3), 250, np.uint8), base) == 255).all()
    # saturation 0 gives grey; hue leaves grey untouched
    colour = np.broadcast_to(COLOURS[:1], (2, 2, 3)).copy()
    sat = dataclasses.replace(base, jitter_apply=(False, False, True, False), saturation=0.0)
    out = color_jitter(colour, sat)
    assert (out == out[..., :1]).all()
    hue = dataclasses.replace(base, jitter_apply=(False, False, False, True), hue=25.0)
    assert (color_jitter(grey, hue) == 100).all()
    assert not (color_jitter(colour, hue) == colour).all()
    # order matters: brightness then contrast differs from contrast then brightness on a non-flat image
    ramp = np.repeat(np.linspace(0, 250, 16, dtype=np.uint8)[None, :, None], 3, axis=2)
    bc = dataclasses.replace(base, jitter_apply=(True, True, False, False), contrast=1.4)
    cb = dataclasses.replace(bc, jitter_order=(1, 0, 2, 3))
    assert not np.array_equal(color_jitter(ramp, bc), color_jitter(ramp, cb))


def _only(op: int, **values) -> ViewParams:
    apply = tuple(i == op for i in range(4))
    return ViewParams((0, 1, 2, 3), apply, values.get("brightness", 0.0), values.get("contrast", 1.0),
                      values.get("saturation", 1.0), values.get("hue", 0.0), (8, 8), (0, 0), 8, False)


def test_jitter_is_the_references_opencv_on_bgr():
    """§7 (corrected): the reference jitters BGR uint8 images with OpenCV; on our RGB arrays each
    operation gives the same pixels (HSV for saturation, HSV_FULL for hue)."""
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])

    def hsv_op(code, back, channel, alpha, beta):
        hsv = cv2.cvtColor(bgr, code)
        hsv[..., channel] = cv2.convertScaleAbs(np.ascontiguousarray(hsv[..., channel]), alpha=alpha, beta=beta)
        return cv2.cvtColor(hsv, back)

    expected = {
        _only(0, brightness=-17.3): cv2.convertScaleAbs(bgr, alpha=1, beta=-17.3),
        _only(1, contrast=1.37): cv2.convertScaleAbs(bgr, alpha=1.37, beta=0),
        _only(2, saturation=1.45): hsv_op(cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR, 1, 1.45, 0),
        _only(3, hue=-21.6): hsv_op(cv2.COLOR_BGR2HSV_FULL, cv2.COLOR_HSV2BGR_FULL, 0, 1, -21.6),
    }
    for view, ref_bgr in expected.items():
        np.testing.assert_array_equal(color_jitter(rgb, view), ref_bgr[..., ::-1])


def test_brightness_and_contrast_act_on_raw_values():
    """convertScaleAbs: brightness adds (below 0 it reflects: |x + b|), contrast multiplies the
    raw values (not around the image mean, as PIL's contrast would), both saturate at 255."""
    dark = np.full((2, 2, 3), 10, np.uint8)
    assert (color_jitter(dark, _only(0, brightness=-20.4)) == 10).all()   # |10 - 20.4| = 10.4
    grey = np.full((2, 2, 3), 100, np.uint8)
    assert (color_jitter(grey, _only(1, contrast=1.4)) == 140).all()
    assert (color_jitter(np.full((2, 2, 3), 200, np.uint8), _only(1, contrast=1.4)) == 255).all()


def test_saturation_and_hue_saturate_instead_of_wrapping():
    red_magenta = np.full((2, 2, 3), (255, 0, 40), np.uint8)   # H near the top of 0..255
    h = int(cv2.cvtColor(red_magenta[:1, :1], cv2.COLOR_RGB2HSV_FULL)[0, 0, 0])
    assert h + 25 > 255
    out = color_jitter(red_magenta, _only(3, hue=25.0))
    top = cv2.cvtColor(np.array([[[255, 255, 255]]], np.uint8), cv2.COLOR_HSV2RGB_FULL)  # H=255
    np.testing.assert_array_equal(out[0, 0], top[0, 0])          # clipped at 255 ...
    wrapped = cv2.cvtColor(np.array([[[(h + 25) % 256, 255, 255]]], np.uint8), cv2.COLOR_HSV2RGB_FULL)
    assert not np.array_equal(out[0, 0], wrapped[0, 0])          # ... not wrapped to a yellow-red
    pale = np.full((2, 2, 3), (200, 120, 120), np.uint8)
    s = int(cv2.cvtColor(pale[:1, :1], cv2.COLOR_RGB2HSV)[0, 0, 1])
    out = color_jitter(pale, _only(2, saturation=1.5))
    assert int(cv2.cvtColor(out[:1, :1], cv2.COLOR_RGB2HSV)[0, 0, 1]) == min(255, round(s * 1.5))
