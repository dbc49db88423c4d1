"""A split's seeds in numbers: running totals of the per-image outcomes, and the metrics JSON.

Where the split has ground truth, the seeds and the CAMs they came from are scored in percent
(seed mIoU etc.; CAM mIoU for each background power, for the raw CAMs under ``cam`` and, when
the store has them, the CAA-refined ones under ``cam_caa``), beside what an all-background map
scores on the same images (``background_only``).
"""
from __future__ import annotations

from pipeline.metrics import ConfusionTotals
from pipeline.seeds.image import SeedOutcome


class SeedTotals:
    """Running totals of the per-image outcomes: what the metrics need (confusion sums, counts,
    fallback ids), so a stage keeps no per-image matrix (``run_per_image(collect=...)``): COCO's
    CAM confusions alone, 81² × 10 background powers per image, would hold about 90 GB."""

    def __init__(self, bg_powers: tuple[float, ...]):
        self.bg_powers = bg_powers
        self.maps = ConfusionTotals()
        """``seed`` and ``background`` (the all-background map)."""
        self.cams = ConfusionTotals()
        """Per CAM array (``cam``, ``cam_caa``): (n_powers, K, K) sums."""
        self.n_images = self.n_evaluated = self.n_missing_masks = 0
        self.fallbacks: list[str] = []
        self.cam_keys: set[str] = set()

    def add(self, o: SeedOutcome) -> None:
        self.n_images += 1
        self.n_missing_masks += bool(o.missing_masks)
        self.cam_keys.add(o.cam_key)
        if o.fallback:
            self.fallbacks.append(o.image_id)
        if o.scores is None:
            return
        self.n_evaluated += 1
        self.maps.add("seed", o.scores.seed)
        self.maps.add("background", o.scores.background)
        for key, confusions in o.scores.cams.items():
            self.cams.add(key, confusions)


def summarise(totals: SeedTotals, class_names: list[str], which: str, alpha: float, untrained: bool,
              note: str | None) -> tuple[dict, list[dict]]:
    """The metrics JSON of seed set ``which`` (seeded at ``alpha``) and the per-class IoU plot
    records."""
    names = ["background", *class_names]
    metrics: dict = {
        "which": which,
        "alpha": alpha,
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
        metrics["seed"] = totals.maps.summary("seed", names)
        for key in totals.cams.keys():  # "cam" (raw), "cam_caa" (CAA-refined)
            # a CAM set is scored only over the same images as the seeds (a store that has
            # cam_caa for some images only is not a CAA evaluation)
            if totals.cams.count(key) == totals.n_evaluated:
                metrics[key] = totals.cams.power_sweep(key, totals.bg_powers)
        metrics["background_only"] = {"miou": totals.maps.miou("background")}
        per_class = metrics["seed"]["per_class_iou"]
        plots = [{"class": cls, "iou": iou} for cls, iou in per_class.items()]
    return metrics, plots
