"""L_CAL reproduces the authors' losses and their gradient w.r.t. the CAMs on every cal_*.npz."""
import numpy as np
import pytest
import torch

from conftest import golden_params
from pipeline.prompts.losses import cam_activation_loss


@pytest.mark.parametrize("path", golden_params("cal"))
def test_golden_cal(path):
    data = np.load(path)
    cams = torch.from_numpy(data["cams"]).requires_grad_()
    loss_fg, loss_bg = cam_activation_loss(
        cams, torch.from_numpy(data["labels"]), torch.from_numpy(data["seed_map"]))
    np.testing.assert_allclose(loss_fg.item(), float(data["loss_fg"]), rtol=1e-5, atol=0)
    np.testing.assert_allclose(loss_bg.item(), float(data["loss_bg"]), rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(loss_fg + loss_bg, cams)
    expected = data["grad"]
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
