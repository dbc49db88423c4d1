"""Stage ``sam_masks``: images -> ``cache/sam_masks.zarr``, quasi-superpixels per image (§1).

Every usable image of the train and eval splits gets one store group. The store's fingerprint
covers the ``sam`` params (but ``sam.max_batch_memory_mb``, which never changes a result),
``compute.precision``, the checkpoint's checksum and the mask code: a change resets the store, a
rerun with the same ones resumes and computes only the images not yet stored.

``sam.model: world-oracle`` (demo world only) answers SAM's prompts with the world's own masks
(:mod:`pipeline.demo.sam_oracle`): each image is re-rendered from ``dataset.demo.seed`` and its id.
Its store and metrics say ``sam_oracle: true``.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import NamedTuple

import click

from pipeline.atomic import write_json_atomic
from pipeline.config import to_dict
from pipeline.data.datasets import DatasetError, load_split
from pipeline.data.imageio import ImageReadError, read_rgb
from pipeline.demo.sam_oracle import WORLD_ORACLE
from pipeline.device import torch_device
from pipeline.errors import PipelineError
from pipeline.metrics import quasi_superpixel_stats
from pipeline.params import ComputeConfig, DatasetConfig, SamConfig, section
from pipeline.provenance import code_digest, fingerprint, image_inputs, package_version
from pipeline.sam.models import (
    build_sam_predictor,
    sam_provenance,
    verify_checkpoint,
)
from pipeline.store import ImageStore, finish, with_inputs, write_group
from pipeline.weights import CheckpointError
from stages.execution import (
    WorkerResource,
    check_stage_device,
    run_per_image,
    worker_path,
)
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params
from stages.prepare import demo_index

log = logging.getLogger("wsss.sam_masks")
STAGE = "sam_masks"

# Params that change how the work is done but never its result (like compute.*): left out of the
# store fingerprint and of the stage's params in dvc.yaml.
RESULT_NEUTRAL_KEYS = ("max_batch_memory_mb",)

# Modules whose code decides the masks (the code deps of this stage in dvc.yaml). When they change,
# DVC reruns the stage, and the store must then recompute instead of resuming with old masks.
CODE_MODULES = ("pipeline.sam.quasi_superpixels", "pipeline.sam.point_decoder",
                "pipeline.sam.models", "pipeline.precision", "pipeline.data.imageio")
# ... and of the world oracle's masks, which only its stores depend on (dvc.yaml lists them for
# every model: a VOC store resumes with nothing to compute when they change).
ORACLE_CODE_MODULES = ("pipeline.demo.sam_oracle", "pipeline.demo.world")



class Item(NamedTuple):
    image_id: str
    image: str
    store: str
    inputs: str | None = None
    """Digest of the image's content (``pipeline.provenance.image_inputs``), recorded with its masks."""


def _build_generator(model, checkpoint, checkpoint_sha256, mask_threshold, device, precision,
                     **settings):
    """The quasi-superpixel generator of ``model`` (the world oracle needs no weights)."""
    if model == WORLD_ORACLE:
        from pipeline.demo.sam_oracle import WorldOracleGenerator

        return WorldOracleGenerator(precision=precision, **settings)
    from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator

    predictor = build_sam_predictor(
        model, checkpoint, checkpoint_sha256, torch_device(device), mask_threshold
    )
    return QuasiSuperpixelGenerator(predictor, precision=precision, **settings)


def _build_masker(world_seed: int | None, **kwargs):
    """``(image_id, image) -> QuasiSuperpixels``, built once per process (WorkerResource
    factory: module-level, plain-data kwargs)."""
    generator = _build_generator(**kwargs)
    if kwargs["model"] == WORLD_ORACLE:
        return partial(_world_oracle_masks, generator, world_seed)
    return partial(_image_masks, generator)


def _image_masks(generator, image_id: str, image):
    return generator.generate(image)


def _world_oracle_masks(generator, world_seed: int, image_id: str, image):
    """The oracle needs the image's world: re-rendered from the seed and the id's index."""
    from pipeline.demo.world import render

    try:
        sample = render(world_seed, demo_index(image_id))
    except ValueError as exc:
        raise PipelineError(f"image {image_id}: {exc}; sam.model {WORLD_ORACLE} "
                         "knows only the demo world") from exc
    if sample.image.shape != image.shape:
        raise PipelineError(
            f"image {image_id} is {image.shape[0]}x{image.shape[1]} but demo world "
            f"{world_seed} renders it {sample.image.shape[0]}x{sample.image.shape[1]}: "
            "is the index from another dataset.demo.seed? (rerun prepare)")
    return generator.generate_world(image, sample)


