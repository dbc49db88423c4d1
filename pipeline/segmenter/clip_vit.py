"""The demo segmenter: the demo CLIP's vision tower with a small convolutional head.

§9's segmenter starts from an ImageNet-pretrained encoder. The procedural world has no ImageNet;
its pretrained encoder is the demo CLIP's vision transformer (6 blocks of width 128, patch 16),
trained on the world's own images (``wsss demo-models``). This network is that trunk
(:class:`pipeline.sam.clip_encoder.ClipViTEncoder`, CLIP's parameter layout, the positional
embedding resized to each input's grid), SAM's neck as the head's convolutions, and a 1x1
classifier; the stride-16 logits are upsampled bilinearly to the input size.

With ``low_level_channels`` > 0 the head is DeepLabV3+'s decoder instead: a small convolutional
stem computes stride-4 features of the image (``low_level_channels`` of them; DeepLabV3+ takes 48
from ResNet's first stage, which a ViT does not have), the trunk's features are upsampled 4x and
concatenated with them, and a 3x3 convolution (BatchNorm, ReLU) precedes the classifier, whose
stride-4 logits are upsampled to the input size. A 16-pixel patch grid alone cannot draw
boundaries finer than its patches: on the demo world, ground truth itself pooled to stride 16 and
upsampled scores 78 val mIoU, at stride 4 over 90 (docs/demo.md). Inputs arrive
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
                 patch_size: int = 16, image_size: int = 224, channels: int = 64,
                 low_level_channels: int = 0):
        super().__init__()
        self.encoder = ClipViTEncoder(img_size=image_size, patch_size=patch_size, width=width,
                                      depth=depth, heads=heads, out_chans=channels)
        self.low_level = self.fuse = None
        if low_level_channels:
            half = max(1, low_level_channels // 2)
            self.low_level = nn.Sequential(
                nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, low_level_channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(low_level_channels), nn.ReLU(inplace=True))
            self.fuse = nn.Sequential(
                nn.Conv2d(channels + low_level_channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        # x_clip = x_imagenet * a + b, per channel
        a = torch.tensor(IMAGENET_STD) / torch.tensor(CLIP_STD)
        b = (torch.tensor(IMAGENET_MEAN) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        self.register_buffer("renorm_scale", a.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("renorm_shift", b.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = x * self.renorm_scale.to(x.dtype) + self.renorm_shift.to(x.dtype)
        features = self.encoder(x)
        if self.low_level is not None:
            low = self.low_level(x)
            features = F.interpolate(features, size=low.shape[-2:], mode="bilinear",
                                     align_corners=False)
            features = self.fuse(torch.cat([features, low], 1))
        logits = self.classifier(features)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
