"""Quasi-superpixel generators by ``sam.model`` name (as segment-anything's ``build_sam`` registry).

A SAM network (the official variants, ``tiny``) is the core's generator; other generators register
with :func:`register_generator` (the demo's SAM and its world oracle do, from
``pipeline/demo/registry.py``). An entry is plain data and ``"package.module:callable"`` strings,
resolved when a masker is built (:mod:`pipeline.sam.maskers`): ``pipeline.params`` validates
``sam.model`` against :func:`generator_names`, which must not import torch or any generator.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.registry import Registry


@dataclass(frozen=True)
class SamGenerator:
    """How one ``sam.model`` makes the quasi-superpixels of an image, and what its store records."""

    masker: str
    """``"package.module:callable"``: ``(model, checkpoint, checkpoint_sha256, mask_threshold,
    device, precision, world_seed, **generator_settings) -> masker``, where ``masker(image_id,
    image)`` returns the image's :class:`~pipeline.sam.quasi_superpixels.QuasiSuperpixels`. Built
    once per process (plain-data arguments: it travels to dask workers)."""
    provenance: str
    """``"package.module:callable"``: ``(model, checkpoint, checkpoint_sha256) -> dict`` with
    ``sha256`` (in the store's fingerprint) and ``untrained``."""
    verify: str | None = None
    """``"package.module:callable"``: ``(model, checkpoint, checkpoint_sha256)``, raising when the
    weights are missing or wrong (run before any work starts); None: it loads no weights."""
    code_modules: tuple[str, ...] = ()
    """Modules beyond the core SAM code whose code decides its masks (in the store's fingerprint)."""
    oracle: bool = False
    """A stand-in that answers with known masks, not a model: stores and metrics say
    ``sam_oracle: true``."""
    world_seed: bool = False
    """Its masks depend on ``dataset.demo.seed`` (fingerprinted, and passed to the masker)."""
    dataset: str | None = None
    """The only ``dataset.name`` it can segment (None: any)."""
    role: str = ""
    """What it is, for the error on another dataset (``sam.model X is <role>; it needs ...``)."""


SAM_NETWORK = SamGenerator(
    masker="pipeline.sam.maskers:sam_masker",
    provenance="pipeline.sam.models:sam_provenance",
    verify="pipeline.sam.models:verify_checkpoint",
)
"""A SAM network of :mod:`pipeline.sam.specs` under SAM's automatic mask generator policy
(:class:`~pipeline.sam.quasi_superpixels.QuasiSuperpixelGenerator`)."""

GENERATORS: Registry[SamGenerator] = Registry(
    "sam.model", {name: SAM_NETWORK for name in ("vit_h", "vit_l", "vit_b", "tiny")})
"""``sam.model`` -> :class:`SamGenerator`."""


def register_generator(name: str, generator: SamGenerator) -> None:
    """Make ``name`` a valid ``sam.model``."""
    GENERATORS.register(name, generator)


def generator_names() -> tuple[str, ...]:
    """Every valid ``sam.model``, in registration order (the core's first)."""
    return GENERATORS.names()


def sam_generator(name: str) -> SamGenerator:
    return GENERATORS[name]
