"""Segmenter architectures by name: the registry ``segmenter.model`` chooses from.

Like open_clip's model configs, an architecture is plain data (encoder, decoder width, whether it
needs pretrained encoder weights, its family); :func:`pipeline.segmenter.model.build_segmenter`
builds it, and the weights are resolved separately. The core registers the paper's model and the
tiny one; others register with :func:`register_arch` (the demo's CLIP-ViT segmenter does, from
``pipeline/demo/registry.py``). No torch here: :mod:`pipeline.params` checks ``segmenter.model``
and ``segmenter.output_stride`` against this registry without importing a network.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError
from pipeline.registry import Registry

#: Output strides DeepLabV3+ supports; §9 (``d3p-r1d8``): 8. At 8, smp's default ASPP rates
#: (12, 24, 36) are the DeepLabV3+ paper's rates for that stride.
OUTPUT_STRIDES = (8, 16)
REFERENCE_OUTPUT_STRIDE = 8


@dataclass(frozen=True)
class SegmenterArch:
    """A named segmenter configuration: DeepLabV3+ (segmentation_models_pytorch) or a CLIP-ViT
    network (:mod:`pipeline.segmenter.clip_vit`)."""

    encoder_name: str
    """smp encoder name (torchvision ResNet layout, so ImageNet state dicts load directly), or
    the open_clip model whose vision tower is the encoder (``family`` clip_vit)."""
    decoder_channels: int
    """Channels of the ASPP/decoder convolutions (DeepLabV3+: 256; clip_vit: its head's)."""
    needs_encoder_weights: bool
    """True when the model is meaningless without its pretrained encoder weights."""
    family: str = "deeplabv3plus"
    """deeplabv3plus (output stride 8 or 16) or clip_vit (a ViT: output stride 16 only)."""
    weights_source: str = (
        "torchvision's ImageNet-1k ResNet-101 weights (https://download.pytorch.org/models/"
        "resnet101-63fe2227.pth) or any torchvision-layout ResNet-101 state dict"
    )
    """What ``segmenter.encoder_weights`` should be, for error messages."""

    @property
    def output_strides(self) -> tuple[int, ...]:
        return OUTPUT_STRIDES if self.family == "deeplabv3plus" else (16,)


ARCHS: dict[str, SegmenterArch] = {
    # Paper: DeepLabV3+ ResNet-101 (ImageNet-1k).
    "deeplabv3plus_r101": SegmenterArch("resnet101", 256, True),
    # The same network family, small enough to train on two CPU cores (random init).
    "tiny": SegmenterArch("resnet18", 32, False),
}
"""The core's architectures; :func:`registered_archs` adds the registered ones."""

ENCODER_WEIGHTS_SOURCE = ARCHS["deeplabv3plus_r101"].weights_source


_REGISTRY: Registry[SegmenterArch] = Registry("segmenter model", ARCHS, error=ConfigError, sort_known=True)


def register_arch(name: str, arch: SegmenterArch) -> None:
    """Make ``arch`` buildable as ``segmenter.model: <name>``."""
    _REGISTRY.register(name, arch)


def registered_archs() -> dict[str, SegmenterArch]:
    """Every architecture by name, the registered ones included."""
    return _REGISTRY.all()


def get_arch(model: str) -> SegmenterArch:
    """The architecture named ``model``; an unknown name is an error listing the known ones."""
    return _REGISTRY[model]
