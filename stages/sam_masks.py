"""Stage ``sam_masks``: images -> ``cache/sam_masks.zarr``, quasi-superpixels per image (§1).

Every usable image of the train and eval splits gets one store group. The store's fingerprint
covers the ``sam`` params (but ``sam.max_batch_memory_mb``, which never changes a result),
``compute.precision``, the checkpoint's checksum and the mask code: a change resets the store, a
rerun with the same ones resumes and computes only the images not yet stored.

``sam.model`` names a generator (:mod:`pipeline.sam.generators`): a SAM network, or a registered
stand-in such as the demo world's oracle (:mod:`pipeline.demo.sam_oracle`), whose store and
metrics say ``sam_oracle: true``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

from pipeline.atomic import write_json_atomic
from pipeline.config import to_dict
from pipeline.data.datasets import load_split
from pipeline.errors import PipelineError
from pipeline.metrics import quasi_superpixel_stats
from pipeline.params import ComputeConfig, DatasetConfig, SamConfig, section
from pipeline.provenance import code_digest, fingerprint, image_inputs, package_version
from pipeline.sam.generators import sam_generator
from pipeline.sam.maskers import MasksTask, build_masker, masks_for_image, masks_provenance, verify_weights
from pipeline.store import ImageStore, finish
from stages.execution import fill_store, worker_path
from stages.resources import WorkerResource, check_stage_device
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params

log = logging.getLogger("wsss.sam_masks")
STAGE = "sam_masks"

# Params that change how the work is done but never its result (like compute.*): left out of the
# store fingerprint and of the stage's params in dvc.yaml.
RESULT_NEUTRAL_KEYS = ("max_batch_memory_mb",)

# Modules whose code decides the masks (the code deps of this stage in dvc.yaml). When they change,
# DVC reruns the stage, and the store must then recompute instead of resuming with old masks.
# A generator adds its own (``SamGenerator.code_modules``: the world oracle's, which only its
# stores depend on; dvc.yaml lists them for every model: a VOC store resumes with nothing to
# compute when they change).
CODE_MODULES = ("pipeline.sam.quasi_superpixels", "pipeline.sam.point_decoder",
                "pipeline.sam.image_encoder",
                "pipeline.sam.models", "pipeline.sam.specs", "pipeline.sam.pretrained",
                "pipeline.sam.generators", "pipeline.sam.maskers", "pipeline.precision",
                "pipeline.data.imageio")


def store_attrs(cfg: SamConfig, precision: str, world_seed: int | None = None) -> dict:
    """Store provenance; the fingerprint covers everything the masks depend on.

    ``world_seed``: ``dataset.demo.seed``, which a generator's masks may depend on
    (``SamGenerator.world_seed``: the world oracle's; ignored for real models)."""
    generator = sam_generator(cfg.model)
    provenance = masks_provenance(cfg)
    # The checkpoint's location is not part of the result (teammates sharing the store through a
    # DVC remote keep weights in different places); its checksum is.
    depends = {k: v for k, v in to_dict(cfg).items()
               if k not in ("checkpoint", "checkpoint_sha256") + RESULT_NEUTRAL_KEYS}
    if generator.world_seed:
        depends["world_seed"] = world_seed
    code = code_digest(*CODE_MODULES, *generator.code_modules)
    return {
        "stage": STAGE,
        "sam": to_dict(cfg),
        "precision": precision,
        "model": cfg.model,
        "checkpoint_sha256": provenance["sha256"],
        "untrained": provenance["untrained"],
        "sam_oracle": generator.oracle,
        "package_version": package_version(),
        "code": code,
        "fingerprint": fingerprint(depends, provenance["sha256"], code, precision),
    }


def _items(index_dir: str, dataset: DatasetConfig, store: str, fp: str) -> list[MasksTask]:
    items: dict[str, MasksTask] = {}
    for split in (dataset.train_split, dataset.eval_split):
        for r in load_split(index_dir, split).good():
            items.setdefault(r.id, MasksTask(r.id, worker_path(r.image), store, image_inputs(r),
                                             r.digest, fp))
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
    generator = sam_generator(cfg.model)
    if generator.dataset is not None and dataset.name != generator.dataset:
        raise PipelineError(f"sam.model {cfg.model} is {generator.role}; "
                            f"it needs dataset.name: {generator.dataset}")
    verify_weights(cfg)
    check_stage_device(compute)  # here with `local`, else on each worker before its first image
    world_seed = dataset.demo.seed if generator.world_seed else None
    attrs = store_attrs(cfg, compute.precision, world_seed)
    items = _items(index_dir, dataset, worker_path(out), attrs["fingerprint"])
    store = ImageStore.open_for_writing(out, attrs)

    def plan() -> list[MasksTask]:
        pending = set(store.todo({it.image_id: it.inputs for it in items}))
        return [it for it in items if it.image_id in pending]

    resource = WorkerResource.of(
        build_masker, files=("checkpoint",), world_seed=world_seed, model=cfg.model,
        checkpoint=worker_path(cfg.checkpoint), checkpoint_sha256=cfg.checkpoint_sha256,
        mask_threshold=cfg.mask_threshold,
        device=compute.device, precision=compute.precision, **cfg.generator_settings(),
    )
    computed = fill_store(masks_for_image, plan, compute, resource, desc="sam masks")
    finish(out)
    if metrics_path:
        stats = quasi_superpixel_stats([store.read(it.image_id, ("levels",))["levels"] for it in items])
        write_json_atomic(Path(metrics_path), {**stats, "model": cfg.model,
                                               "untrained": store.attrs["untrained"],
                                               "sam_oracle": store.attrs["sam_oracle"]})
        log.info("sam_masks: %.1f quasi-superpixels per image, all three levels in %.0f%% of images",
                 stats.get("masks_per_image", 0), 100 * stats.get("three_level_fraction", 0))
    log.info("sam_masks: %d images computed, %d already in the store (resumed), %d in %s",
             computed, len(items) - computed, len(items), out)
