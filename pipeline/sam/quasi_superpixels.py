"""Quasi-superpixels: SAM's automatic "everything" masks, made level-aware (algorithms.md §1).

The generator follows segment-anything's ``SamAutomaticMaskGenerator`` step for step (point grids,
crops, IoU and stability filters, box NMS, crop-edge rule, cross-crop NMS, small-region clean-up)
and reuses its pure helpers from ``segment_anything.utils.amg`` so that every unchanged step
matches it exactly. Three changes make the masks usable as quasi-superpixels:

1. the IoU threshold is tested on ``iou + score_thresh_offset[level]`` (more wholes survive);
2. the within-crop NMS is scored by ``iou + score_nms_offset[level]`` (wholes outrank parts);
3. after the clean-up, :func:`occupation_filter` drops parts and sub-parts that mostly lie inside
   an already selected mask.

Unlike the stock generator, masks stay dense boolean tensors throughout (no RLE round trips),
which is what makes the post-processing faster than stock on the same predictor. When the
predictor holds a real segment-anything ``Sam``, the network side runs through
:class:`pipeline.sam.point_decoder.PointDecoder` (the same numbers with less work: shared first
block, IoU test before the mask upscaling) in prompt batches chosen from a memory budget; any
other object with ``SamPredictor``'s interface goes through its ``predict_torch``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import torch
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from torchvision.ops.boxes import batched_nms, box_area

from pipeline.precision import autocast
from pipeline.sam.point_decoder import PointDecoder, has_sam, prompts_per_batch

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


def occupation_filter(masks: torch.Tensor | np.ndarray, levels: torch.Tensor | np.ndarray,
                      thresh: float) -> torch.Tensor:
    """Indices of the masks kept by the occupation filter, in output order (§1, change 3).

    ``masks`` (S, H, W) bool, ``levels`` (S,). All wholes are selected; then for level 1 and then
    level 0, a candidate c is kept iff ``max_s |c ∩ s| / |c| < thresh`` over the masks s selected
    so far (each one separately, not their union; candidates of one level are never tested
    against each other), and the kept ones join the selection. A level met with an empty
    selection is taken whole. Order within a level is preserved.

    ``thresh`` is the paper's t_r (0.3): the largest fraction of a candidate that may already be
    covered by any one selected mask.
    """
    masks = torch.as_tensor(masks)
    levels = torch.as_tensor(levels).to(device=masks.device, dtype=torch.int64)
    # Pixel counts are exact in float32 below 2**24 pixels per mask; the matmul does every
    # candidate-selected intersection of a level at once.
    flat = masks.flatten(1).to(torch.float32)
    area = flat.sum(1, dtype=torch.float64)
    selected = torch.nonzero(levels == WHOLE).flatten()
    for level in (PART, SUB_PART):
        candidates = torch.nonzero(levels == level).flatten()
        if len(selected) and len(candidates):
            inter = (flat[candidates] @ flat[selected].T).to(torch.float64)
            occupation = (inter / area[candidates, None]).amax(1)
            candidates = candidates[occupation < thresh]
        selected = torch.cat([selected, candidates])
    return selected


def remove_small_regions(masks: torch.Tensor, min_area: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill holes, then drop islands, smaller than ``min_area`` pixels (8-connectivity).

    Same result as segment-anything's ``amg.remove_small_regions`` (mode "holes", then
    "islands"; an all-small mask keeps its largest island), with a label lookup table instead of
    its per-label Python lists. Returns the cleaned masks (S, H, W) bool and ``changed`` (S,) bool.
    """
    out = masks.cpu().numpy().copy()
    changed = np.zeros(len(out), bool)
    # Connected components have no tensor op: two OpenCV calls per mask (holes, islands).
    for i in range(len(out)):
        for holes in (True, False):
            n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(
                (out[i] ^ holes).astype(np.uint8), connectivity=8)
            small = stats[1:, cv2.CC_STAT_AREA] < min_area
            if not small.any():
                continue
            changed[i] = True
            if holes:
                lut = np.concatenate([[True], small])  # label 0 is the mask itself
            else:
                lut = np.concatenate([[False], ~small])
                if not lut.any():
                    lut[int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) + 1] = True
            out[i] = lut[regions]
    return torch.from_numpy(out).to(masks.device), torch.from_numpy(changed)


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
        max_batch_memory_mb: float = 1024,
        precision: str = "fp32",
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
            decoder: the batch is the largest that fits (at least 1, at most
            ``points_per_batch``). Results do not depend on it. Predictors without a ``Sam``
            always use ``points_per_batch``.
          precision: ``fp32`` or ``bf16``: autocast of SAM's image encoder and mask decoder
            (:func:`pipeline.precision.autocast`); filters, NMS and clean-up stay float32.
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

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> QuasiSuperpixels:
        """The quasi-superpixels of ``image`` (H, W, 3) uint8 RGB."""
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = _concat([self._process_crop(image, crop_box, layer_idx, orig_size)
                        for crop_box, layer_idx in zip(crop_boxes, layer_idxs)])

        if len(crop_boxes) > 1:
            # Prefer masks from smaller crops (segment-anything's rule; level plays no part).
            scores = (1 / box_area(data["crop_boxes"])).to(data["boxes"].device)
            data.filter(_nms(data["boxes"], scores, self.crop_nms_thresh))

        if self.min_mask_region_area > 0 and len(data["levels"]):
            self._clean_small_regions(data)

        if not len(data["levels"]):
            return QuasiSuperpixels.empty(*orig_size)
        data.filter(occupation_filter(data["masks"], data["levels"], self.occupation_thresh))
        return _to_quasi_superpixels(data)

    def _process_crop(self, image, crop_box, layer_idx, orig_size) -> MaskData:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        crop_size = cropped.shape[:2]
        with autocast(self.predictor.device, self.precision):
            self.predictor.set_image(cropped)
            decoder = PointDecoder(self.predictor) if has_sam(self.predictor) else None
        batch_size = self.points_per_batch
        if decoder is not None:
            batch_size = prompts_per_batch(int(self.max_batch_memory_mb * 2**20),
                                           self.predictor.model, crop_size, self.points_per_batch)
        points_for_image = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
        batches = [self._process_batch(points, crop_size, crop_box, orig_size, decoder)
                   for (points,) in batch_iterator(batch_size, points_for_image)]
        del decoder
        self.predictor.reset_image()
        data = _concat(batches)

        # Whole-first NMS (change 2): the level offset only ranks, it is not stored.
        nms_scores = data["iou_preds"] + self.score_nms_offset.to(data["iou_preds"].device)[
            data["levels"]]
        data.filter(_nms(data["boxes"], nms_scores, self.box_nms_thresh))

        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["masks"] = uncrop_masks(data["masks"], crop_box, *orig_size)
        data["crop_boxes"] = torch.tensor([crop_box], dtype=torch.int64).repeat(
            len(data["levels"]), 1)
        return data

    def _iou_survivors(self, iou_preds: torch.Tensor) -> torch.Tensor:
        """(B, levels) bool: the masks that pass the IoU test with their level offsets."""
        if self.pred_iou_thresh <= 0.0:
            return torch.ones_like(iou_preds, dtype=torch.bool)
        return iou_preds + self.score_thresh_offset.to(iou_preds.device) > self.pred_iou_thresh

    def _predict(self, points, crop_size, decoder):
        """IoU predictions (B, levels) float32 and the logits of the IoU survivors: their flat
        indices (point-major, level-minor) and (K, H, W) float32 logits in that order."""
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
        # The per-mask filters commute, so the float logits are gathered once (IoU survivors)
        # and only boolean masks are filtered afterwards.
        logits = logits.flatten(0, 1)
        logits = logits if len(index) == len(logits) else logits[index]
        return iou_preds, index, logits.float()

    def _process_batch(self, points, crop_size, crop_box, orig_size, decoder) -> MaskData:
        orig_h, orig_w = orig_size
        iou_preds, index, logits = self._predict(points, crop_size, decoder)
        n_levels = iou_preds.shape[1]
        device = iou_preds.device
        # Point-major, level-minor: p0L0, p0L1, p0L2, p1L0, ...
        iou_preds = iou_preds.flatten(0, 1)
        levels = torch.arange(n_levels, device=device).repeat(len(points))
        mask_threshold = self.predictor.model.mask_threshold
        stability = calculate_stability_score(logits, mask_threshold,
                                              self.stability_score_offset)
        masks = logits > mask_threshold
        del logits
        keep = torch.ones_like(stability, dtype=torch.bool)
        if self.stability_score_thresh > 0.0:
            keep = stability + self.stability_score_bias.to(device)[levels[index]] >= \
                self.stability_score_thresh
        index, masks, stability = index[keep], masks[keep], stability[keep]
        # batched_mask_to_box returns float zeros for an empty batch; keep boxes integral.
        boxes = batched_mask_to_box(masks).to(torch.int64)
        keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            index, masks, stability, boxes = index[keep], masks[keep], stability[keep], boxes[keep]
        return MaskData(
            masks=masks, iou_preds=iou_preds[index], levels=levels[index], boxes=boxes,
            stability_score=stability,
            points=torch.as_tensor(points.repeat(n_levels, axis=0))[index.cpu()],
        )

    def _clean_small_regions(self, data: MaskData) -> None:
        masks, changed = remove_small_regions(data["masks"], self.min_mask_region_area)
        boxes = batched_mask_to_box(masks)
        # Unchanged masks win the re-NMS over changed ones (segment-anything's scoring).
        scores = (~changed).to(torch.float32)
        keep = _nms(boxes, scores, max(self.box_nms_thresh, self.crop_nms_thresh))
        data["masks"] = masks
        data["boxes"] = boxes
        data.filter(keep)


def _concat(parts) -> MaskData:
    """One concatenation of all parts (MaskData.cat would copy the growing data per part)."""
    keys = [key for key, _ in parts[0].items()]
    return MaskData(**{key: torch.cat([part[key] for part in parts]) for key in keys})


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's single-category box NMS, exactly as segment-anything calls it."""
    return batched_nms(boxes.float(), scores, torch.zeros(len(boxes), device=boxes.device),
                       iou_threshold=iou_threshold)


def _to_quasi_superpixels(data: MaskData) -> QuasiSuperpixels:
    def xywh(xyxy: torch.Tensor) -> np.ndarray:
        xyxy = xyxy.to(torch.int64).cpu()
        return torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1).numpy()

    return QuasiSuperpixels(
        masks=data["masks"].cpu().numpy(),
        levels=data["levels"].cpu().numpy().astype(np.uint8),
        predicted_iou=data["iou_preds"].cpu().numpy().astype(np.float32),
        stability_score=data["stability_score"].cpu().numpy().astype(np.float32),
        bbox_xywh=xywh(data["boxes"]),
        point_coords=data["points"].cpu().numpy().astype(np.float64),
        crop_box_xywh=xywh(data["crop_boxes"]),
    )
