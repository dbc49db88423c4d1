"""Softmax-GradCAM: batched copies equal per-class backward passes; training graph; masking."""
import math

import pytest
import torch
from torch import nn

from pipeline.cams.gradcam import gradcam_copies, masked_softmax, present_pairs, softmax_gradcam

D, H, W, C, NBG = 16, 3, 4, 5, 3
G = C + NBG


class Tail(nn.Module):
    """A stand-in for "the rest of CLIP" after ln_1: attention + MLP, pool, project, text logits."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.proj = nn.Linear(D, D, bias=False)
        self.text = nn.Parameter(torch.randn(G, D))  # plays the role of the prompt-side features

    def forward(self, a):
        # need_weights=True takes the math attention path: the fused CPU SDPA kernel has no
        # double backward, which create_graph=True needs (the real CLIP block must avoid it too)
        x = a + self.attn(a, a, a, need_weights=True)[0]
        x = x + self.mlp(x)
        f = nn.functional.normalize(self.proj(x[:, 1:].mean(dim=1)), dim=-1)
        return 10.0 * f @ nn.functional.normalize(self.text, dim=-1).T


@pytest.fixture
def tail():
    torch.manual_seed(0)
    return Tail().double()


def test_batched_equals_per_class_loop(tail):
    torch.manual_seed(1)
    base = torch.randn(3, 1 + H * W, D, dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0]])
    image_idx, target, mask = gradcam_copies(labels, NBG)
    assert image_idx.tolist() == [0, 0, 0, 1, 2, 2]
    assert target.tolist() == [0, 2, 4, 1, 2, 3]
    acts = base[image_idx].clone().requires_grad_()
    cams = softmax_gradcam(acts, tail(acts), target, mask.double(), (H, W))
    assert cams.shape == (6, H, W) and not cams.requires_grad

    for b, (n, c) in enumerate(zip(image_idx.tolist(), target.tolist())):
        a = base[n : n + 1].clone().requires_grad_()
        m = torch.cat([labels[n].double(), torch.ones(NBG, dtype=torch.float64)])[None]
        p = masked_softmax(tail(a), m)[0, c]
        (g,) = torch.autograd.grad(p, a)
        expected = (base[n, 1:] @ g[0, 1:].mean(dim=0)).reshape(H, W)
        torch.testing.assert_close(cams[b], expected, rtol=1e-6, atol=1e-9)
    # copies of one image for different classes must differ (each got its own gradient)
    assert not torch.allclose(cams[0], cams[1])


def test_create_graph_reaches_text_side(tail):
    torch.manual_seed(2)
    labels = torch.tensor([[1, 1, 0, 0, 0]])
    image_idx, target, mask = gradcam_copies(labels, NBG)
    acts = torch.randn(1, 1 + H * W, D, dtype=torch.float64)[image_idx].requires_grad_()
    cams = softmax_gradcam(acts, tail(acts), target, mask.double(), (H, W), create_graph=True)
    assert cams.requires_grad
    cams.sum().backward()
    # the text features only touch the logits, so a non-zero gradient proves the double backward
    assert tail.text.grad is not None and tail.text.grad.abs().sum() > 0


def test_masked_softmax_ignores_absent_classes():
    logits = torch.tensor([[2.0, 5.0, 1.0, 0.5], [0.0, -1.0, 3.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    p = masked_softmax(logits, mask)
    assert p[0, 1] == 0 and p[1, 0] == 0 and p[1, 2] == 0
    # the max runs over all prompts, masked ones included (row 0: 5.0 is absent)
    e = [math.exp(2.0 - 5.0), math.exp(1.0 - 5.0), math.exp(0.5 - 5.0)]
    assert p[0, 0].item() == pytest.approx(e[0] / (sum(e) + 1e-5), rel=1e-12)
    assert p[0, 3].item() == pytest.approx(e[2] / (sum(e) + 1e-5), rel=1e-12)
    # changing an absent, non-max logit changes nothing
    moved = logits.clone()
    moved[1, 0] = 2.5
    assert torch.equal(masked_softmax(moved, mask), p)


def test_present_pairs_order():
    assert present_pairs([[4, 1], [], [0, 0, 3]]) == [(0, 1), (0, 4), (2, 0), (2, 3)]


def test_token_grid_mismatch_is_an_error(tail):
    acts = torch.randn(1, 1 + H * W, D, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="tokens"):
        softmax_gradcam(acts, tail(acts), torch.tensor([0]), torch.ones(1, G), (H + 1, W))
