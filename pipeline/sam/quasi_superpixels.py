"""Quasi-superpixels: SAM's automatic "everything" masks, made level-aware (algorithms.md §1).

The generator follows segment-anything's ``SamAutomaticMaskGenerator`` step for step (point grids,
crops, IoU and stability filters, box NMS, crop-edge rule, cross-crop NMS, small-region clean-up)
and reuses its pure helpers from ``segment_anything.utils.amg`` so that every unchanged step
matches it exactly. Three changes make the masks usable as quasi-superpixels:

1. the IoU threshold is tested on ``iou + score_thresh_offset[level]`` (more wholes survive);
2. the within-crop NMS is scored by ``iou + score_nms_offset[level]`` (wholes outrank parts);
3. after the clean-up, :func:`occupation_filter` drops parts and sub-parts that mostly lie inside
   an already selected mask.

Unlike the stock generator, masks never go through RLE, and none is image-sized before the last
filter: each is cut to its bounding box when its logits are thresholded and travels as that box
crop (a boolean tensor on the predictor's device) through NMS, uncropping (a box shift) and the
small-region clean-up (OpenCV in the box grown by one pixel, the whole image only where that
could differ). The masks left are pasted at image size once, for the occupation filter, which
counts intersections inside each candidate's box with the selected masks whose boxes meet it.
Every step gives the integers and bits the whole-image computation gives; skipping the
image-sized work is what makes the post-processing faster than stock on the same predictor
(``benchmarks/sam_masks.py``).

That box-crop path is the CPU's: it reads few pixels but issues several ops per mask, and on a GPU
every op is a kernel launch. On any other device (``batched``) the masks of a prompt batch are
thresholded, scored, boxed and filtered together (:func:`threshold_logits_batched`), kept at
image size through the NMS, and the occupation filter is two matrix products
(:func:`occupation_filter_batched`): a fixed number of ops per batch, crop and image, whatever the
number of masks. The NMS and the small-region clean-up (OpenCV) run on the host, which gets the
boxes, or all masks, in one copy and sends back what changed in one copy. Both paths give the
same quasi-superpixels (tests/test_sam_batched.py); ``benchmarks/sam_masks.py --count-ops``
counts the batched path's ops, syncs and copies on the simulated CUDA device.

When the predictor holds a real segment-anything ``Sam``, the image and its crops go through the
image encoder together, as many per pass as the memory budget allows
(:mod:`pipeline.sam.image_encoder`), and the prompts of the crops encoded together go through
the decoder packed into shared batches (:meth:`PointDecoder.predict_images`; each crop's masks are
then post-processed in its own frame). The network side runs through
:class:`pipeline.sam.point_decoder.PointDecoder` (the same numbers with less work: shared first
block, IoU test before the mask upscaling) in prompt batches chosen from a memory budget (by
default half the free memory of a CUDA device); any other object with ``SamPredictor``'s
interface goes through its ``predict_torch``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping, Sequence

import cv2
import numpy as np
import torch
from segment_anything.utils.amg import (
    batch_iterator,
    batched_mask_to_box,
    build_all_layer_point_grids,
    generate_crop_boxes,
)
from torchvision.ops.boxes import batched_nms, box_area

from pipeline.precision import autocast
from pipeline.sam.image_encoder import crops_per_pass, encode_crops
from pipeline.sam.point_decoder import (
    PROMPT_ALIGN,
    PointDecoder,
    batch_memory_bytes,
    has_sam,
    prompts_per_batch,
)

#: Level ids: SAM's multimask output index (0 sub-part, 1 part, 2 whole).
SUB_PART, PART, WHOLE = 0, 1, 2


@dataclass
class QuasiSuperpixels:
    """The quasi-superpixels of one image, in output order: wholes, kept parts, kept sub-parts."""

    masks: np.ndarray
    """(S, H, W) bool."""
    levels: np.ndarray
    """(S,) uint8: 0 sub-part, 1 part, 2 whole."""
    predicted_iou: np.ndarray
    """(S,) float32, SAM's raw predicted IoU (no level offset)."""
    stability_score: np.ndarray
    """(S,) float32."""
    bbox_xywh: np.ndarray
    """(S, 4) int64, inclusive max index (a 1-pixel mask has width 0)."""
    point_coords: np.ndarray
    """(S, 2) float64, the prompt point (x, y) in image pixels."""
    crop_box_xywh: np.ndarray
    """(S, 4) int64, the crop the mask was predicted in."""

    _DTYPES = {
        "masks": np.bool_, "levels": np.uint8, "predicted_iou": np.float32,
        "stability_score": np.float32, "bbox_xywh": np.int64, "point_coords": np.float64,
        "crop_box_xywh": np.int64,
    }

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fields as a dict of arrays (the layout of a ``sam_masks.zarr`` group)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "QuasiSuperpixels":
        """Inverse of :meth:`to_arrays`; extra keys are ignored, dtypes are normalised."""
        missing = [name for name in cls._DTYPES if name not in arrays]
        if missing:
            raise KeyError(f"quasi-superpixel arrays lack {', '.join(missing)}")
        return cls(**{name: np.asarray(arrays[name]).astype(dtype, copy=False)
                      for name, dtype in cls._DTYPES.items()})

    @classmethod
    def empty(cls, height: int, width: int) -> "QuasiSuperpixels":
        """No masks (S = 0) for an image of the given size."""
        return cls(
            masks=np.zeros((0, height, width), bool), levels=np.zeros(0, np.uint8),
            predicted_iou=np.zeros(0, np.float32), stability_score=np.zeros(0, np.float32),
            bbox_xywh=np.zeros((0, 4), np.int64), point_coords=np.zeros((0, 2), np.float64),
            crop_box_xywh=np.zeros((0, 4), np.int64),
        )


