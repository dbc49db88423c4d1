"""The final segmenter: model factory, weights, training helpers, multi-scale inference, SAMS post."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.seeds.sams import sams_postprocess
from pipeline.segmenter.archs import ARCHS, SegmenterArch
from pipeline.segmenter.inputs import to_input
from pipeline.segmenter.model import (
    build_segmenter, forward_padded, input_multiple, load_segmenter, predict_probs, save_atomic,
    save_segmenter,
)
from pipeline.segmenter.training import (
    SegmentationAugment, build_optimizer, collate, poly_lr, train_step,
)
from pipeline.weights import CheckpointError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shapes_set(n: int, size: int, seed: int = 0):
    """Noisy grey images with one red disk (class 1) or blue square (class 2) and its seed map."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    data = []
    for i in range(n):
        image = rng.integers(90, 160, size=(size, size, 3)).astype(np.uint8)
        seed_map = np.zeros((size, size), np.uint8)
        cy, cx, r = rng.integers(18, size - 18, size=2).tolist() + [int(rng.integers(9, 16))]
        if i % 2 == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            image[mask] = (220, 40, 40)
        else:
            mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            image[mask] = (40, 60, 220)
        seed_map[mask] = 1 + i % 2
        data.append((image, seed_map))
    return data


def test_training_reduces_loss_on_demo_data():
    from pipeline.demo.world import DEMO_CLASSES, render

    # The demo's ground truth as seeds (its 255 boundary band is ignored by the loss).
    data = [(s.image, s.label) for s in (render(0, i) for i in range(8))]
    net = build_segmenter("tiny", len(DEMO_CLASSES) + 1, seed=0)
    opt = build_optimizer(net, lr=0.01, momentum=0.9, weight_decay=5e-4)
    augment = SegmentationAugment(crop_size=64, scale_range=(0.5, 1.0))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    steps = 20
    losses = []
    for step in range(steps):
        batch = rng.choice(len(data), size=4, replace=False)
        x, y = collate([augment(*data[i], rng) for i in batch])
        losses.append(train_step(net, opt, x, y, poly_lr(0.01, step, steps, 0.9)))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.6 * first, losses  # measured: about 1.55 -> 0.6


def test_training_reduces_loss():
    data = _shapes_set(8, size=48)
    net = build_segmenter("tiny", 3, seed=0)
    opt = build_optimizer(net, lr=0.01, momentum=0.9, weight_decay=5e-4)
    augment = SegmentationAugment(crop_size=48, scale_range=(0.75, 1.25))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    losses = []
    steps = 20
    for step in range(steps):
        batch = rng.choice(len(data), size=4, replace=False)
        x, y = collate([augment(*data[i], rng) for i in batch])
        losses.append(train_step(net, opt, x, y, poly_lr(0.01, step, steps, 0.9)))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert first > 0.9  # ~log(3) from a random head
    assert last < 0.5 * first, losses
    # It learnt the shapes, not just the class prior (~80% background): most pixels of both
    # kinds are right on the training images.
    net.eval()
    for image, seed_map in data[:4]:
        pred = predict_probs(net, image, (1.0,), flip=False).argmax(0).numpy()
        fg = seed_map > 0
        assert (pred[fg] == seed_map[fg]).mean() > 0.75
        assert (pred[~fg] == 0).mean() > 0.75


