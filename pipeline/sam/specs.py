"""SAM architectures by name: the arguments of segment-anything's ``_build_sam``, apart from weights.

As open_clip keeps its model configs apart from ``pretrained.py``: this module says how a SAM
variant is shaped, :mod:`pipeline.sam.pretrained` which weight files exist for it, and
:func:`pipeline.sam.models.build_sam` assembles any of them with the same code. The official
variants and the random ``tiny`` are the core's; the demo registers its own from
``pipeline/demo/registry.py``. Plain data only (no torch): registries and ``pipeline.params``
import it.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError
from pipeline.registry import Registry


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM variant (the arguments of segment-anything's ``_build_sam``)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    image_encoder: str = "sam_vit"
    """``sam_vit``: segment-anything's ``ImageEncoderViT`` (SAM's pixel normalisation);
    ``clip_vit``: :class:`pipeline.sam.clip_encoder.ClipViTEncoder`, an open_clip-shaped ViT
    (CLIP's pixel normalisation) that can start from a trained CLIP's vision tower."""


_CORE_SPECS: dict[str, SamSpec] = {
    # The three official variants: sizes as in segment_anything/build_sam.py.
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11)),
    # Embedded default: two CPU cores must run the whole demo DAG in minutes, so the encoder sees
    # 256 px (SamPredictor resizes the long side to the encoder's img_size) on a 16x16 token grid
    # with 32-dim features. Random weights: its masks are meaningless but every step runs.
    "tiny": SamSpec(32, 2, 2, (1,), image_size=256, window_size=4, prompt_embed_dim=32,
                    decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32),
}


SPECS: Registry[SamSpec] = Registry("SAM model", _CORE_SPECS, error=ConfigError)
"""SAM architecture name -> :class:`SamSpec`."""


def register_spec(name: str, spec: SamSpec) -> None:
    """Make ``name`` a SAM architecture (weights, if any: :func:`pipeline.sam.pretrained.register_pretrained`)."""
    SPECS.register(name, spec)


def spec_names() -> tuple[str, ...]:
    return SPECS.names()


def sam_spec(model: str) -> SamSpec:
    """The architecture named ``model``; a ValueError (ConfigError) naming the known ones."""
    return SPECS[model]
