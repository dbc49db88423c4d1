"""L_MCL reproduces the authors' loss on every mcl_*.npz vector (float32, rtol 1e-5)."""
import numpy as np
import pytest
import torch

from conftest import golden_params
from pipeline.prompts.losses import multilabel_contrastive_loss


@pytest.mark.parametrize("path", golden_params("mcl"))
def test_golden_mcl(path):
    data = np.load(path)
    logits = torch.from_numpy(data["logits"]).requires_grad_()
    loss = multilabel_contrastive_loss(logits, torch.from_numpy(data["labels"]))
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.item(), float(data["loss"]), rtol=1e-5, atol=0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