def test_postprocess_hand_built_case():
    # Channels: background, class 1, class 2, class 3; 7 pixels in one row.
    probs = np.array(
        [
            [0.50, 0.05, 0.00, 0.45],  # p0 argmax bg (class 3 is never an argmax)
            [0.50, 0.05, 0.00, 0.45],  # p1 bg
            [0.10, 0.80, 0.10, 0.00],  # p2 class 1
            [0.40, 0.50, 0.10, 0.00],  # p3 class 1
            [0.45, 0.00, 0.55, 0.00],  # p4 class 2
            [0.90, 0.00, 0.10, 0.00],  # p5 bg
            [0.00, 1.00, 0.00, 0.00],  # p6 class 1, covered by no mask
        ],
        np.float32,
    ).T.reshape(4, 1, 7)
    masks = np.zeros((4, 1, 7), bool)
    masks[0, 0, [0, 1]] = True  # whole: bg .5 (class 3 would win with .45 > .5**2 if it counted)
    masks[1, 0, [2, 3]] = True  # part: class 1 .65
    masks[2, 0, [3, 4]] = True  # whole: bg .425, class 1 .25, class 2 .325
    masks[3, 0, [5]] = True     # sub-part: bg .9
    levels = np.array([2, 1, 2, 0], np.uint8)
    # alpha 2: mask 2's background .425**2 = .18 loses to class 2; it overwrites mask 1 at p3
    # (higher level); mask 0 stays background (.25) because class 3 is not a channel.
    np.testing.assert_array_equal(
        sams_postprocess(probs, masks, levels, 2.0), np.array([[0, 0, 1, 2, 2, 0, 0]], np.uint8)
    )
    # alpha 1: mask 2 is background (.425) and still overwrites the part at p3.
    np.testing.assert_array_equal(
        sams_postprocess(probs, masks, levels, 1.0), np.array([[0, 0, 1, 0, 0, 0, 0]], np.uint8)
    )


def test_multiscale_flip_probabilities():
    net = build_segmenter("tiny", 5, seed=1).eval()
    image = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    probs = predict_probs(net, image, scales=(0.5, 0.75, 1.0, 1.25, 1.5), flip=True)
    assert probs.shape == (5, 37, 53) and probs.dtype == torch.float32
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(37, 53), atol=1e-5, rtol=0)
    # Flip averaging: the result for a mirrored image is the mirrored result (width 48 is a
    # multiple of the output stride, so no one-sided padding breaks the symmetry).
    square = image[:32, :48]
    a = predict_probs(net, square, scales=(1.0,), flip=True)
    b = predict_probs(net, np.ascontiguousarray(square[:, ::-1]), scales=(1.0,), flip=True)
    torch.testing.assert_close(a, b.flip(-1), atol=1e-5, rtol=1e-4)
    # One scale without flip is the plain softmax of the network.
    single = predict_probs(net, square, scales=(1.0,), flip=False)
    with torch.no_grad():
        expected = net(to_input(square)).softmax(1)[0]
    torch.testing.assert_close(single, expected, atol=1e-6, rtol=1e-5)


def test_build_is_deterministic_and_save_load_round_trips(tmp_path):
    a, b = build_segmenter("tiny", 3, seed=0), build_segmenter("tiny", 3, seed=0)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    save_segmenter(tmp_path / "model.pt", a, "tiny", ["ball", "box"], {"step": 7})
    net, meta = load_segmenter(tmp_path / "model.pt")
    assert meta == {"model": "tiny", "output_stride": 8, "class_names": ["ball", "box"], "info": {"step": 7}}
    image = np.full((32, 32, 3), 120, np.uint8)
    torch.testing.assert_close(predict_probs(net, image, (1.0,), False), predict_probs(a.eval(), image, (1.0,), False))


def test_trained_model_loads_without_its_encoder_weights(tmp_path, monkeypatch):
    # A model that needs ImageNet weights to be built, but not to be loaded once trained.
    monkeypatch.setitem(ARCHS, "tiny_pretrained", SegmenterArch("resnet18", 32, True))
    torch.save(build_segmenter("tiny", 3, seed=5).encoder.state_dict(), tmp_path / "enc.pth")
    with pytest.raises(CheckpointError):
        build_segmenter("tiny_pretrained", 3)
    net = build_segmenter("tiny_pretrained", 3, encoder_weights=tmp_path / "enc.pth")
    save_segmenter(tmp_path / "model.pt", net, "tiny_pretrained", ["a", "b"])
    (tmp_path / "enc.pth").unlink()
    loaded, meta = load_segmenter(tmp_path / "model.pt")
    assert meta["model"] == "tiny_pretrained"
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_missing_encoder_weights_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"segmenter\.encoder_weights.*never download"):
        build_segmenter("deeplabv3plus_r101", 21, encoder_weights=None)
    with pytest.raises(CheckpointError, match="not found"):
        build_segmenter("deeplabv3plus_r101", 21, encoder_weights=tmp_path / "absent.pth")