def _box_from_profiles(in_height: torch.Tensor, in_width: torch.Tensor) -> torch.Tensor:
    """(N, 4) int64 XYXY boxes (inclusive max) from per-mask row and column occupancy (N, H) and
    (N, W) bool; [0, 0, 0, 0] for an empty mask: segment-anything's ``batched_mask_to_box``
    after its two max reductions (the first and last occupied column and row), in a few ops."""
    h, w = in_height.shape[-1], in_width.shape[-1]
    profiles = torch.cat([in_width, in_height], -1).view(torch.uint8)
    # argmax gives the first maximum: the first occupied index, and in the flipped profiles
    # (rows reversed, then columns reversed) the last.
    flipped = profiles.flip(-1)
    boxes = torch.stack([profiles[:, :w].argmax(-1), profiles[:, w:].argmax(-1),
                         (w - 1) - flipped[:, h:].argmax(-1),
                         (h - 1) - flipped[:, :h].argmax(-1)], -1)
    return boxes * in_height.any(-1, keepdim=True)


def occupation_filter(masks: torch.Tensor | np.ndarray, levels: torch.Tensor | np.ndarray,
                      thresh: float, boxes: torch.Tensor | np.ndarray | None = None,
                      ) -> torch.Tensor:
    """Indices of the masks kept by the occupation filter, in output order (§1, change 3).

    ``masks`` (S, H, W) bool, ``levels`` (S,). All wholes are selected; then for level 1 and then
    level 0, a candidate c is kept iff ``max_s |c ∩ s| / |c| < thresh`` over the masks s selected
    so far (each one separately, not their union; candidates of one level are never tested
    against each other), and the kept ones join the selection. A level met with an empty
    selection is taken whole. Order within a level is preserved.

    ``thresh`` is the paper's t_r (0.3): the largest fraction of a candidate that may already be
    covered by any one selected mask.

    ``boxes`` (S, 4) XYXY with inclusive max (``batched_mask_to_box``'s, computed when absent)
    must hold every pixel of each non-empty mask; an empty mask's box may be anything. Each
    candidate is intersected only within its box and only with the selected masks whose boxes
    overlap it: the same integer counts as over the whole image, at a fraction of the work.
    """
    masks = torch.as_tensor(masks)
    device = masks.device
    if device.type != "cpu":
        return occupation_filter_batched(masks, torch.as_tensor(levels, device=device), thresh)
    levels = torch.as_tensor(levels).to(torch.int64).cpu().numpy()
    if boxes is None:
        boxes = batched_mask_to_box(masks)
    boxes = torch.as_tensor(boxes).to(torch.int64).cpu().numpy().reshape(-1, 4)
    selected = np.flatnonzero(levels == WHOLE)
    for level in (PART, SUB_PART):
        candidates = np.flatnonzero(levels == level)
        if len(selected) and len(candidates):
            sel_boxes = boxes[selected]
            max_inter, area = [], []
            for c in candidates.tolist():
                x0, y0, x1, y1 = boxes[c].tolist()
                window = masks[c, y0:y1 + 1, x0:x1 + 1]
                area.append(window.sum())
                hits = selected[(sel_boxes[:, 0] <= x1) & (sel_boxes[:, 2] >= x0)
                                & (sel_boxes[:, 1] <= y1) & (sel_boxes[:, 3] >= y0)]
                if len(hits):
                    others = masks[torch.as_tensor(hits, device=device), y0:y1 + 1, x0:x1 + 1]
                    max_inter.append((others & window).sum((1, 2)).amax())
                else:
                    max_inter.append(area[-1] * 0)
            # max_s(|c ∩ s| / |c|) = max_s|c ∩ s| / |c| (division is monotonic); an empty
            # candidate gives 0/0 = nan and is dropped, as the per-pair ratio would be.
            occupation = (torch.stack(max_inter).to(torch.float64)
                          / torch.stack(area).to(torch.float64))
            candidates = candidates[(occupation < thresh).cpu().numpy()]
        selected = np.concatenate([selected, candidates])
    return torch.as_tensor(selected, dtype=torch.int64, device=device)


def occupation_filter_batched(masks: torch.Tensor, levels: torch.Tensor, thresh: float,
                              ) -> torch.Tensor:
    """:func:`occupation_filter` in a fixed number of ops, on the masks' device.

    Every intersection count of a candidate level with the masks selected before it comes from
    one matrix product of the flattened masks (0/1 in float32: the products and their sums are
    integers, exact below 2**24 pixels; float64 above). The CPU's box-window loop reads far
    fewer pixels, which is what counts there; a device does the whole product faster than the
    loop's launches. The level sizes are the one value read back before the last.
    """
    levels = levels.to(torch.int64)
    device = masks.device
    # Wholes, then parts, then sub-parts, each in mask order.
    rank = WHOLE - levels
    order = torch.sort(rank, stable=True).indices
    n_whole, n_part, n_sub = torch.bincount(rank, minlength=3).tolist()
    height, width = masks.shape[-2:]
    dtype = torch.float32 if height * width < 2**24 else torch.float64
    flat = masks.flatten(1)[order].to(dtype)
    area = flat.sum(1).to(torch.float64)

    def occupation(candidates: slice, selected: torch.Tensor, weights=None) -> torch.Tensor:
        # max_s(|c ∩ s| / |c|) = max_s|c ∩ s| / |c| (division is monotonic); an empty
        # candidate gives 0/0 = nan and is dropped, as the per-pair ratio would be.
        inter = flat[candidates] @ selected.T
        if weights is not None:  # selected masks that were dropped count 0 (counts are >= 0)
            inter = inter * weights
        return inter.amax(1).to(torch.float64) / area[candidates]

    keep_part = torch.ones(n_part, dtype=torch.bool, device=device)
    if n_whole and n_part:
        keep_part = occupation(slice(n_whole, n_whole + n_part), flat[:n_whole]) < thresh
    keep_sub = torch.ones(n_sub, dtype=torch.bool, device=device)
    if n_sub and n_whole + n_part:
        # With no wholes the parts were taken whole: the selection is empty only without both.
        weights = torch.cat([keep_part.new_ones(n_whole), keep_part]).to(dtype)
        keep_sub = occupation(slice(n_whole + n_part, None), flat[:n_whole + n_part],
                              weights) < thresh
    keep = torch.cat([keep_part.new_ones(n_whole), keep_part, keep_sub])
    return order[torch.nonzero(keep).flatten()]