def masks_for_image(masker, item: Item) -> str:
    """Quasi-superpixels of one image, written as its store group. Returns the image id."""
    try:
        image = read_rgb(item.image)
    except ImageReadError as exc:
        raise PipelineError(f"image {item.image_id} ({item.image}): {exc}") from exc
    h, w = image.shape[:2]
    write_masks(item.store, item.image_id, masker(item.image_id, image), h, w, item.inputs)
    return item.image_id


def write_masks(store: str, image_id: str, qs, height: int, width: int,
                inputs: str | None = None) -> None:
    """One image's group of the ``sam_masks`` store (its layout: CONTRACT.md)."""
    write_group(store, image_id, qs.to_arrays(),
                attrs=with_inputs({"height": height, "width": width}, inputs))


def store_attrs(cfg: SamConfig, precision: str, world_seed: int | None = None) -> dict:
    """Store provenance; the fingerprint covers everything the masks depend on.

    ``world_seed``: ``dataset.demo.seed``, which the world oracle's masks depend on (ignored for
    real models)."""
    oracle = cfg.model == WORLD_ORACLE
    if oracle:
        provenance = {"sha256": "none (the demo world's own masks)", "untrained": False}
    else:
        provenance = sam_provenance(cfg.model, cfg.checkpoint, cfg.checkpoint_sha256)
    # The checkpoint's location is not part of the result (teammates sharing the store through a
    # DVC remote keep weights in different places); its checksum is.
    depends = {k: v for k, v in to_dict(cfg).items()
               if k not in ("checkpoint", "checkpoint_sha256") + RESULT_NEUTRAL_KEYS}
    modules = CODE_MODULES
    if oracle:
        depends["world_seed"] = world_seed
        modules += ORACLE_CODE_MODULES
    code = code_digest(*modules)
    return {
        "stage": STAGE,
        "sam": to_dict(cfg),
        "precision": precision,
        "model": cfg.model,
        "checkpoint_sha256": provenance["sha256"],
        "untrained": provenance["untrained"],
        "sam_oracle": oracle,
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
            raise PipelineError(str(exc)) from exc
        for r in records:
            items.setdefault(r.id, Item(r.id, worker_path(r.image), store, image_inputs(r)))
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
    oracle = cfg.model == WORLD_ORACLE
    if oracle and dataset.name != "demo":
        raise PipelineError(f"sam.model {WORLD_ORACLE} is the demo world's stand-in; "
                         "it needs dataset.name: demo")
    try:
        if not oracle:
            verify_checkpoint(cfg.model, cfg.checkpoint, cfg.checkpoint_sha256)
    except CheckpointError as exc:
        raise PipelineError(str(exc)) from exc
    check_stage_device(compute)  # here with `local`, else on each worker before its first image
    world_seed = dataset.demo.seed if oracle else None
    items = _items(index_dir, dataset, worker_path(out))
    store = ImageStore.open_for_writing(out, store_attrs(cfg, compute.precision, world_seed))
    pending = set(store.todo({it.image_id: it.inputs for it in items}))
    todo = [it for it in items if it.image_id in pending]
    resource = WorkerResource.of(
        _build_masker, files=("checkpoint",), world_seed=world_seed, model=cfg.model,
        checkpoint=worker_path(cfg.checkpoint), checkpoint_sha256=cfg.checkpoint_sha256,
        mask_threshold=cfg.mask_threshold,
        device=compute.device, precision=compute.precision, **cfg.generator_settings(),
    )
    run_per_image(masks_for_image, todo, compute, resource, desc="sam masks")
    finish(out)
    if metrics_path:
        stats = quasi_superpixel_stats([store.read(it.image_id, ("levels",))["levels"] for it in items])
        write_json_atomic(Path(metrics_path), {**stats, "model": cfg.model,
                                               "untrained": store.attrs["untrained"],
                                               "sam_oracle": store.attrs["sam_oracle"]})
        log.info("sam_masks: %.1f quasi-superpixels per image, all three levels in %.0f%% of images",
                 stats.get("masks_per_image", 0), 100 * stats.get("three_level_fraction", 0))
    log.info("sam_masks: %d images computed, %d already in the store (resumed), %d in %s",
             len(todo), len(items) - len(todo), len(items), out)