def test_encoder_weights_are_loaded_from_a_local_file(tmp_path):
    source = build_segmenter("tiny", 3, seed=5)
    state = {**source.encoder.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "resnet18.pth")
    net = build_segmenter("tiny", 3, encoder_weights=tmp_path / "resnet18.pth", seed=0)
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[k], v), k
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="do not fit the encoder"):
        build_segmenter("tiny", 3, encoder_weights=tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="SHA-256"):
        build_segmenter("tiny", 3, encoder_weights=tmp_path / "resnet18.pth", encoder_weights_sha256="0" * 64)


def test_augment_pads_with_ignore_and_is_reproducible():
    image = np.full((20, 30, 3), 200, np.uint8)
    label = np.ones((20, 30), np.uint8)
    augment = SegmentationAugment(crop_size=48, scale_range=(1.0, 1.0), flip_prob=0.0)
    out_img, out_lab = augment(image, label, np.random.default_rng(0))
    assert out_img.shape == (48, 48, 3) and out_lab.shape == (48, 48)
    # A 20x30 image in a 48 crop: exactly 600 labelled pixels, the rest padding (255).
    assert (out_lab == 1).sum() == 600 and (out_lab == 255).sum() == 48 * 48 - 600
    assert (out_img[out_lab == 255] == (124, 116, 104)).all()  # the ImageNet mean colour
    assert (out_img[out_lab == 1] == 200).all()
    big = SegmentationAugment(crop_size=16)
    r1, r2 = big(image, label, np.random.default_rng(3)), big(image, label, np.random.default_rng(3))
    assert np.array_equal(r1[0], r2[0]) and np.array_equal(r1[1], r2[1])
    x, y = collate([r1, r2])
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_poly_lr():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 100, 100) == 0.0
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)


def test_all_ignored_batch_gives_no_update():
    net = build_segmenter("tiny", 3, seed=0)
    opt = build_optimizer(net)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.zeros(2, 3, 32, 32)
    y = torch.full((2, 32, 32), 255, dtype=torch.int64)
    assert train_step(net, opt, x, y, 0.01) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


# -- output stride (§9: 8) ------------------------------------------------------------------------


def test_reference_output_stride_is_8_and_inputs_pad_to_8_only():
    net8 = build_segmenter("tiny", 3, seed=0).eval()
    net16 = build_segmenter("tiny", 3, seed=0, output_stride=16).eval()
    assert input_multiple(net8) == 8 and input_multiple(net16) == 16
    # Same weights: the stride is dilation, not parameters.
    for (k, a), b in zip(net8.state_dict().items(), net16.state_dict().values()):
        assert torch.equal(a, b), k
    x = to_input(np.random.default_rng(0).integers(0, 256, size=(40, 56, 3), dtype=np.uint8))
    with torch.no_grad():
        assert net8.encoder(x)[-1].shape[-2:] == (5, 7)  # input / 8
        assert net16.encoder(torch.nn.functional.pad(x, (0, 8, 0, 8)))[-1].shape[-2:] == (3, 4)
        # 40 x 56 is a multiple of 8: stride 8 runs it unpadded, exactly the network's output.
        torch.testing.assert_close(forward_padded(net8, x), net8(x), atol=0, rtol=0)
        # Any other size: padded to the next multiple of 8 (not 16) and cropped back.
        odd = x[..., :37, :53]
        with pytest.raises(RuntimeError, match="divisible by 8"):
            net8(odd)
        out = forward_padded(net8, odd)
        assert out.shape == (1, 3, 37, 53)
        expected = net8(torch.nn.functional.pad(odd, (0, 3, 0, 3)))[..., :37, :53]
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="output stride"):
        build_segmenter("tiny", 3, output_stride=32)


