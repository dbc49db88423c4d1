"""The demo segmenter: the demo CLIP's vision tower with a small convolutional head.

§9's segmenter starts from an ImageNet-pretrained encoder. The procedural world has no ImageNet;
its pretrained encoder is the demo CLIP's vision transformer (6 blocks of width 128, patch 16),
trained on the world's own images (``wsss demo-models``). This network is that trunk
(:class:`pipeline.sam.clip_encoder.ClipViTEncoder`, CLIP's parameter layout, the positional
embedding resized to each input's grid), SAM's neck as the head's convolutions, and a 1x1
classifier; the stride-16 logits are upsampled bilinearly to the input size. Inputs arrive
ImageNet-normalised (:func:`pipeline.segmenter.inputs.to_input`, shared with DeepLabV3+) and are
re-normalised to CLIP's statistics inside :meth:`ClipViTSegmenter.forward`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.clip.model import CLIP_MEAN, CLIP_STD
from pipeline.sam.clip_encoder import ClipViTEncoder
from pipeline.segmenter.inputs import IMAGENET_MEAN, IMAGENET_STD


class ClipViTSegmenter(nn.Module):
    """Logits (B, num_classes, H, W) of ImageNet-normalised input (B, 3, H, W), H, W multiples of 16."""

    output_stride = 16

    def __init__(self, num_classes: int, width: int = 128, depth: int = 6, heads: int = 2,
                 patch_size: int = 16, image_size: int = 224, channels: int = 64):
        super().__init__()
        self.encoder = ClipViTEncoder(img_size=image_size, patch_size=patch_size, width=width,
                                      depth=depth, heads=heads, out_chans=channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        # x_clip = x_imagenet * a + b, per channel
        a = torch.tensor(IMAGENET_STD) / torch.tensor(CLIP_STD)
        b = (torch.tensor(IMAGENET_MEAN) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        self.register_buffer("renorm_scale", a.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("renorm_shift", b.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = x * self.renorm_scale.to(x.dtype) + self.renorm_shift.to(x.dtype)
        logits = self.classifier(self.encoder(x))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
