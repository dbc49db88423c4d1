"""Training the final segmenter on seeds (algorithms.md §9): augmentation, batches, SGD + poly.

The recipe is DeepLabV3+'s: SGD (lr 0.01, momentum 0.9, weight decay 5e-4) with the poly schedule
``lr = base * (1 - step / total) ** 0.9``, random scale 0.5-2.0, 512 x 512 random crop, horizontal
flip, cross-entropy ignoring 255. Seeds contain no 255; the padding of crops larger than the
scaled image does.

Memory: one iteration's batch can run as ``sub_batches`` forward/backward passes whose gradients
add up before the single optimizer step (gradient accumulation inside the iteration). The loss
is weighted by labelled pixels, so the gradient is the full batch's, with one exception:
BatchNorm normalises each sub-batch with that sub-batch's statistics (and updates its running
statistics once per sub-batch), so results are close to, not equal to, the undivided batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.precision import autocast
from pipeline.segmenter.inputs import IMAGENET_MEAN, to_input
from pipeline.segmenter.model import IGNORE_INDEX, forward_padded

#: Image padding colour: the normalisation mean, so padded pixels are 0 after :func:`to_input`.
PAD_RGB = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)


@dataclass(frozen=True)
class SegmentationAugment:
    """Random scale, pad, random crop and horizontal flip of an (image, label) pair."""

    crop_size: int = 512
    """Side of the square training crop (§9: 512)."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Range of the uniform random resize factor (§9: 0.5-2.0)."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip."""
    ignore_index: int = IGNORE_INDEX
    """Label of padded pixels, ignored by the loss."""

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(crop, crop, 3) uint8 image and (crop, crop) uint8 label; draws only from ``rng``."""
        H, W = label.shape
        s = rng.uniform(*self.scale_range)
        h, w = max(1, round(H * s)), max(1, round(W * s))
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
        c = self.crop_size
        ph, pw = max(0, c - h), max(0, c - w)
        if ph or pw:
            image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=PAD_RGB)
            label = cv2.copyMakeBorder(
                label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=self.ignore_index
            )
        y0 = int(rng.integers(0, image.shape[0] - c + 1))
        x0 = int(rng.integers(0, image.shape[1] - c + 1))
        image, label = image[y0 : y0 + c, x0 : x0 + c], label[y0 : y0 + c, x0 : x0 + c]
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


def collate(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-size (image, label) pairs -> normalised (B, 3, h, w) float32 and (B, h, w) int64."""
    images = np.stack([p[0] for p in pairs])
    labels = np.stack([p[1] for p in pairs])
    return to_input(images), torch.from_numpy(labels.astype(np.int64))


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """Poly schedule ``base * (1 - step / total) ** power`` (DeepLab; §9 power 0.9)."""
    return base_lr * (1.0 - min(step, total_steps) / max(total_steps, 1)) ** power


def build_optimizer(
    net: torch.nn.Module, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """SGD over all parameters with the §9 hyper-parameters (lr 0.01, momentum 0.9, wd 5e-4)."""
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    sub_batches: int = 1,
    precision: str = "fp32",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """One SGD step at learning rate ``lr`` on a batch; returns its mean cross-entropy as a
    0-dim float64 tensor on the network's device, without waiting for it (no host sync: read
    it with ``float()`` or ``.tolist()`` when it is needed, e.g. once per logging interval).

    Args:
        images, labels: the batch on the CPU (pinned memory lets the copies overlap the
            previous step's work) or already on the device.
        sub_batches: run the batch as this many consecutive forward/backward passes (split along
            the batch axis, sizes differing by at most one) and step once: the effective batch
            is unchanged, activation memory shrinks by about this factor, BatchNorm sees only
            the sub-batch (see the module docstring).
        precision: ``fp32`` or ``bf16``: autocast of the forward pass; the loss is fp32.
        ignore_index: label the loss skips (padding and dataset ignore bands).

    The loss is the sum over labelled pixels divided by the batch's labelled pixel count, so
    sub-batches are weighted by their labelled pixels, as in one undivided pass. A batch whose
    pixels are all ignored gives no update (loss 0) instead of NaN. The labelled pixels are
    counted on ``labels`` where they are, so CPU labels cost no device sync. The sub-batch losses
    add up in float64, as Python floats did.
    """
    if not 1 <= sub_batches <= len(images):
        raise ValueError(f"sub_batches must be in [1, batch size {len(images)}], got {sub_batches}")
    device = next(net.parameters()).device
    n_valid = int((labels != ignore_index).sum())
    if n_valid == 0:
        return torch.zeros((), dtype=torch.float64, device=device)
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    for group in optimizer.param_groups:
        group["lr"] = lr
    net.train()
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in zip(torch.tensor_split(images, sub_batches), torch.tensor_split(labels, sub_batches)):
        with autocast(device, precision):
            logits = forward_padded(net, x)
        loss = F.cross_entropy(logits.float(), y, ignore_index=ignore_index, reduction="sum") / n_valid
        loss.backward()
        total += loss.detach().double()
    optimizer.step()
    return total
