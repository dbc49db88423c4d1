"""Softmax-GradCAM (algorithms.md §3), batched over (image, present class) copies.

The caller stacks one copy of an image's activations per present class (B copies in all), runs
the rest of the network on the stack, and calls :func:`softmax_gradcam` once: because the copies
do not interact, a single ``autograd.grad`` of ``Σ_b p[b, target_b]`` gives every copy the
gradient of its own class. With ``create_graph=True`` the CAMs stay differentiable w.r.t. whatever
produced the logits (the prompts), which is how L_CAL trains segmentation prompts.
"""
from __future__ import annotations

from typing import Sequence

import torch

SOFTMAX_EPS = 1e-5
"""Added to the masked softmax denominator (the reference's value)."""


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, eps: float = SOFTMAX_EPS) -> torch.Tensor:
    """``p_c = exp(Y_c − max Y)·m_c / (Σ_j exp(Y_j − max Y)·m_j + eps)`` over the last axis.

    ``logits`` (B, G) and ``mask`` (B, G) (1 for the image's foreground labels and for every
    background prompt, 0 for absent classes). The max is taken over all G prompts, masked or
    not, as in the reference; absent classes get probability exactly 0.
    """
    shifted = torch.exp(logits - logits.amax(dim=-1, keepdim=True)) * mask.to(logits.dtype)
    return shifted / (shifted.sum(dim=-1, keepdim=True) + eps)


def softmax_gradcam(
    acts: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
    grid_hw: tuple[int, int], create_graph: bool = False, eps: float = SOFTMAX_EPS,
) -> torch.Tensor:
    """Raw Softmax-GradCAMs (B, h, w) of ``B`` independent copies, no ReLU, no normalisation.

    ``acts`` (B, L, D): the activation A of each copy (ln_1 output of the last block, token 0 the
    class token, L = 1 + h·w), part of the graph that produced ``logits`` (B, G). ``target`` (B,)
    the prompt index whose probability is explained in each copy; ``mask`` (B, G) the
    :func:`masked_softmax` mask. Weights are the gradient averaged over patch tokens
    (:func:`gradcam_weights`); ``cam[b, l] = Σ_d A.detach()[b, l, d]·w[b, d]``. ``create_graph``
    keeps the CAMs differentiable through the weights (training); without it they are detached.
    """
    _check_grid(acts, grid_hw)
    weights = gradcam_weights(acts, logits, target, mask, create_graph, eps)
    return cams_from_weights(acts, weights, grid_hw)


def gradcam_weights(
    acts: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
    create_graph: bool = False, eps: float = SOFTMAX_EPS,
) -> torch.Tensor:
    """Grad-CAM channel weights (B, D): ``∂p[b, target_b]/∂A[b]`` averaged over patch tokens."""
    if acts.shape[0] == 0:
        return acts.new_zeros((0, acts.shape[-1]))
    probs = masked_softmax(logits, mask, eps)
    picked = probs.gather(1, target.long().to(probs.device)[:, None]).sum()
    (grads,) = torch.autograd.grad(picked, acts, create_graph=create_graph)
    return grads[:, 1:, :].mean(dim=1)


def cams_from_weights(acts: torch.Tensor, weights: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """``cam[b] = A.detach()[b, patches] @ w[b]`` reshaped to (B, h, w)."""
    _check_grid(acts, grid_hw)
    cams = torch.einsum("bld,bd->bl", acts.detach()[:, 1:, :], weights)
    return cams.reshape(acts.shape[0], *grid_hw)


def _check_grid(acts: torch.Tensor, grid_hw: tuple[int, int]) -> None:
    h, w = grid_hw
    if acts.shape[1] != 1 + h * w:
        raise ValueError(f"{acts.shape[1]} tokens do not make a class token plus a {h}x{w} grid")


def present_pairs(present: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Flat (image index, class) pairs: images in order, classes ascending within each image.

    This row-major order is the order of the CAMs that L_CAL expects.
    """
    return [(i, c) for i, classes in enumerate(present) for c in sorted({int(c) for c in classes})]


def gradcam_copies(labels: torch.Tensor, n_background: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy layout for a batch with multi-hot ``labels`` (N, C) over C foreground prompts.

    Returns ``image_idx`` (B,) (which image each copy comes from, for ``acts[image_idx]``),
    ``target`` (B,) the class of each copy (row-major, see :func:`present_pairs`) and ``mask``
    (B, C + n_background): the copy's image labels followed by ones for the background prompts.
    """
    image_idx, target = torch.nonzero(labels.to(torch.bool), as_tuple=True)
    fg = labels.to(torch.float32)[image_idx]
    bg = torch.ones((image_idx.numel(), n_background), dtype=torch.float32, device=fg.device)
    return image_idx, target, torch.cat([fg, bg], dim=1)