def test_multiscale_inference_at_stride_8_any_size():
    net = build_segmenter("tiny", 4, seed=2).eval()
    for h, w in ((37, 53), (41, 30), (64, 48)):
        image = np.random.default_rng(h).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        probs = predict_probs(net, image, scales=(0.5, 0.75, 1.0, 1.25), flip=True)
        assert probs.shape == (4, h, w)
        torch.testing.assert_close(probs.sum(0), torch.ones(h, w), atol=1e-5, rtol=0)


def test_saved_segmenter_keeps_its_output_stride(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    for stride in (8, 16):
        net = build_segmenter("tiny", 3, seed=3, output_stride=stride).eval()
        save_segmenter(tmp_path / f"os{stride}.pt", net, "tiny", ["a", "b"])
        loaded, meta = load_segmenter(tmp_path / f"os{stride}.pt")
        assert meta["output_stride"] == stride and input_multiple(loaded) == stride
        torch.testing.assert_close(predict_probs(loaded, image), predict_probs(net, image))
    # Format 1 files did not record the stride; all of them were trained at 16.
    old = build_segmenter("tiny", 3, seed=3, output_stride=16)
    save_atomic({"format": 1, "model": "tiny", "class_names": ["a", "b"],
                 "state_dict": old.state_dict()}, tmp_path / "v1.pt")
    loaded, meta = load_segmenter(tmp_path / "v1.pt")
    assert meta["output_stride"] == 16 and meta["info"] == {}
    torch.testing.assert_close(predict_probs(loaded, image), predict_probs(old.eval(), image))


# -- sub-batches (gradient accumulation inside one iteration) -------------------------------------


def _strip_batch_statistics(net: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm and dropout replaced by identities: what is left depends on each sample alone."""
    for name, child in net.named_children():
        if isinstance(child, (torch.nn.BatchNorm2d, torch.nn.Dropout)):
            setattr(net, name, torch.nn.Identity())
        else:
            _strip_batch_statistics(child)
    return net


def _uneven_batch():
    """4 samples whose labelled-pixel counts differ a lot (so sub-batch losses need weighting)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(4, 3, 32, 32)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, size=(4, 32, 32))).long()
    y[0, 4:] = 255   # 128 labelled pixels
    y[1, 20:] = 255  # 640
    return x, y


def _step(net, x, y, **kwargs):
    opt = torch.optim.SGD(net.parameters(), lr=1.0)  # update = -gradient
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    loss = train_step(net, opt, x, y, lr=1.0, **kwargs)
    # the loss stays a tensor on the device (no host sync per step); 0-dim float64
    assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.dtype == torch.float64
    return float(loss), {k: before[k] - p.detach() for k, p in net.named_parameters()}


def test_sub_batches_give_the_full_batch_gradient_without_batch_statistics():
    x, y = _uneven_batch()
    results = {}
    for n in (1, 2, 4):
        net = _strip_batch_statistics(build_segmenter("tiny", 3, seed=0))
        results[n] = _step(net, x, y, sub_batches=n)
    for n in (2, 4):
        assert results[n][0] == pytest.approx(results[1][0], rel=1e-5)
        for k, g in results[1][1].items():
            torch.testing.assert_close(results[n][1][k], g, atol=1e-6, rtol=1e-4, msg=k)
    # The weighting matters: averaging the sub-batch means would give another gradient here.
    net = _strip_batch_statistics(build_segmenter("tiny", 3, seed=0))
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    net.train()
    opt.zero_grad()
    for xs, ys in zip(x.split(2), y.split(2)):
        (torch.nn.functional.cross_entropy(net(xs), ys, ignore_index=255) / 2).backward()
    naive = net.segmentation_head[0].weight.grad
    assert not torch.allclose(naive, results[1][1]["segmentation_head.0.weight"], atol=1e-6, rtol=1e-4)


