"""Hand-computed cases and guards of L_MCL and L_CAL (the golden tests pin the typical batches)."""
import math

import pytest
import torch

from pipeline.prompts.losses import cam_activation_loss, multilabel_contrastive_loss, positive_pairs


def test_mcl_hand_computed_and_invalid_images_excluded():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.1, 0.2], [4.0, 4.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0]])  # rows 1 and 2 are not valid
    neg = math.exp(2.0)
    expected = (-(1.0 - math.log(math.exp(1.0) + neg)) - (3.0 - math.log(math.exp(3.0) + neg))) / 2
    assert multilabel_contrastive_loss(logits, labels).item() == pytest.approx(expected, rel=1e-12)


def test_mcl_no_valid_image_is_zero_with_gradient():
    logits = torch.randn(2, 4, requires_grad=True)
    loss = multilabel_contrastive_loss(logits, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 4))


def test_cal_hand_computed_other_classes_are_background_and_255_ignored():
    # same size as the seed map, so the bilinear upsampling is the identity
    cams = torch.tensor([[[1.0, -1.0], [0.5, 2.0]],
                         [[3.0, -0.5], [-2.0, 1.0]]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 1]])
    seed = torch.tensor([[[1, 2], [255, 0]]], dtype=torch.uint8)
    loss_fg, loss_bg = cam_activation_loss(cams, labels, seed)
    # class 0: fg {(0,0)}, bg {(0,1),(1,1)}; class 1: fg {(0,1)} with peak max(0, -0.5) = 0
    assert loss_fg.item() == pytest.approx(0.5 / 6, rel=1e-12)
    assert loss_bg.item() == pytest.approx((0 + 2 + 3 + 1) / 6, rel=1e-12)
    (grad,) = torch.autograd.grad(loss_fg + loss_bg, cams)
    expected = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, -1.0], [0.0, 1.0]]], dtype=torch.float64) / 6
    torch.testing.assert_close(grad, expected)


def test_cal_peak_is_detached():
    cams = torch.tensor([[[3.0, 1.0], [2.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    seed = torch.full((1, 2, 2), 1, dtype=torch.uint8)
    loss_fg, loss_bg = cam_activation_loss(cams, torch.tensor([[1]]), seed)
    assert loss_fg.item() == pytest.approx((0 + 2 + 1 + 3) / 4) and loss_bg.item() == 0.0
    (grad,) = torch.autograd.grad(loss_fg, cams)
    # a peak that followed the CAM would get +3/4 here; detached it gets nothing
    torch.testing.assert_close(grad, torch.tensor([[[0.0, -1.0], [-1.0, -1.0]]], dtype=torch.float64) / 4)


def test_cal_no_present_class_is_zero_with_graph():
    cams = torch.zeros((0, 14, 14), requires_grad=True)
    seed = torch.zeros((2, 224, 224), dtype=torch.uint8)
    loss_fg, loss_bg = cam_activation_loss(cams, torch.zeros((2, 20)), seed)
    assert loss_fg.item() == 0.0 and loss_bg.item() == 0.0
    assert loss_fg.grad_fn is not None
    (loss_fg + loss_bg).backward()
    assert cams.grad.shape == (0, 14, 14)


def test_cal_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 CAMs for 3 positive labels"):
        cam_activation_loss(torch.zeros(2, 14, 14), torch.tensor([[1, 1, 1]]), torch.zeros((1, 224, 224)))


def test_positive_pairs_row_major():
    image_idx, class_idx = positive_pairs(torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0]]))
    assert image_idx.tolist() == [0, 0, 2] and class_idx.tolist() == [1, 2, 0]
