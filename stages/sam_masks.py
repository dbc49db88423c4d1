"""Stage ``sam_masks``: images -> ``cache/sam_masks.zarr``, quasi-superpixels per image (§1).

Every usable image of the train and eval splits gets one store group. The store's fingerprint
covers the ``sam`` params (but ``sam.max_batch_memory_mb``, which never changes a result),
``compute.precision``, the checkpoint's checksum and the mask code: a change resets the store, a
rerun with the same ones resumes and computes only the images not yet stored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import click

from pipeline.config import param, to_dict
from pipeline.metrics import quasi_superpixel_stats
from pipeline.data.datasets import DatasetError, load_split
from pipeline.data.imageio import ImageReadError, read_rgb
from pipeline.sam.models import SPECS, build_sam_predictor, sam_provenance, verify_checkpoint
from pipeline.store import ImageStore, finish, write_group
from pipeline.weights import CheckpointError
from stages.common import (
    INDEX_OPTION, PARAMS_OPTION, ComputeConfig, StageError, WorkerResource, code_digest,
    fingerprint, load_params, package_version, run_per_image, section, torch_device,
    write_json_atomic,
)
from stages.prepare import DatasetConfig

log = logging.getLogger("wsss.sam_masks")
STAGE = "sam_masks"

# Params that choose the model rather than configure the generator.
_MODEL_KEYS = ("model", "checkpoint", "checkpoint_sha256", "mask_threshold")
# Params that change how the work is done but never its result (like compute.*): left out of the
# store fingerprint and of the stage's params in dvc.yaml.
RESULT_NEUTRAL_KEYS = ("max_batch_memory_mb",)

# Modules whose code decides the masks (the code deps of this stage in dvc.yaml). When they change,
# DVC reruns the stage, and the store must then recompute instead of resuming with old masks.
CODE_MODULES = ("pipeline.sam.quasi_superpixels", "pipeline.sam.point_decoder",
                "pipeline.sam.models", "pipeline.precision", "pipeline.data.imageio")


@dataclass(frozen=True)
class SamConfig:
    """Section ``sam`` of params.yaml (algorithms.md §1); generator settings map 1:1."""

    model: str = "vit_h"
    """vit_h | vit_l | vit_b | tiny (random weights, offline demo)."""
    checkpoint: str | None = None
    """Path of the official checkpoint (ignored by tiny)."""
    checkpoint_sha256: str | None = None
    """Expected SHA-256; None: the published checksum of the official file."""
    points_per_side: int = param(32, ge=1)
    points_per_batch: int = param(256, ge=1)
    pred_iou_thresh: float = param(0.86, ge=0)
    stability_score_thresh: float = param(0.92, ge=0, le=1)
    stability_score_offset: float = param(1.0, ge=0)
    mask_threshold: float = 0.0
    """Logit threshold that binarises SAM's masks."""
    box_nms_thresh: float = param(0.7, gt=0, le=1)
    crop_n_layers: int = param(1, ge=0)
    crop_nms_thresh: float = param(0.7, gt=0, le=1)
    crop_overlap_ratio: float = param(512 / 1500, ge=0, lt=1)
    crop_n_points_downscale_factor: int = param(2, ge=1)
    min_mask_region_area: int = param(100, ge=0)
    score_thresh_offset: tuple[float, float, float] = (0.0, 0.0, 0.1)
    score_nms_offset: tuple[float, float, float] = (0.0, 0.0, 1.0)
    stability_score_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    occupation_thresh: float = param(0.3, ge=0, le=1)
    max_batch_memory_mb: int = param(1024, ge=1)
    """Working memory (MiB) of one prompt batch through SAM's mask decoder: the batch is the
    largest that fits, at most points_per_batch. Results do not depend on it (not in the store
    fingerprint, not a DVC param of the stage); peak memory and speed do."""

    def __post_init__(self):
        if self.model not in SPECS:
            raise StageError(
                f"params.yaml: sam.model must be one of {', '.join(SPECS)}, got {self.model!r}"
            )

    def generator_settings(self) -> dict:
        return {k: v for k, v in to_dict(self).items() if k not in _MODEL_KEYS}


class Item(NamedTuple):
    image_id: str
    image: str
    store: str


def _build_generator(model, checkpoint, checkpoint_sha256, mask_threshold, device, precision,
                     **settings):
    """One generator per process (WorkerResource factory: module-level, plain-data kwargs)."""
    from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator

    predictor = build_sam_predictor(
        model, checkpoint, checkpoint_sha256, torch_device(device), mask_threshold
    )
    return QuasiSuperpixelGenerator(predictor, precision=precision, **settings)