def test_sub_batches_batchnorm_sees_the_sub_batch():
    x, y = _uneven_batch()
    n_valid = int((y != 255).sum())
    torch.manual_seed(0)  # the ASPP dropout draws the same masks in both runs
    loss, update = _step(build_segmenter("tiny", 3, seed=0), x, y, sub_batches=2)
    # Reference: each half through the network in train mode on its own, its summed pixel loss
    # over the whole batch's labelled pixels, gradients added.
    net = build_segmenter("tiny", 3, seed=0)
    net.train()
    torch.manual_seed(0)
    total = 0.0
    for xs, ys in zip(x.split(2), y.split(2)):
        part = torch.nn.functional.cross_entropy(net(xs), ys, ignore_index=255, reduction="sum") / n_valid
        part.backward()
        total += float(part.detach())
    assert loss == pytest.approx(total, rel=1e-6)
    for k, p in net.named_parameters():
        torch.testing.assert_close(update[k], p.grad, atol=1e-6, rtol=1e-5, msg=k)
    # ... which is not the undivided batch's gradient (BatchNorm statistics differ).
    torch.manual_seed(0)
    _, full = _step(build_segmenter("tiny", 3, seed=0), x, y, sub_batches=1)
    assert not torch.allclose(full["encoder.conv1.weight"], update["encoder.conv1.weight"], atol=1e-6, rtol=1e-4)


def test_sub_batches_out_of_range_are_rejected():
    net = build_segmenter("tiny", 3, seed=0)
    x, y = _uneven_batch()
    with pytest.raises(ValueError, match="sub_batches"):
        train_step(net, build_optimizer(net), x, y, 0.01, sub_batches=5)


# -- precision (compute.precision) ----------------------------------------------------------------


def _record_head_dtype(net, seen):
    return net.segmentation_head[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_selects_the_forward_dtype_and_keeps_loss_and_probs_fp32(precision, dtype, monkeypatch):
    net = build_segmenter("tiny", 3, seed=0)
    seen, loss_dtypes = [], []
    hook = _record_head_dtype(net, seen)
    real_ce = torch.nn.functional.cross_entropy

    def recording_ce(logits, *args, **kwargs):
        loss_dtypes.append(logits.dtype)
        return real_ce(logits, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording_ce)
    x, y = _uneven_batch()
    loss = train_step(net, build_optimizer(net), x, y, 0.01, sub_batches=2, precision=precision)
    assert seen == [dtype, dtype] and loss_dtypes == [torch.float32, torch.float32]
    assert np.isfinite(float(loss)) and all(p.dtype == torch.float32 for p in net.parameters())
    seen.clear()
    image = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    probs = predict_probs(net.eval(), image, scales=(0.75, 1.0), flip=True, precision=precision)
    hook.remove()
    assert seen == [dtype, dtype] and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(0), torch.ones(37, 53), atol=1e-5, rtol=0)


def test_bf16_inference_agrees_with_fp32():
    net = build_segmenter("tiny", 3, seed=0).eval()
    image = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    a = predict_probs(net, image, precision="fp32")
    b = predict_probs(net, image, precision="bf16")
    assert not torch.equal(a, b)  # bf16 really ran
    assert (a - b).abs().max() < 0.01  # measured 0.0004 (bf16 keeps 8 bits of mantissa)


def test_saved_checkpoint_bytes_do_not_depend_on_the_temporary_name(tmp_path):
    # DVC hashes checkpoints: the same state saved twice (two runs) must give the same bytes.
    from pipeline.segmenter.model import save_atomic

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": 3}
    save_atomic(state, tmp_path / "a" / "best.pt")
    save_atomic(state, tmp_path / "b" / "best.pt")
    first = (tmp_path / "a" / "best.pt").read_bytes()
    assert first == (tmp_path / "b" / "best.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a" / "best.pt")["w"], state["w"])


