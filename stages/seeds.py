"""Stage ``seeds@coarse|fine``: CAMs + quasi-superpixels -> palette seed PNGs + metrics (§5, §8).

Every usable image of the train split gets ``<out>/<id>.png``. Where the split has ground truth,
the seeds and the CAMs they came from are scored in percent (seed mIoU etc.; CAM mIoU for each
background power of ``seeds.cam_bg_powers``, for the raw CAMs under ``cam`` and, when the store has
them, the CAA-refined ones under ``cam_caa``), beside what an all-background map scores on the same
images (``background_only``). An image missing from the quasi-superpixel store, or with no
quasi-superpixel, is seeded by the thresholded CAM argmax and counted as a fallback.
``<out>/provenance.json`` says which stores the seeds came from and whether any model was
untrained, for the stages downstream.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import click

from pipeline.atomic import write_json_atomic
from pipeline.data.datasets import load_split
from pipeline.errors import PipelineError
from pipeline.params import ComputeConfig, DatasetConfig, SeedsConfig, section
from pipeline.provenance import image_inputs, labelled_inputs
from pipeline.schemas import SEEDS_PROVENANCE, open_cams, open_masks, seed_path
from pipeline.seeds.image import SeedsTask, seeds_for_image
from pipeline.seeds.totals import SeedTotals, summarise
from pipeline.store import ImageStore
from stages.execution import run_per_image, worker_path
from stages.resources import WorkerResource
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params

log = logging.getLogger("wsss.seeds")


def _open_stores(cams: str, sam_masks: str) -> tuple[ImageStore, ImageStore]:
    """Both input stores, opened once per process (WorkerResource factory)."""
    return open_cams(cams), open_masks(sam_masks)


def _remove_stale(out: Path, keep: set[str]) -> int:
    """Delete PNGs of ids no longer in the split (and temp files of a killed run)."""
    stale = [p for p in out.glob("*.png") if p.stem not in keep] + list(out.glob(".*.tmp"))
    for p in stale:
        p.unlink()
    return len(stale)


@click.command("seeds")
@click.option("--which", type=click.Choice(["coarse", "fine"]), required=True,
              help="Seed set: coarse (cls CAMs) or fine (seg CAMs); picks seeds.<which>.alpha.")
@PARAMS_OPTION
@INDEX_OPTION
@click.option("--cams", required=True, type=click.Path(file_okay=False),
              help="CAM store (cache/cams/cls.zarr, seg.zarr or an imported one).")
@click.option("--sam-masks", "sam_masks", default="cache/sam_masks.zarr", show_default=True,
              type=click.Path(file_okay=False), help="Quasi-superpixel store.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory of <id>.png seeds.")
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False),
              help="Metrics JSON to write.")
@click.option("--plots", "plots_path", required=True, type=click.Path(dir_okay=False),
              help="Per-class IoU plot JSON (dvc plots) to write.")
@click.option("--note", default=None, help="Free text copied into the metrics.")
def command(which: Literal["coarse", "fine"], params_path: str, index_dir: str, cams: str,
            sam_masks: str, out: str, metrics_path: str, plots_path: str, note: str | None) -> None:
    """SAMS seeds for every image of the train split, with seed and CAM evaluation."""
    params = load_params(params_path)
    cfg = section(params, "seeds", SeedsConfig)
    if not cfg.cam_bg_powers:
        raise PipelineError("params.yaml: seeds.cam_bg_powers must list at least one power")
    dataset = section(params, "dataset", DatasetConfig)
    compute = section(params, "compute", ComputeConfig)
    split = load_split(index_dir, dataset.train_split)
    stores = _open_stores(cams, sam_masks)
    records = split.good()
    # Every image needs its CAMs: checked before the first seed is written, not half-way through.
    missing = [r.id for r in records if r.id not in stores[0]]
    if missing:
        raise PipelineError(f"{len(missing)} of {len(records)} images of split {split.split!r} have "
                            f"no CAMs in {cams} (e.g. {missing[0]}); run the cams stage or import "
                            "CAMs for them")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    alpha = getattr(cfg, which).alpha
    items = [
        SeedsTask(r.id, r.height, r.width, worker_path(r.label), worker_path(seed_path(out_dir, r.id)),
                  alpha, cfg.fallback_thresh, tuple(cfg.cam_bg_powers), len(split.class_names) + 1,
                  labelled_inputs(r), image_inputs(r))
        for r in records
    ]
    resource = WorkerResource.of(_open_stores, thread_safe=True, cams=worker_path(cams),
                                 sam_masks=worker_path(sam_masks))
    totals = SeedTotals(tuple(cfg.cam_bg_powers))
    run_per_image(seeds_for_image, items, compute, resource, desc=f"seeds {which}", collect=totals.add)
    removed = _remove_stale(out_dir, {r.id for r in records})
    untrained = bool(stores[0].attrs.get("untrained") or stores[1].attrs.get("untrained"))
    metrics, plots = summarise(totals, split.class_names, which, alpha, untrained, note)
    write_json_atomic(out_dir / SEEDS_PROVENANCE, {
        "stage": "seeds", "which": which, "alpha": alpha,
        "cams": str(cams), "sam_masks": str(sam_masks), "untrained": untrained,
    })
    write_json_atomic(Path(metrics_path), metrics)
    write_json_atomic(Path(plots_path), plots)
    seed_miou = metrics.get("seed", {}).get("miou")
    log.info("seeds %s: %d images (%d fallbacks, %d stale removed), seed mIoU %s%%",
             which, totals.n_images, metrics["n_fallback"], removed,
             "n/a" if seed_miou is None else f"{seed_miou:.1f}")
