"""What every segmenter takes: RGB images normalised with the ImageNet statistics.

One module for the normalisation, shared by DeepLabV3+ (:mod:`pipeline.segmenter.model`), the
CLIP-ViT segmenter (:mod:`pipeline.segmenter.clip_vit`, which re-normalises to CLIP's statistics)
and the augmentation's padding colour (:mod:`pipeline.segmenter.training`), so none of them
imports another for it.
"""
from __future__ import annotations

import numpy as np
import torch

#: Normalisation of the ImageNet-pretrained encoders (torchvision's statistics, RGB 0-1 scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) or (H, W, 3) uint8 RGB -> (B, 3, H, W) float32, ImageNet-normalised."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