def test_architectures_are_a_registry_the_params_check_without_the_networks(monkeypatch):
    """segmenter.model names a registered architecture (the demo's registers from
    pipeline/demo/registry.py); an unknown name lists the known ones; validating params imports
    no network code."""
    import subprocess
    import sys

    from pipeline.config import ConfigError
    from pipeline.params import SegmenterConfig
    from pipeline.segmenter.archs import get_arch, register_arch, registered_archs

    assert {"deeplabv3plus_r101", "tiny", "demo_clip_vit"} <= set(registered_archs())
    assert get_arch("demo_clip_vit").output_strides == (16,)
    monkeypatch.setitem(ARCHS, "tiny_os16", SegmenterArch("resnet18", 32, False))  # removed after the test
    register_arch("tiny_os16", SegmenterArch("resnet18", 32, False, family="clip_vit"))
    assert SegmenterConfig(model="tiny_os16", output_stride=16).model == "tiny_os16"
    with pytest.raises(ConfigError, match=r"output_stride of tiny_os16 must be 16, got 8"):
        SegmenterConfig(model="tiny_os16", output_stride=8)
    with pytest.raises(ConfigError, match=r"unknown segmenter model 'nope' \(known: deeplabv3plus_r101, demo_clip_vit, "):
        build_segmenter("nope", 3)
    code = ("import sys; from pipeline.params import SegmenterConfig; "
            "SegmenterConfig(model='demo_clip_vit', output_stride=16); "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.segmenter')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pipeline.segmenter', 'pipeline.segmenter.archs']"


def test_no_two_segmenter_modules_import_each_other():
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "pipeline" / "segmenter"
    imports = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline.segmenter."):
                names.add(node.module.rsplit(".", 1)[1])
        imports[path.stem] = names
    for a, names in imports.items():
        for b in names:
            assert a not in imports.get(b, ()), f"pipeline/segmenter/{a}.py and {b}.py import each other"


def test_predict_image_of_arrays_post_processes_each_alpha_once():
    from pipeline.errors import PipelineError
    from pipeline.sam.quasi_superpixels import QuasiSuperpixels
    from pipeline.segmenter.predict import predict_image, prediction_confusions

    net = build_segmenter("tiny", 3, seed=0).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    probs = predict_probs(net, image, (1.0,), False)
    plain = predict_image(net, image, (1.0,), False)
    np.testing.assert_array_equal(plain.raw, probs.argmax(0).numpy().astype(np.uint8))
    assert plain.postprocessed == {} and not plain.no_masks
    np.testing.assert_array_equal(plain.labels(3.0), plain.raw)
    n = 4
    masks = QuasiSuperpixels(
        masks=rng.random((n, 24, 40)) < 0.4, levels=np.array([0, 1, 2, 2], np.uint8),
        predicted_iou=np.ones(n, np.float32), stability_score=np.ones(n, np.float32),
        bbox_xywh=np.zeros((n, 4), np.int64), point_coords=np.zeros((n, 2)), crop_box_xywh=np.zeros((n, 4), np.int64))
    post = predict_image(net, image, (1.0,), False, masks=masks, alphas=[3.0, 1.0, 3.0])
    assert list(post.postprocessed) == [3.0, 1.0]
    for a, labels in post.postprocessed.items():
        np.testing.assert_array_equal(labels, sams_postprocess(probs, masks.masks, masks.levels, a))
    gt = rng.integers(0, 3, (24, 40)).astype(np.uint8)
    conf = prediction_confusions(post, gt)
    assert conf["raw"].sum() == conf["post"][1.0].sum() == 24 * 40 and conf["no_masks"] is False
    with pytest.raises(PipelineError, match=r"image x: SAM masks are \(24, 40\), image is \(24, 20\)"):
        predict_image(net, image[:, :20], masks=masks, image_id="x")