def _clean_window(window: np.ndarray, min_area: int, exterior: tuple[bool, bool, bool, bool],
                  exact_ties: bool) -> tuple[np.ndarray, bool] | None:
    """Holes then islands of one mask seen through a window of the image (bool (h, w)).

    ``exterior`` (top, bottom, left, right): the window sides beyond which the image goes on;
    the mask is empty along those sides, and every background region touching one of them
    continues outside the window and is known to be at least ``min_area`` pixels there (the
    caller checks), so it is never a hole. Returns the cleaned window and whether it changed, or
    None when every island is small and several share the largest area: which one survives then
    depends on OpenCV's label order over the whole image (unless ``exact_ties``: the window is
    the whole image).
    """
    changed = False
    for holes in (True, False):
        n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(
            (window ^ holes).astype(np.uint8), connectivity=8)
        small = stats[1:, cv2.CC_STAT_AREA] < min_area
        if holes and any(exterior) and small.any():
            outside = np.zeros(n_labels, bool)
            top, bottom, left, right = exterior
            for side, edge in ((top, regions[0]), (bottom, regions[-1]), (left, regions[:, 0]),
                               (right, regions[:, -1])):
                if side:
                    outside[edge] = True
            small &= ~outside[1:]
        if not small.any():
            continue
        changed = True
        if holes:
            lut = np.concatenate([[True], small])  # label 0 is the mask itself
        else:
            lut = np.concatenate([[False], ~small])
            if not lut.any():
                areas = stats[1:, cv2.CC_STAT_AREA]
                if not exact_ties and np.count_nonzero(areas == areas.max()) > 1:
                    return None
                lut[int(np.argmax(areas)) + 1] = True
        window = lut[regions]
    return window, changed