def masks_for_image(generator, item: Item) -> str:
    """Quasi-superpixels of one image, written as its store group. Returns the image id."""
    try:
        image = read_rgb(item.image)
    except ImageReadError as exc:
        raise StageError(f"image {item.image_id} ({item.image}): {exc}") from exc
    h, w = image.shape[:2]
    write_masks(item.store, item.image_id, generator.generate(image), h, w)
    return item.image_id


def write_masks(store: str, image_id: str, qs, height: int, width: int) -> None:
    """One image's group of the ``sam_masks`` store (its layout: CONTRACT.md)."""
    write_group(store, image_id, qs.to_arrays(), attrs={"height": height, "width": width})


def store_attrs(cfg: SamConfig, precision: str) -> dict:
    """Store provenance; the fingerprint covers everything the masks depend on."""
    provenance = sam_provenance(cfg.model, cfg.checkpoint, cfg.checkpoint_sha256)
    # The checkpoint's location is not part of the result (teammates sharing the store through a
    # DVC remote keep weights in different places); its checksum is.
    depends = {k: v for k, v in to_dict(cfg).items()
               if k not in ("checkpoint", "checkpoint_sha256") + RESULT_NEUTRAL_KEYS}
    code = code_digest(*CODE_MODULES)
    return {
        "stage": STAGE,
        "sam": to_dict(cfg),
        "precision": precision,
        "model": cfg.model,
        "checkpoint_sha256": provenance["sha256"],
        "untrained": provenance["untrained"],
        "package_version": package_version(),
        "code": code,
        "fingerprint": fingerprint(depends, provenance["sha256"], code, precision),
    }


def _items(index_dir: str, dataset: DatasetConfig, store: str) -> list[Item]:
    items: dict[str, Item] = {}
    for split in (dataset.train_split, dataset.eval_split):
        try:
            records = load_split(index_dir, split).good()
        except DatasetError as exc:
            raise StageError(str(exc)) from exc
        for r in records:
            items.setdefault(r.id, Item(r.id, r.image, store))
    return list(items.values())


@click.command("sam-masks")
@PARAMS_OPTION
@INDEX_OPTION
@click.option("--out", default="cache/sam_masks.zarr", show_default=True,
              type=click.Path(file_okay=False), help="Quasi-superpixel store to (re)fill.")
@click.option("--metrics", "metrics_path", default=None, type=click.Path(dir_okay=False),
              help="Metrics JSON: masks per image, per level, images with all three levels.")
def command(params_path: str, index_dir: str, out: str, metrics_path: str | None) -> None:
    """Quasi-superpixels (SAM masks by level) for every image of the train and eval splits."""
    params = load_params(params_path)
    cfg = section(params, "sam", SamConfig)
    dataset = section(params, "dataset", DatasetConfig)
    compute = section(params, "compute", ComputeConfig)
    try:
        verify_checkpoint(cfg.model, cfg.checkpoint, cfg.checkpoint_sha256)
    except CheckpointError as exc:
        raise StageError(str(exc)) from exc
    torch_device(compute.device)  # an unusable device fails here, not in every worker
    items = _items(index_dir, dataset, str(Path(out)))
    store = ImageStore.open_for_writing(out, store_attrs(cfg, compute.precision))
    todo = [it for it in items if it.image_id not in store]
    resource = WorkerResource.of(
        _build_generator, model=cfg.model, checkpoint=cfg.checkpoint,
        checkpoint_sha256=cfg.checkpoint_sha256, mask_threshold=cfg.mask_threshold,
        device=compute.device, precision=compute.precision, **cfg.generator_settings(),
    )
    run_per_image(masks_for_image, todo, compute, resource, desc="sam masks")
    finish(out)
    if metrics_path:
        stats = quasi_superpixel_stats([store.read(it.image_id, ("levels",))["levels"] for it in items])
        write_json_atomic(Path(metrics_path), {**stats, "model": cfg.model,
                                               "untrained": store.attrs["untrained"]})
        log.info("sam_masks: %.1f quasi-superpixels per image, all three levels in %.0f%% of images",
                 stats.get("masks_per_image", 0), 100 * stats.get("three_level_fraction", 0))
    log.info("sam_masks: %d images computed, %d already in the store (resumed), %d in %s",
             len(todo), len(items) - len(todo), len(items), out)
