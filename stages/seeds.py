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
from typing import Literal, NamedTuple

import click
import numpy as np

from pipeline.atomic import write_json_atomic
from pipeline.data.datasets import DatasetError, load_split
from pipeline.data.imageio import ImageReadError, read_label, write_palette_png
from pipeline.errors import PipelineError
from pipeline.metrics import (
    CamEvaluator,
    ConfusionAccumulator,
    cam_confusions,
    confusion_matrix,
)
from pipeline.params import ComputeConfig, DatasetConfig, SeedsConfig, section
from pipeline.provenance import check_inputs, image_inputs, labelled_inputs
from pipeline.seeds.sams import image_scores, seed_or_fallback
from pipeline.store import ImageStore, StoreError
from stages.execution import WorkerResource, run_per_image, worker_path
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params

log = logging.getLogger("wsss.seeds")
PROVENANCE = "provenance.json"
"""Written beside the seed PNGs: where they came from, and whether any model was untrained."""



class Item(NamedTuple):
    image_id: str
    height: int
    width: int
    label: str | None
    out_png: str
    alpha: float
    fallback_thresh: float
    bg_powers: tuple[float, ...]
    num_classes: int
    cam_inputs: str | None = None
    """What the image's CAMs must have been computed from."""
    sam_inputs: str | None = None
    """What the image's quasi-superpixels must have been computed from."""


class Outcome(NamedTuple):
    image_id: str
    fallback: bool
    missing_masks: bool
    cam_key: str
    seed_confusion: np.ndarray | None
    cam_confusions: dict[str, np.ndarray] | None
    """Per CAM array of the store (``cam``, ``cam_caa``): (n_powers, K, K) confusions."""
    background_confusion: np.ndarray | None


def _open_stores(cams: str, sam_masks: str) -> tuple[ImageStore, ImageStore]:
    """Both input stores, opened once per process (WorkerResource factory)."""
    from pipeline.sam.quasi_superpixels import QuasiSuperpixels
    from stages.cams import CAM_ARRAYS

    return (ImageStore(cams, arrays=CAM_ARRAYS),
            ImageStore(sam_masks, arrays=QuasiSuperpixels.STORE_ARRAYS))


def seed_image(stores: tuple[ImageStore, ImageStore], item: Item) -> Outcome:
    """Seed one image, write its PNG, and score it against its ground truth if any."""
    cams, sam = stores
    hw = (item.height, item.width)
    if item.image_id not in cams:
        raise PipelineError(f"image {item.image_id} is not in the CAM store {cams.path} "
                         "(run the cams stage, or import-cams, for this split)")
    if item.cam_inputs is not None:
        check_inputs(cams, item.image_id, item.cam_inputs, "wsss cams")
    arrays = cams.read(item.image_id)
    cam_key = "cam_caa" if "cam_caa" in arrays else "cam"
    if cam_key not in arrays or "fg_cls" not in arrays:
        raise PipelineError(f"image {item.image_id} in {cams.path} lacks 'cam' or 'fg_cls'")
    cam, fg_cls = arrays[cam_key].astype(np.float32), arrays["fg_cls"].astype(np.int64)
    if cam.ndim != 3 or cam.shape[0] != fg_cls.shape[0]:
        raise PipelineError(f"image {item.image_id}: {cam_key} {cam.shape} does not match "
                         f"fg_cls {fg_cls.shape}")
    attrs = cams.read_attrs(item.image_id)
    if "height" in attrs and (attrs["height"], attrs["width"]) != hw:
        raise PipelineError(f"image {item.image_id}: CAM store says {attrs['height']}x"
                         f"{attrs['width']}, the index {hw[0]}x{hw[1]}")
    missing = item.image_id not in sam
    if missing:
        masks, levels = np.zeros((0, *hw), bool), np.zeros(0, np.uint8)
    else:
        if item.sam_inputs is not None:
            check_inputs(sam, item.image_id, item.sam_inputs, "wsss sam-masks")
        qs = sam.read(item.image_id)
        masks, levels = qs["masks"], qs["levels"]
        if tuple(masks.shape[1:]) != hw:
            raise PipelineError(f"image {item.image_id}: quasi-superpixels are "
                             f"{masks.shape[1]}x{masks.shape[2]}, the image {hw[0]}x{hw[1]}")
    result = seed_or_fallback(cam, fg_cls, masks, levels, item.alpha, hw, item.fallback_thresh)
    write_palette_png(item.out_png, result.seed)
    seed_conf = cam_conf = bg_conf = None
    if item.label is not None:
        try:
            gt = read_label(item.label)
        except (ImageReadError, OSError) as exc:
            raise PipelineError(f"image {item.image_id}: cannot read ground truth: {exc}") from exc
        if gt.shape != hw:
            raise PipelineError(f"image {item.image_id}: ground truth is {gt.shape}, image {hw}")
        seed_conf = confusion_matrix(result.seed, gt, item.num_classes)
        cam_conf = {
            key: cam_confusions(image_scores(arrays[key].astype(np.float32), hw), fg_cls, gt,
                                item.bg_powers, item.num_classes)
            for key in ("cam", "cam_caa") if key in arrays
        }
        bg_conf = confusion_matrix(np.zeros(hw, np.uint8), gt, item.num_classes)
    return Outcome(item.image_id, result.fallback, missing, cam_key, seed_conf, cam_conf, bg_conf)


