"""The SAM step of ``benchmarks/gpu_check.py``: our :class:`QuasiSuperpixelGenerator` against
segment-anything's stock ``SamAutomaticMaskGenerator``, like for like.

Both run over the same ``SamPredictor`` with the same settings, the paper's (:func:`paper_settings`:
``SamConfig``'s defaults under ``pipeline/profiles.py``'s VOC profile: 32 points per side, one crop
layer, points downscaled by 2 in it, 256 points per batch, ...), and a third generator is ours with
the paper's three changes off (:data:`NEUTRAL`), which computes stock's masks. Each generator has
an untimed warm-up pass over the images (CUDA kernels, caches; its mask counts are kept), then
``repeats`` timed rounds, the generators interleaved image by image so that a load change hits
all alike. Each timed call is split into the image encoder, the mask decoder and the
post-processing (everything else), the device synchronised at each boundary (``sam_masks.py``'s
:class:`PhaseTimer`: every generator pays the same synchronisations); the line reports the
medians per image. Stock and ours-with-changes-off must find the same number of masks per image,
within :func:`count_slack`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from harness import cuda_peak_gib, reset_cuda_peak, sync
from sam_masks import NEUTRAL, PhaseTimedGenerator, PhaseTimer, TimedPredictor, _guarded_stock_class

#: Settings that segment-anything's generator takes too (the rest are our changes and options).
STOCK_KEYS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
              "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
              "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area")

GENERATORS = ("stock", "ours", "ours, changes off")
#: The phases a timed call is split into (post-processing: the call's time less the other two).
PHASES = ("encoder", "decoder", "postprocess")


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
    phases: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    """Generator -> seconds of each timed call's :data:`PHASES`."""

    def phase_ms(self, name: str) -> dict[str, float]:
        """Median milliseconds per image of each of generator ``name``'s phases."""
        return {phase: 1e3 * statistics.median(call[phase] for call in self.phases[name])
                for phase in PHASES}

    def mismatches(self) -> list[str]:
        """Images where stock and ours with the changes off differ by more than :func:`count_slack`."""
        return [f"image {i}: stock {s}, ours with changes off {o}"
                for i, (s, o) in enumerate(zip(self.masks["stock"], self.masks["ours, changes off"]))
                if abs(s - o) > count_slack(s)]

    def line(self) -> str:
        parts = []
        for name in GENERATORS:
            peak = self.peak_gib[name]
            split = ""
            if self.phases.get(name):
                ms = self.phase_ms(name)
                split = " (" + ", ".join(f"{phase} {ms[phase]:.1f} ms" for phase in PHASES) + ")"
            parts.append(f"{name} {statistics.median(self.seconds[name]):.3f} s/image{split}, masks "
                         f"{self.masks[name]}" + (f", peak {peak:.2f} GiB" if peak is not None else ""))
        return "; ".join(parts)


def generators(predictor, settings: dict) -> dict[str, tuple[Callable, PhaseTimer]]:
    """name -> (``generate(image)``, its phase timer) of stock, ours and ours with the changes off,
    over ``predictor`` (each through a :class:`TimedPredictor` of its own timer: the same
    predictor object and image embedding path for all)."""
    timers = {name: PhaseTimer(predictor.device) for name in GENERATORS}
    stock = _guarded_stock_class()(predictor.model, output_mode="binary_mask",
                                   **{key: settings[key] for key in STOCK_KEYS})
    stock.predictor = TimedPredictor(predictor, timers["stock"])
    ours = PhaseTimedGenerator(TimedPredictor(predictor, timers["ours"]), **settings)
    neutral = PhaseTimedGenerator(TimedPredictor(predictor, timers["ours, changes off"]),
                                  **{**settings, **NEUTRAL})
    return {"stock": (stock.generate, timers["stock"]), "ours": (ours.generate, timers["ours"]),
            "ours, changes off": (neutral.generate, timers["ours, changes off"])}


def compare_generators(predictor, images, settings: dict, repeats: int, device) -> SamComparison:
    """Warm-up pass of each generator over ``images``, then ``repeats`` interleaved timed rounds."""
    gens = generators(predictor, settings)
    cuda = getattr(device, "type", str(device)).startswith("cuda")
    masks, peaks = {}, {}
    for name, (generate, _) in gens.items():
        reset_cuda_peak(device)
        masks[name] = [len(generate(image)) for image in images]
        sync(device)
        peaks[name] = cuda_peak_gib(device) if cuda else None
    seconds = {name: [] for name in gens}
    phases = {name: [] for name in gens}
    for _ in range(repeats):
        for image in images:
            for name, (generate, timer) in gens.items():
                timer.seconds.clear()
                sync(device)
                t0 = time.perf_counter()
                generate(image)
                sync(device)
                total = time.perf_counter() - t0
                seconds[name].append(total)
                split = {phase: timer.seconds.get(phase, 0.0) for phase in PHASES[:2]}
                split["postprocess"] = total - split["encoder"] - split["decoder"]
                phases[name].append(split)
    return SamComparison(seconds, masks, peaks, phases)
