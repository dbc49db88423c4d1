"""The SAM step of ``benchmarks/gpu_check.py``: our :class:`QuasiSuperpixelGenerator` against
segment-anything's stock ``SamAutomaticMaskGenerator``, like for like.

Both run over the same ``SamPredictor`` with the same settings, the paper's (:func:`paper_settings`:
``SamConfig``'s defaults under ``pipeline/profiles.py``'s VOC profile: 32 points per side, one crop
layer, points downscaled by 2 in it, 256 points per batch, ...), and a third generator is ours with
the paper's three changes off (:data:`NEUTRAL`), which computes stock's masks. Each generator has
an untimed warm-up pass over the images (CUDA kernels, caches; its mask counts are kept), then
``repeats`` timed rounds, the generators interleaved image by image so that a load change hits
all alike. Stock and ours-with-changes-off must find the same number of masks per image, within
:func:`count_slack`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from harness import cuda_peak_gib, reset_cuda_peak, sync
from sam_masks import NEUTRAL, _guarded_stock_class

#: Settings that segment-anything's generator takes too (the rest are our changes and options).
STOCK_KEYS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
              "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
              "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area")

GENERATORS = ("stock", "ours", "ours, changes off")


def paper_settings(points_per_side: int | None = None) -> dict:
    """The paper's generator settings (VOC profile over ``SamConfig``'s defaults), but the IoU and
    stability thresholds 0: random weights predict IoUs and stabilities near 0, so at the paper's
    0.86 / 0.92 no mask would reach NMS and the clean-up, whose cost the comparison is about.
    ``points_per_side``: a smaller grid for a quick run (both generators get it)."""
    from pipeline.params import SamConfig
    from pipeline.profiles import PROFILES

    profile = {key.split(".", 1)[1]: value for key, value in PROFILES["voc"].items()
               if key.startswith("sam.") and key != "sam.model"}
    settings = SamConfig(model="tiny", **profile).generator_settings()
    settings.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    if points_per_side is not None:
        settings["points_per_side"] = points_per_side
    return settings


def count_slack(stock_masks: int) -> int:
    """Mask count difference allowed between stock and ours with the changes off on one image.
    On the CPU they are equal (tests/test_gpu_check_sam.py); on CUDA our batched point decoder
    and stock's ``predict_torch`` sum in other orders, so a mask at an NMS or clean-up boundary
    may go either way: a few masks, not another count."""
    return max(2, round(0.02 * stock_masks))


@dataclass
class SamComparison:
    seconds: dict[str, list[float]]
    """Generator -> seconds of each timed ``generate`` call."""
    masks: dict[str, list[int]]
    """Generator -> masks per image (warm-up pass)."""
    peak_gib: dict[str, float | None]
    """Generator -> peak CUDA memory of its warm-up pass (None off CUDA)."""

    def mismatches(self) -> list[str]:
        """Images where stock and ours with the changes off differ by more than :func:`count_slack`."""
        return [f"image {i}: stock {s}, ours with changes off {o}"
                for i, (s, o) in enumerate(zip(self.masks["stock"], self.masks["ours, changes off"]))
                if abs(s - o) > count_slack(s)]

    def line(self) -> str:
        parts = []
        for name in GENERATORS:
            peak = self.peak_gib[name]
            parts.append(f"{name} {statistics.median(self.seconds[name]):.3f} s/image, masks "
                         f"{self.masks[name]}" + (f", peak {peak:.2f} GiB" if peak is not None else ""))
        return "; ".join(parts)


def generators(predictor, settings: dict) -> dict:
    """name -> ``generate(image)`` of stock, ours and ours with the changes off, over ``predictor``."""
    from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator

    stock = _guarded_stock_class()(predictor.model, output_mode="binary_mask",
                                   **{key: settings[key] for key in STOCK_KEYS})
    stock.predictor = predictor  # the same predictor object (and image embedding path) as ours
    ours = QuasiSuperpixelGenerator(predictor, **settings)
    neutral = QuasiSuperpixelGenerator(predictor, **{**settings, **NEUTRAL})
    return {"stock": stock.generate, "ours": ours.generate, "ours, changes off": neutral.generate}


def compare_generators(predictor, images, settings: dict, repeats: int, device) -> SamComparison:
    """Warm-up pass of each generator over ``images``, then ``repeats`` interleaved timed rounds."""
    gens = generators(predictor, settings)
    cuda = getattr(device, "type", str(device)).startswith("cuda")
    masks, peaks = {}, {}
    for name, generate in gens.items():
        reset_cuda_peak(device)
        masks[name] = [len(generate(image)) for image in images]
        sync(device)
        peaks[name] = cuda_peak_gib(device) if cuda else None
    seconds = {name: [] for name in gens}
    for _ in range(repeats):
        for image in images:
            for name, generate in gens.items():
                sync(device)
                t0 = time.perf_counter()
                generate(image)
                sync(device)
                seconds[name].append(time.perf_counter() - t0)
    return SamComparison(seconds, masks, peaks)