class SeedTotals:
    """Running totals of the per-image outcomes: what the metrics need (confusion sums, counts,
    fallback ids), so a stage keeps no per-image matrix (``run_per_image(collect=...)``): COCO's
    CAM confusions alone, 81² × 10 background powers per image, would hold about 90 GB."""

    def __init__(self, num_classes: int, bg_powers: tuple[float, ...]):
        self.num_classes, self.bg_powers = num_classes, bg_powers
        self.seeds = ConfusionAccumulator(num_classes)
        self.background = ConfusionAccumulator(num_classes)
        self.cam_evals: dict[str, CamEvaluator] = {}
        self.cam_counts: dict[str, int] = {}
        self.n_images = self.n_evaluated = self.n_missing_masks = 0
        self.fallbacks: list[str] = []
        self.cam_keys: set[str] = set()

    def add(self, o: Outcome) -> None:
        self.n_images += 1
        self.n_missing_masks += bool(o.missing_masks)
        self.cam_keys.add(o.cam_key)
        if o.fallback:
            self.fallbacks.append(o.image_id)
        if o.seed_confusion is None:
            return
        self.n_evaluated += 1
        self.seeds.matrix += o.seed_confusion
        self.background.matrix += o.background_confusion
        for key, confusions in o.cam_confusions.items():
            if key not in self.cam_evals:
                self.cam_evals[key] = CamEvaluator(self.num_classes, self.bg_powers)
                self.cam_counts[key] = 0
            self.cam_evals[key].add_confusions(confusions)
            self.cam_counts[key] += 1


def summarise(
    outcomes: "SeedTotals | list[Outcome]", class_names: list[str], cfg: SeedsConfig, which: str,
    untrained: bool, note: str | None,
) -> tuple[dict, list[dict]]:
    """The metrics JSON and the per-class IoU plot records (of the totals, or of outcomes)."""
    names = ["background", *class_names]
    totals = outcomes
    if not isinstance(totals, SeedTotals):
        totals = SeedTotals(len(class_names) + 1, tuple(cfg.cam_bg_powers))
        for o in outcomes:
            totals.add(o)
    metrics: dict = {
        "which": which,
        "alpha": getattr(cfg, which).alpha,
        "n_images": totals.n_images,
        "n_evaluated": totals.n_evaluated,
        "n_fallback": len(totals.fallbacks),
        "n_missing_masks": totals.n_missing_masks,
        "fallback_ids": sorted(totals.fallbacks),
        "cam_source": sorted(totals.cam_keys),
        "untrained": untrained,
    }
    if note:
        metrics["note"] = note
    plots: list[dict] = []
    if totals.n_evaluated:
        scores = totals.seeds.scores()
        metrics["seed"] = scores.as_dict(names)
        for key, evaluator in totals.cam_evals.items():  # "cam" (raw), "cam_caa" (CAA-refined)
            # a CAM set is scored only over the same images as the seeds (a store that has
            # cam_caa for some images only is not a CAA evaluation)
            if totals.cam_counts[key] == totals.n_evaluated:
                metrics[key] = evaluator.results()
        metrics["background_only"] = {"miou": totals.background.scores().as_dict()["miou"]}
        per_class = metrics["seed"]["per_class_iou"]
        plots = [{"class": cls, "iou": iou} for cls, iou in per_class.items()]
    return metrics, plots



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
    try:
        split = load_split(index_dir, dataset.train_split)
        stores = _open_stores(cams, sam_masks)
    except (DatasetError, StoreError) as exc:
        raise PipelineError(str(exc)) from exc
    records = split.good()
    # Every image needs its CAMs: checked before the first seed is written, not half-way through.
    missing = [r.id for r in records if r.id not in stores[0]]
    if missing:
        raise PipelineError(f"{len(missing)} of {len(records)} images of split {split.split!r} have no CAMs "
                         f"in {cams} (e.g. {missing[0]}); run the cams stage or import CAMs for them")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_classes = len(split.class_names) + 1
    items = [
        Item(r.id, r.height, r.width, worker_path(r.label), worker_path(out_dir / f"{r.id}.png"),
             getattr(cfg, which).alpha, cfg.fallback_thresh, tuple(cfg.cam_bg_powers), num_classes,
             labelled_inputs(r), image_inputs(r))
        for r in records
    ]
    resource = WorkerResource.of(_open_stores, thread_safe=True, cams=worker_path(cams),
                                 sam_masks=worker_path(sam_masks))
    totals = SeedTotals(num_classes, tuple(cfg.cam_bg_powers))
    run_per_image(seed_image, items, compute, resource, desc=f"seeds {which}", collect=totals.add)
    removed = _remove_stale(out_dir, {r.id for r in records})
    untrained = bool(stores[0].attrs.get("untrained") or stores[1].attrs.get("untrained"))
    metrics, plots = summarise(totals, split.class_names, cfg, which, untrained, note)
    write_json_atomic(out_dir / PROVENANCE, {
        "stage": "seeds", "which": which, "alpha": getattr(cfg, which).alpha,
        "cams": str(cams), "sam_masks": str(sam_masks), "untrained": untrained,
    })
    write_json_atomic(Path(metrics_path), metrics)
    write_json_atomic(Path(plots_path), plots)
    seed_miou = metrics.get("seed", {}).get("miou")
    log.info("seeds %s: %d images (%d fallbacks, %d stale removed), seed mIoU %s%%",
             which, totals.n_images, metrics["n_fallback"], removed,
             "n/a" if seed_miou is None else f"{seed_miou:.1f}")
