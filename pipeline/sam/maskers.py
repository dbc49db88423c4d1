"""The per-image masker of a ``sam.model``: ``(image_id, image) -> QuasiSuperpixels``.

:func:`build_masker` looks the model up in :mod:`pipeline.sam.generators` and builds what its
entry names; a SAM network's masker (:func:`sam_masker`) is here, others live with their
registrant (the demo world's oracle: :mod:`pipeline.demo.sam_oracle`). The image id travels
with the image because a generator may need more than the pixels (the oracle re-renders the
image's world from it). :func:`masks_for_image` runs a masker on one image file and writes its
store group (the ``sam_masks`` stage's per-image task).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

from pipeline.data.imageio import ImageReadError, read_rgb
from pipeline.device import torch_device
from pipeline.errors import PipelineError
from pipeline.params import SamConfig
from pipeline.registry import resolve
from pipeline.sam.generators import sam_generator
from pipeline.sam.models import build_sam_predictor
from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator
from pipeline.schemas import write_masks


def build_generator(model, checkpoint, checkpoint_sha256, mask_threshold, device, precision,
                    **settings) -> QuasiSuperpixelGenerator:
    """The quasi-superpixel generator of SAM network ``model`` (:mod:`pipeline.sam.specs`)."""
    predictor = build_sam_predictor(
        model, checkpoint, checkpoint_sha256, torch_device(device), mask_threshold
    )
    return QuasiSuperpixelGenerator(predictor, precision=precision, **settings)


def sam_masker(model, checkpoint, checkpoint_sha256, mask_threshold, device, precision,
               world_seed=None, **settings):
    """A SAM network's masker (the entry :data:`pipeline.sam.generators.SAM_NETWORK`): the
    image alone decides its masks."""
    generator = build_generator(model, checkpoint, checkpoint_sha256, mask_threshold, device,
                                precision, **settings)
    return partial(_image_masks, generator)


def _image_masks(generator, image_id: str, image):
    return generator.generate(image)


def build_masker(model: str, **kwargs):
    """``(image_id, image) -> QuasiSuperpixels`` of ``sam.model`` ``model``, built once per
    process (a WorkerResource factory: module-level, plain-data kwargs: ``checkpoint``,
    ``checkpoint_sha256``, ``mask_threshold``, ``device``, ``precision``, ``world_seed`` and
    the generator settings)."""
    return resolve(sam_generator(model).masker)(model=model, **kwargs)


def verify_weights(cfg: SamConfig) -> None:
    """Fail before any work when the model's weights are missing or wrong (none: no check)."""
    verify = sam_generator(cfg.model).verify
    if verify is not None:
        resolve(verify)(cfg.model, cfg.checkpoint, cfg.checkpoint_sha256)


def masks_provenance(cfg: SamConfig) -> dict:
    """What produces the masks: at least ``sha256`` of the weights and ``untrained``."""
    return resolve(sam_generator(cfg.model).provenance)(cfg.model, cfg.checkpoint, cfg.checkpoint_sha256)


def sam_generator_for(cfg: SamConfig, device: str = "cpu", precision: str = "fp32") -> QuasiSuperpixelGenerator:
    """The quasi-superpixel generator of ``sam`` config ``cfg`` whose model is a SAM network
    (``generator.generate(image) -> QuasiSuperpixels``): the library's entry for one image."""
    return build_generator(cfg.model, cfg.checkpoint, cfg.checkpoint_sha256, cfg.mask_threshold,
                           device, precision, **cfg.generator_settings())


class MasksTask(NamedTuple):
    """One image's quasi-superpixel work (plain data, so it can travel to a worker)."""

    image_id: str
    image: str
    store: str
    inputs: str | None = None
    """Digest of the image's content (``pipeline.provenance.image_inputs``), recorded with its masks."""
    digest: str | None = None
    """The image file's content digest as the index recorded it (checked on the bytes read)."""
    fingerprint: str | None = None
    """The store fingerprint the masks are computed for (``pipeline.store.write_group``)."""


def masks_for_image(masker, task: MasksTask) -> str:
    """Quasi-superpixels of one image (``masker``: :func:`build_masker`'s), written as its store
    group. Returns the image id."""
    try:
        image = read_rgb(task.image, task.digest)
    except ImageReadError as exc:
        raise PipelineError(f"image {task.image_id} ({task.image}): {exc}") from exc
    h, w = image.shape[:2]
    write_masks(task.store, task.image_id, masker(task.image_id, image), h, w, task.inputs,
                task.fingerprint)
    return task.image_id