def _remove_small_regions_boxed(crops: Sequence[np.ndarray], boxes: np.ndarray, min_area: int,
                                height: int, width: int,
                                ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """segment-anything's holes-then-islands clean-up of masks given as box crops.

    ``crops[i]`` is mask i inside ``boxes[i]`` (XYXY, inclusive max; for an empty mask any
    box, its crop all False). Each mask is cleaned in its box grown by one pixel (the ring is
    background, so every region that leaves the window touches it), unless a piece of the image
    outside that window is smaller than ``min_area`` (a region through it could then be a small
    hole) or a tie needs OpenCV's whole-image label order: then in the whole image.

    Returns the cleaned crops, their boxes (``batched_mask_to_box``'s: [0, 0, 0, 0] when empty)
    and ``changed`` (S,) bool.
    """
    out_crops, out_boxes, changed = [], boxes.copy(), np.zeros(len(crops), bool)
    for i, crop in enumerate(crops):
        x0, y0, x1, y1 = boxes[i].tolist()
        if not crop.any():
            x0 = y0 = x1 = y1 = 0
        wy0, wy1, wx0, wx1 = max(y0 - 1, 0), min(y1 + 2, height), max(x0 - 1, 0), min(x1 + 2, width)
        exterior = (wy0 > 0, wy1 < height, wx0 > 0, wx1 < width)
        # The image outside the window, in bands: above and below (full width), left and right
        # (window rows). 8-connected, a band above or below meets the side bands at the window's
        # corners; the bands above and below, or left and right, meet only through another.
        top, bottom = wy0 * width, (height - wy1) * width
        left, right = wx0 * (wy1 - wy0), (width - wx1) * (wy1 - wy0)
        if (left or right) and (top or bottom):
            pieces = [top + bottom + left + right]
        else:
            pieces = [top, bottom, left, right]
        result = None
        if all(p == 0 or p >= min_area for p in pieces):
            window = np.zeros((wy1 - wy0, wx1 - wx0), bool)
            window[y0 - wy0:y1 - wy0 + 1, x0 - wx0:x1 - wx0 + 1] = crop
            result = _clean_window(window, min_area, exterior, exact_ties=False)
        if result is None:
            wy0, wy1, wx0, wx1 = 0, height, 0, width
            window = np.zeros((height, width), bool)
            window[y0:y1 + 1, x0:x1 + 1] = crop
            result = _clean_window(window, min_area, (False,) * 4, exact_ties=True)
        window, changed[i] = result
        if not changed[i]:
            out_crops.append(crop)
            out_boxes[i] = (x0, y0, x1, y1)
            continue
        rows, cols = np.flatnonzero(window.any(1)), np.flatnonzero(window.any(0))
        if not len(rows):
            out_crops.append(np.zeros((1, 1), bool))
            out_boxes[i] = 0
            continue
        out_crops.append(window[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
        out_boxes[i] = (wx0 + cols[0], wy0 + rows[0], wx0 + cols[-1], wy0 + rows[-1])
    return out_crops, out_boxes, changed


def remove_small_regions(masks: torch.Tensor, min_area: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill holes, then drop islands, smaller than ``min_area`` pixels (8-connectivity).

    Same result as segment-anything's ``amg.remove_small_regions`` (mode "holes", then
    "islands"; an all-small mask keeps its largest island), computed in each mask's box (see
    :func:`_remove_small_regions_boxed`). Returns the cleaned masks (S, H, W) bool and
    ``changed`` (S,) bool, on the masks' device.
    """
    height, width = masks.shape[-2:]
    boxes = batched_mask_to_box(masks).to(torch.int64).cpu().numpy().reshape(-1, 4)
    host = masks.cpu().numpy()
    crops = [host[i, y0:y1 + 1, x0:x1 + 1] for i, (x0, y0, x1, y1) in enumerate(boxes.tolist())]
    crops, boxes, changed = _remove_small_regions_boxed(crops, boxes, min_area, height, width)
    out = masks.clone()
    for i in np.flatnonzero(changed).tolist():
        x0, y0, x1, y1 = boxes[i].tolist()
        out[i] = False
        out[i, y0:y1 + 1, x0:x1 + 1] = torch.from_numpy(crops[i]).to(masks.device)
    return out, torch.from_numpy(changed).to(masks.device)


class QuasiSuperpixelGenerator:
    """SAM "everything" mode with level-aware thresholds, NMS and an occupation filter.

    ``predictor`` is any object with segment-anything's ``SamPredictor`` interface (set_image,
    reset_image, transform.apply_coords, predict_torch, device, model.mask_threshold). When its
    ``model`` is a segment-anything ``Sam``, the decoder runs through
    :class:`~pipeline.sam.point_decoder.PointDecoder` (same results, less work and memory).
    """

    def __init__(
        self,
        predictor,
        points_per_side: int = 32,
        points_per_batch: int = 256,
        pred_iou_thresh: float = 0.86,
        stability_score_thresh: float = 0.92,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 1,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 2,
        min_mask_region_area: int = 100,
        score_thresh_offset: Sequence[float] = (0.0, 0.0, 0.1),
        score_nms_offset: Sequence[float] = (0.0, 0.0, 1.0),
        stability_score_bias: Sequence[float] = (0.0, 0.0, 0.0),
        occupation_thresh: float = 0.3,
        max_batch_memory_mb: float | str | None = None,
        precision: str = "fp32",
        batched: bool | None = None,
    ) -> None:
        """
        Arguments:
          points_per_side: prompt grid of the full image is points_per_side²
            (``linspace(o, 1-o, n)``, o = 1/(2n), x fastest).
          points_per_batch: points per predictor call (at most; see ``max_batch_memory_mb``).
          pred_iou_thresh: keep a mask iff ``iou + score_thresh_offset[level] > thresh``
            (strict); the test is skipped when ``thresh <= 0``.
          stability_score_thresh: keep a mask iff ``stability + stability_score_bias[level] >=
            thresh``; skipped when ``thresh <= 0``.
          stability_score_offset: logit offset around the mask threshold for the stability score.
          box_nms_thresh: box IoU above which the within-crop NMS drops the lower-scored mask.
          crop_n_layers: crop layers after the full image (layer i has (2**i)² crops).
          crop_nms_thresh: box IoU of the cross-crop NMS (masks from smaller crops win).
          crop_overlap_ratio: crop overlap as a fraction of the image's short side (layer 1).
          crop_n_points_downscale_factor: crop layer i uses points_per_side / factor**i points.
          min_mask_region_area: holes, then islands, smaller than this are removed (0: off);
            changed masks are re-NMSed at ``max(box_nms_thresh, crop_nms_thresh)``.
          score_thresh_offset: per-level (sub-part, part, whole) offset added to the predicted
            IoU for the IoU threshold only (paper: wholes +0.1, i.e. they pass at 0.76).
          score_nms_offset: per-level offset added to the predicted IoU as the within-crop NMS
            score (paper: wholes +1.0, so every whole outranks every part of its crop).
          stability_score_bias: per-level offset added to the stability score for its threshold.
          occupation_thresh: the occupation filter's t_r (strict ``<``), see
            :func:`occupation_filter`.
          max_batch_memory_mb: working memory (MiB) of one prompt batch through a real SAM's
            decoder: the batch is the largest that fits (at least 4, at most
            ``points_per_batch``); also of one image encoder pass, which takes as many of the
            image's crops as fit (at least one, :mod:`pipeline.sam.image_encoder`). None or ``"auto"``: half the free memory of a CUDA device,
            1024 MiB elsewhere (:func:`~pipeline.sam.point_decoder.batch_memory_bytes`).
            Results do not depend on it. Predictors without a ``Sam`` always use
            ``points_per_batch``.
          precision: ``fp32`` or ``bf16``: autocast of SAM's image encoder and mask decoder
            (:func:`pipeline.precision.autocast`); filters, NMS and clean-up stay float32.
          batched: post-process all masks of a batch, crop or image at once on the predictor's
            device (a fixed number of ops per batch: what a GPU needs) rather than mask by mask
            in box crops (far less memory traffic: what a CPU needs). None: batched on any
            device but the CPU. Both give the same quasi-superpixels.
        """
        self.predictor = predictor
        self.point_grids = build_all_layer_point_grids(
            points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.score_thresh_offset = torch.tensor(score_thresh_offset, dtype=torch.float32)
        self.score_nms_offset = torch.tensor(score_nms_offset, dtype=torch.float32)
        self.stability_score_bias = torch.tensor(stability_score_bias, dtype=torch.float32)
        self.occupation_thresh = occupation_thresh
        self.max_batch_memory_mb = max_batch_memory_mb
        autocast("cpu", precision)  # validates the name now rather than at the first image
        self.precision = precision
        self.batched = batched
        self._device_constants: dict[str, tuple[torch.Tensor, ...]] = {}

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> QuasiSuperpixels:
        """The quasi-superpixels of ``image`` (H, W, 3) uint8 RGB."""
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = _concat([crop for group in self._encoded(image, crop_boxes, layer_idxs)
                        for crop in self._process_crops(image, group, orig_size)])

        if len(crop_boxes) > 1:
            # Prefer masks from smaller crops (segment-anything's rule; level plays no part).
            scores = 1 / box_area(data["crop_boxes"])
            data = _take(data, _nms(data["boxes"], scores, self.crop_nms_thresh))

        if self.min_mask_region_area > 0 and len(data["levels"]):
            data = self._clean_small_regions(data, orig_size)

        if not len(data["levels"]):
            return QuasiSuperpixels.empty(*orig_size)
        if "masks" in data:
            masks = data.pop("masks")
            keep = occupation_filter_batched(masks, data["levels"], self.occupation_thresh)
        else:
            masks = _paste(data.pop("crops"), data["boxes"], orig_size, data["levels"].device)
            keep = occupation_filter(masks, data["levels"], self.occupation_thresh,
                                     boxes=data["boxes"])
        return _to_quasi_superpixels(_take(data, keep), masks[keep])

    def _is_batched(self, device: torch.device) -> bool:
        return device.type != "cpu" if self.batched is None else self.batched

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``score_thresh_offset``, ``score_nms_offset``, ``stability_score_bias`` and the
        :func:`stability_thresholds` on ``device``, copied there once."""
        key = str(device)
        if key not in self._device_constants:
            thresholds = stability_thresholds(self.predictor.model.mask_threshold,
                                              self.stability_score_offset)
            table = torch.stack([self.score_thresh_offset, self.score_nms_offset,
                                 self.stability_score_bias, thresholds]).to(device)
            self._device_constants[key] = tuple(table)
        return self._device_constants[key]

    def _encoded(self, image: np.ndarray, crop_boxes: list, layers: list) -> Iterator[list]:
        """The crops in groups encoded together, in order: lists of (crop box, layer index,
        image embedding and input size or None). With a real ``Sam`` the crops (the whole image
        first) go through the image encoder several at a time, as many as
        ``max_batch_memory_mb`` allows (:mod:`pipeline.sam.image_encoder`: the same bits as one
        at a time); a group of one, and every crop of other predictors, gets None:
        ``set_image`` then encodes it (through any wrapper of the predictor)."""
        per_pass = 1
        if has_sam(self.predictor):
            budget = batch_memory_bytes(self.max_batch_memory_mb, self.predictor.device)
            per_pass = crops_per_pass(budget, self.predictor.model, len(crop_boxes))
        for start in range(0, len(crop_boxes), per_pass):
            boxes, group_layers = crop_boxes[start:start + per_pass], layers[start:start + per_pass]
            if per_pass == 1:
                yield [(boxes[0], group_layers[0], None)]
                continue
            encoded = self._encode([image[y0:y1, x0:x1, :] for x0, y0, x1, y1 in boxes])
            yield list(zip(boxes, group_layers, encoded))
            del encoded

    def _encode(self, crops: list[np.ndarray]) -> list[tuple]:
        """:func:`~pipeline.sam.image_encoder.encode_crops` of ``crops`` in one encoder pass."""
        with autocast(self.predictor.device, self.precision):
            return encode_crops(self.predictor, crops)

    def _process_crops(self, image, group: list, orig_size) -> list[dict]:
        """The masks of each crop of ``group`` (see :meth:`_encoded`), by crop. Crops encoded
        together have their prompts decoded together (:meth:`_decode_together`)."""
        if len(group) > 1:
            return self._decode_together(group, orig_size)
        (crop_box, layer_idx, _), = group
        return [self._process_crop(image, crop_box, layer_idx, orig_size)]

    def _crop_frame(self, crop_box, layer_idx, orig_size) -> tuple:
        """A crop's size, prompt points (crop frame) and frame tensor (:func:`_near_crop_edge`)."""
        x0, y0, x1, y1 = crop_box
        crop_size = (y1 - y0, x1 - x0)
        points_for_image = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
        # One copy for the crop: its box shift, the crop box and the image box.
        frame = torch.tensor([[x0, y0, x0, y0], crop_box, [0, 0, orig_size[1], orig_size[0]]],
                             dtype=torch.int64, device=self.predictor.device)
        return crop_size, points_for_image, frame

    def _decode_together(self, group: list, orig_size) -> list[dict]:
        """The masks of each crop of a group encoded together: their prompts go through the
        decoder packed into as few batches as ``max_batch_memory_mb`` allows (a batch holds
        several crops' prompts, :meth:`PointDecoder.predict_images`: each crop's bits), then
        each crop's masks are post-processed in its own frame, as :meth:`_process_crop` does."""
        crops = [self._crop_frame(box, layer, orig_size) for box, layer, _ in group]
        sam = self.predictor.model
        with autocast(self.predictor.device, self.precision):
            decoder = PointDecoder.of_images(sam, [(features, input_size, crop[0]) for
                                                   (_, _, (features, input_size)), crop
                                                   in zip(group, crops)])
        largest = max((crop[0] for crop in crops), key=lambda size: size[0] * size[1])
        budget = batch_memory_bytes(self.max_batch_memory_mb, decoder.device)
        batch_size = prompts_per_batch(budget, sam, largest, self.points_per_batch)
        pieces = [[] for _ in crops]
        for batch in _pack_prompts([len(points) for _, points, _ in crops], batch_size):
            groups = [(c, self.predictor.transform.apply_coords(crops[c][1][a:z], crops[c][0]))
                      for c, a, z in batch]
            outputs = self._predict_together(decoder, groups)
            for (c, a, z), (iou_preds, index, logits) in zip(batch, outputs):
                pieces[c].append(self._postprocess_batch(crops[c][1][a:z], iou_preds, index,
                                                         logits, crops[c][2]))
        del decoder
        return [self._finish_crop(_concat(parts), frame, box, orig_size)
                for parts, (_, _, frame), (box, _, _) in zip(pieces, crops, group)]

    def _predict_together(self, decoder: PointDecoder, groups: list) -> list[tuple]:
        """:meth:`PointDecoder.predict_images` of one packed batch, with the IoU test."""
        with autocast(self.predictor.device, self.precision):
            return decoder.predict_images(groups, self._iou_survivors)

    def _process_crop(self, image, crop_box, layer_idx, orig_size) -> dict:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        crop_size, points_for_image, frame = self._crop_frame(crop_box, layer_idx, orig_size)
        with autocast(self.predictor.device, self.precision):
            self.predictor.set_image(cropped)
            decoder = PointDecoder(self.predictor) if has_sam(self.predictor) else None
        batch_size = self.points_per_batch
        if decoder is not None:
            budget = batch_memory_bytes(self.max_batch_memory_mb, decoder.device)
            batch_size = prompts_per_batch(budget, self.predictor.model, crop_size,
                                           self.points_per_batch)
        batches = [self._process_batch(points, crop_size, frame, decoder)
                   for (points,) in batch_iterator(batch_size, points_for_image)]
        del decoder
        self.predictor.reset_image()
        return self._finish_crop(_concat(batches), frame, crop_box, orig_size)

    def _finish_crop(self, data: dict, frame: torch.Tensor, crop_box, orig_size) -> dict:
        """A crop's within-crop NMS and uncropping."""
        # Whole-first NMS (change 2): the level offset only ranks, it is not stored.
        nms_scores = data["iou_preds"] + self._constants(frame.device)[1][data["levels"]]
        data = _take(data, _nms(data["boxes"], nms_scores, self.box_nms_thresh))

        # segment-anything's uncrop_boxes_xyxy and uncrop_points. Box crops stay box-relative;
        # batched masks go to image size.
        data["boxes"] = data["boxes"] + frame[0]
        data["points"] = data["points"] + frame[0, :2]
        data["crop_boxes"] = frame[1].expand(len(data["levels"]), 4)
        if "masks" in data:
            data["masks"] = _uncrop_masks(data["masks"], crop_box, orig_size)
        return data

    def _iou_survivors(self, iou_preds: torch.Tensor) -> torch.Tensor:
        """(B, levels) bool: the masks that pass the IoU test with their level offsets."""
        if self.pred_iou_thresh <= 0.0:
            return torch.ones_like(iou_preds, dtype=torch.bool)
        return iou_preds + self._constants(iou_preds.device)[0] > self.pred_iou_thresh

    def _predict(self, points, crop_size, decoder):
        """IoU predictions (B, levels) float32, the IoU survivors' flat indices (point-major,
        level-minor), and float32 logits: (K, H, W) of the survivors in that order, or
        (B * levels, H, W) of every mask (the survivors are then read at their indices, not
        copied out)."""
        transformed = self.predictor.transform.apply_coords(points, crop_size)
        in_points = torch.as_tensor(transformed, device=self.predictor.device)
        with autocast(self.predictor.device, self.precision):
            if decoder is not None:
                # The IoU test runs inside: only survivors are upscaled and upsampled.
                return decoder.predict(in_points, self._iou_survivors)
            in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
            logits, iou_preds, _ = self.predictor.predict_torch(
                in_points[:, None, :], in_labels[:, None], multimask_output=True,
                return_logits=True)
        iou_preds = iou_preds.float()
        index = torch.nonzero(self._iou_survivors(iou_preds).flatten()).flatten()
        return iou_preds, index, logits.flatten(0, 1).float()

    def _process_batch(self, points, crop_size, frame, decoder) -> dict:
        return self._postprocess_batch(points, *self._predict(points, crop_size, decoder), frame)

    def _postprocess_batch(self, points, iou_preds, index, logits, frame) -> dict:
        """Stability, boxes, filters of a prompt batch's masks (:meth:`_predict`'s outputs) in
        the crop ``frame``."""
        n_levels = iou_preds.shape[1]
        device = iou_preds.device
        # Point-major, level-minor: p0L0, p0L1, p0L2, p1L0, ...
        levels = index % n_levels
        mask_threshold = self.predictor.model.mask_threshold
        every_row = len(logits) == len(index)
        if self._is_batched(device):
            stability, boxes, masks = threshold_logits_batched(
                logits, None if every_row else index, mask_threshold,
                self.stability_score_offset, self._constants(device)[3])
        else:
            rows = torch.arange(len(index), device=device) if every_row else index
            stability, boxes, crops = threshold_logits(logits, rows, mask_threshold,
                                                       self.stability_score_offset)
        keep = torch.ones_like(stability, dtype=torch.bool)
        if self.stability_score_thresh > 0.0:
            keep = stability + self._constants(device)[2][levels] >= self.stability_score_thresh
        keep &= ~_near_crop_edge(boxes, frame)
        keep = torch.nonzero(keep).flatten()
        index = index[keep]
        points = torch.as_tensor(points, device=device)
        data = dict(iou_preds=iou_preds.flatten()[index], levels=levels[keep], boxes=boxes[keep],
                    stability_score=stability[keep],
                    points=points[torch.div(index, n_levels, rounding_mode="floor")])
        if self._is_batched(device):
            data["masks"] = masks[keep]
        else:
            data["crops"] = crops(keep.tolist())
        return data

    def _clean_small_regions(self, data: dict, orig_size) -> dict:
        if "masks" in data:
            return self._clean_small_regions_batched(data, orig_size)
        device = data["boxes"].device
        crops, boxes, changed = _remove_small_regions_boxed(
            _to_host(data["crops"]), data["boxes"].cpu().numpy(), self.min_mask_region_area,
            *orig_size)
        changed_rows = np.flatnonzero(changed).tolist()
        data["crops"] = list(data["crops"])
        for i, crop in zip(changed_rows, _to_device([crops[i] for i in changed_rows], device)):
            data["crops"][i] = crop
        data["boxes"] = torch.as_tensor(boxes, device=device)
        # Unchanged masks win the re-NMS over changed ones (segment-anything's scoring).
        scores = torch.as_tensor(~changed, device=device).to(torch.float32)
        return _take(data, _nms(data["boxes"], scores,
                                max(self.box_nms_thresh, self.crop_nms_thresh)))

    def _clean_small_regions_batched(self, data: dict, orig_size) -> dict:
        """The clean-up of image-size masks: OpenCV on the host, every mask in one copy there
        and the changed ones in one copy back."""
        masks, device = data["masks"], data["masks"].device
        host = masks.cpu().numpy()
        boxes = data["boxes"].cpu().numpy()
        crops, boxes, changed = _remove_small_regions_boxed(
            [host[i, y0:y1 + 1, x0:x1 + 1] for i, (x0, y0, x1, y1) in enumerate(boxes.tolist())],
            boxes, self.min_mask_region_area, *orig_size)
        rows = np.flatnonzero(changed)
        if len(rows):
            cleaned = np.zeros((len(rows), *orig_size), bool)
            for mask, i in zip(cleaned, rows.tolist()):
                x0, y0, x1, y1 = boxes[i].tolist()
                mask[y0:y1 + 1, x0:x1 + 1] = crops[i]
            masks = masks.index_put((torch.from_numpy(rows).to(device),),
                                    torch.from_numpy(cleaned).to(device))
        # Unchanged masks win the re-NMS over changed ones (segment-anything's scoring), here on
        # the host where the boxes are.
        host_boxes = torch.from_numpy(boxes)
        keep = _nms(host_boxes, torch.from_numpy(~changed).to(torch.float32),
                    max(self.box_nms_thresh, self.crop_nms_thresh))
        data = dict(data, masks=masks, boxes=host_boxes.to(device))
        return _take(data, keep.to(device))


def threshold_logits(logits: torch.Tensor, rows: torch.Tensor, mask_threshold: float,
                     offset: float):
    """Stability scores, boxes and box crops of the masks ``logits[rows] > mask_threshold``.

    ``logits`` (N, H, W) float, ``rows`` (K,) the planes to read. Returns ``stability`` (K,)
    float32 (segment-anything's ``calculate_stability_score``), ``boxes`` (K, 4) int64
    (``batched_mask_to_box`` of the masks) and ``crops``, a function of a list of positions in
    ``rows`` giving each one's mask inside its box ((1, 1) False for an empty mask), so that
    only the masks that pass the filters are cut out.

    Each plane is read in full once (its row maxima); its column maxima are taken over the rows
    of ``logits > mask_threshold - |offset|`` (which holds all three thresholded masks), and
    each stability count and the crop inside the box of its own thresholded mask. The counts
    are the same integers, hence the same scores.
    """
    device = logits.device
    height, width = logits.shape[-2:]
    rows = rows.tolist()
    if not rows:
        return (torch.zeros(0, device=device), torch.zeros((0, 4), dtype=torch.int64,
                                                           device=device), lambda keep: [])
    row_max = torch.stack([logits[r].amax(-1) for r in rows])
    if bool(torch.isnan(row_max).any()):
        # A NaN is never above a threshold but wins a max: take it out of the maxima.
        logits = torch.where(torch.isnan(logits), float("-inf"), logits)
        row_max = torch.stack([logits[r].amax(-1) for r in rows])
    outer = mask_threshold - abs(offset)
    in_rows = row_max > outer
    ys = torch.arange(height, device=device)
    bands = torch.stack([torch.where(in_rows, ys, height).amin(-1),
                         torch.where(in_rows, ys, -1).amax(-1)], 1).tolist()
    col_max = torch.stack([logits[r, y0:y1 + 1].amax(0) if y0 <= y1
                           else logits.new_full((width,), float("-inf"))
                           for r, (y0, y1) in zip(rows, bands)])
    boxes = _box_from_profiles(row_max > mask_threshold, col_max > mask_threshold)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    counts = []
    # Each count is taken in the box of its own mask (an empty one counts 0).
    for threshold in (mask_threshold + offset, mask_threshold - offset):
        above = row_max > threshold
        windows = _box_from_profiles(above, col_max > threshold).tolist()
        counts.append(torch.stack([
            (logits[r, y0:y1 + 1, x0:x1 + 1] > threshold).sum() if filled else zero
            for r, filled, (x0, y0, x1, y1) in zip(rows, above.any(-1).tolist(), windows)]))
    stability = counts[0].to(torch.int32) / counts[1].to(torch.int32)

    def crops(keep: list[int]) -> list[torch.Tensor]:
        kept_boxes = boxes[keep].tolist() if keep else []
        return [logits[rows[i], y0:y1 + 1, x0:x1 + 1] > mask_threshold
                for i, (x0, y0, x1, y1) in zip(keep, kept_boxes)]

    return stability, boxes, crops


def stability_thresholds(mask_threshold: float, offset: float, device=None) -> torch.Tensor:
    """(3,) float32: the thresholds of a stability score's two masks and of the mask itself
    (``mask_threshold + offset``, ``- offset``, ``+ 0``). A float32 tensor compared with a Python
    float compares in float32, so these compare as the scalars do."""
    return torch.tensor([mask_threshold + offset, mask_threshold - offset, mask_threshold],
                        dtype=torch.float32, device=device)


def threshold_logits_batched(logits: torch.Tensor, rows: torch.Tensor | None,
                             mask_threshold: float, offset: float,
                             thresholds: torch.Tensor | None = None):
    """:func:`threshold_logits` in a fixed number of ops, on the logits' device.

    ``rows`` None: every plane of ``logits``. ``thresholds``: :func:`stability_thresholds` of
    ``mask_threshold`` and ``offset``, already on the device (made here when None: one copy).
    Returns ``stability`` (K,) float32, ``boxes`` (K, 4) int64 and the thresholded masks
    (K, H, W) bool, whole: the stability counts are segment-anything's comparisons summed over
    each whole plane (a NaN is above no threshold), the boxes its ``batched_mask_to_box`` of the
    masks' row and column occupancy. Each plane is compared three times where the CPU's windows
    read little more than once, but in one op for all planes and thresholds.
    """
    planes = logits if rows is None else logits.index_select(0, rows)
    if thresholds is None:
        thresholds = stability_thresholds(mask_threshold, offset, planes.device)
    above = planes.unsqueeze(0) > thresholds[:, None, None, None]
    counts = above[:2].sum((-2, -1)).to(torch.int32)
    stability = counts[0] / counts[1]
    masks = above[2]
    return stability, _box_from_profiles(masks.any(-1), masks.any(-2)), masks


def _near_crop_edge(boxes: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``is_box_near_crop_edge`` of crop-frame ``boxes`` (K, 4) int64, with
    ``frame`` (3, 4) int64 on their device: the box shift of the crop, the crop box and the image
    box. Its ``isclose(atol=20, rtol=0)`` of float32 coordinates, as a difference of integers."""
    uncropped = (boxes + frame[0]).float()
    near = (uncropped[:, None, :] - frame[1:]).abs() <= 20  # (K, 2: crop, image, 4)
    return (near[:, 0] & ~near[:, 1]).any(1)


def _uncrop_masks(masks: torch.Tensor, crop_box: Sequence[int], size) -> torch.Tensor:
    """segment-anything's ``uncrop_masks``: crop-frame masks (K, h, w) at image size (K, H, W)."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, size[1], size[0]):
        return masks
    out = masks.new_zeros((len(masks), *size))
    out[:, y0:y1, x0:x1] = masks
    return out


def _pack_prompts(counts: Sequence[int], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Decoder batches over several crops' prompts, in order: lists of (crop, start, stop).
    A batch holds up to ``batch_size`` prompts (a multiple of PROMPT_ALIGN), counting the
    padding that aligns each crop's part but the batch's last
    (:meth:`PointDecoder.predict_images`); a crop is split only at multiples of PROMPT_ALIGN."""
    batches, batch, used = [], [], 0
    for crop, count in enumerate(counts):
        start = 0
        while start < count:
            space = batch_size - used
            take = count - start
            if take > space:
                take = space - space % PROMPT_ALIGN
            if take <= 0:
                batches.append(batch)
                batch, used = [], 0
                continue
            batch.append((crop, start, start + take))
            used += take + (-take % PROMPT_ALIGN)
            start += take
    if batch:
        batches.append(batch)
    return batches


def _take(data: dict, keep: torch.Tensor) -> dict:
    """``data`` (columns: tensors with one row per mask, or lists) at the rows ``keep``."""
    rows = keep.tolist() if any(isinstance(v, list) for v in data.values()) else None
    return {key: [value[i] for i in rows] if isinstance(value, list)
            else value[keep.to(value.device)] for key, value in data.items()}


def _concat(parts: Sequence[dict]) -> dict:
    """One concatenation of all parts (concatenating part by part would copy per part)."""
    if len(parts) == 1:
        return dict(parts[0])
    return {key: ([item for part in parts for item in part[key]] if isinstance(value, list)
                  else torch.cat([part[key] for part in parts]))
            for key, value in parts[0].items()}


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's single-category box NMS, exactly as segment-anything calls it on the CPU.

    Boxes on another device are suppressed on the host (one copy each way): torchvision's
    ``batched_nms`` takes another path there above 1,000 boxes (on the CPU it re-sorts the kept
    boxes with an unstable sort, so tied scores, as in the cross-crop NMS, come out in another
    order), and CUDA's NMS reads its suppression mask back to the host anyway."""
    if boxes.device.type == "cpu":
        return batched_nms(boxes.float(), scores, torch.zeros(len(boxes)),
                           iou_threshold=iou_threshold)
    host = torch.cat([boxes.float(), scores.float()[:, None]], 1).cpu()
    keep = batched_nms(host[:, :4], host[:, 4], torch.zeros(len(host)),
                       iou_threshold=iou_threshold)
    return keep.to(boxes.device)


def _to_host(crops: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Box crops as numpy arrays, in one device-to-host copy."""
    if not crops or crops[0].device.type == "cpu":
        return [crop.numpy() for crop in crops]
    flat = torch.cat([crop.flatten() for crop in crops]).cpu().numpy()
    sizes = np.cumsum([crop.numel() for crop in crops])[:-1]
    return [part.reshape(crop.shape) for part, crop in zip(np.split(flat, sizes), crops)]


def _to_device(crops: Sequence[np.ndarray], device) -> list[torch.Tensor]:
    """Numpy box crops as tensors on ``device``, in one host-to-device copy."""
    if not crops:
        return []
    if torch.device(device).type == "cpu":
        return [torch.from_numpy(np.ascontiguousarray(crop)) for crop in crops]
    flat = torch.from_numpy(np.concatenate([crop.ravel() for crop in crops])).to(device)
    sizes = np.cumsum([crop.size for crop in crops])[:-1].tolist()
    return [part.view(crop.shape) for part, crop in zip(torch.tensor_split(flat, sizes), crops)]


def _paste(crops: Sequence[torch.Tensor], boxes: torch.Tensor, size, device) -> torch.Tensor:
    """(S, H, W) bool masks from their box crops."""
    masks = torch.zeros((len(crops), *size), dtype=torch.bool, device=device)
    for mask, crop, (x0, y0, x1, y1) in zip(masks, crops, boxes.tolist()):
        mask[y0:y1 + 1, x0:x1 + 1] = crop
    return masks


def _to_quasi_superpixels(data: dict, masks: torch.Tensor) -> QuasiSuperpixels:
    def xywh(xyxy: torch.Tensor) -> np.ndarray:
        xyxy = xyxy.to(torch.int64).cpu()
        return torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1).numpy()

    return QuasiSuperpixels(
        masks=masks.cpu().numpy(),
        levels=data["levels"].cpu().numpy().astype(np.uint8),
        predicted_iou=data["iou_preds"].cpu().numpy().astype(np.float32),
        stability_score=data["stability_score"].cpu().numpy().astype(np.float32),
        bbox_xywh=xywh(data["boxes"]),
        point_coords=data["points"].cpu().numpy().astype(np.float64),
        crop_box_xywh=xywh(data["crop_boxes"]),
    )
