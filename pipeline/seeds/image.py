"""Seeds of one image (§5) from its CAM arrays and quasi-superpixels, and their scores (§8).

The CAM arrays are those of a CAM store's group (:data:`pipeline.schemas.CAM_ARRAYS`): ``cam`` and
``fg_cls``, and ``cam_caa`` when CAA refined them, in which case the refined CAMs are seeded. With
ground truth, :func:`score_seed` gives the per-image confusion matrices of the seed, of every CAM
array at every background power, and of an all-background map; :class:`pipeline.seeds.totals.
SeedTotals` sums them over a split. :func:`seeds_for_image` does all of it for one image of the
stores (reads its CAMs and quasi-superpixels, writes its seed PNG: the ``seeds`` stage's task).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from pipeline.data.imageio import ImageReadError, read_label, write_palette_png
from pipeline.errors import PipelineError
from pipeline.metrics import cam_confusions, confusion_matrix
from pipeline.provenance import check_inputs
from pipeline.seeds.sams import image_scores, seed_or_fallback
from pipeline.store import ImageStore

#: The CAM arrays a store may hold, in the order they are scored.
CAM_KEYS = ("cam", "cam_caa")


class ImageSeed(NamedTuple):
    """The seed of one image and how it was made."""

    seed: np.ndarray
    """(H, W) uint8 labels: 0 background, c + 1 foreground class c."""
    fallback: bool
    """True when the image had no quasi-superpixel and the seed is a thresholded CAM argmax."""
    cam_key: str
    """The CAM array seeded: ``cam_caa`` when the store has it, else ``cam``."""


class SeedScores(NamedTuple):
    """Per-image confusion matrices ``[gt, pred]`` of a seed and of what it came from."""

    seed: np.ndarray
    """(K, K) of the seed."""
    cams: dict[str, np.ndarray]
    """CAM array (``cam``, ``cam_caa``) -> (n_powers, K, K), one per background power."""
    background: np.ndarray
    """(K, K) of an all-background map (the floor every score is read against)."""


def seeded_cam(cams: Mapping[str, np.ndarray]) -> str:
    """The CAM array that is seeded: the CAA-refined one when there is one."""
    return "cam_caa" if "cam_caa" in cams else "cam"


def seed_image(
    cams: Mapping[str, np.ndarray],
    masks: np.ndarray,
    levels: np.ndarray,
    image_hw: tuple[int, int],
    alpha: float,
    fallback_thresh: float = 0.5,
    image_id: str = "",
) -> ImageSeed:
    """SAMS seed of one image (:func:`pipeline.seeds.sams.seed_or_fallback`).

    Args:
        cams: the image's CAM arrays (``cam`` and/or ``cam_caa`` (P, h, w), ``fg_cls`` (P,)).
        masks: (S, H, W) bool quasi-superpixels (S = 0: the thresholded CAM argmax instead).
        levels: (S,) their levels.
        image_hw: (H, W) of the image.
        alpha: background exponent (``seeds.<which>.alpha``).
        fallback_thresh: ``seeds.fallback_thresh``.
        image_id: names the image in error messages.

    Raises:
        PipelineError: CAM channels and classes disagree, or masks of another size than the image.
    """
    cam_key = seeded_cam(cams)
    cam, fg_cls = cams[cam_key].astype(np.float32), cams["fg_cls"].astype(np.int64)
    if cam.ndim != 3 or cam.shape[0] != fg_cls.shape[0]:
        raise PipelineError(f"image {image_id}: {cam_key} {cam.shape} does not match "
                            f"fg_cls {fg_cls.shape}")
    hw = tuple(image_hw)
    if tuple(masks.shape[1:]) != hw:
        raise PipelineError(f"image {image_id}: quasi-superpixels are "
                            f"{masks.shape[1]}x{masks.shape[2]}, the image {hw[0]}x{hw[1]}")
    result = seed_or_fallback(cam, fg_cls, masks, levels, alpha, hw, fallback_thresh)
    return ImageSeed(result.seed, result.fallback, cam_key)


def score_seed(
    cams: Mapping[str, np.ndarray],
    seed: np.ndarray,
    gt: np.ndarray,
    bg_powers: tuple[float, ...],
    num_classes: int,
    image_id: str = "",
) -> SeedScores:
    """The confusion matrices of ``seed`` and of every CAM array of ``cams`` (§3 scores at each of
    ``bg_powers``) against ground truth ``gt`` (H, W); ``num_classes``: K = classes + 1."""
    hw = seed.shape
    if gt.shape != hw:
        raise PipelineError(f"image {image_id}: ground truth is {gt.shape}, image {hw}")
    fg_cls = cams["fg_cls"].astype(np.int64)
    return SeedScores(
        confusion_matrix(seed, gt, num_classes),
        {key: cam_confusions(image_scores(cams[key].astype(np.float32), hw), fg_cls, gt, bg_powers,
                             num_classes)
         for key in CAM_KEYS if key in cams},
        confusion_matrix(np.zeros(hw, np.uint8), gt, num_classes),
    )


class SeedOutcome(NamedTuple):
    """What one image adds to the totals (:class:`pipeline.seeds.totals.SeedTotals`)."""

    image_id: str
    fallback: bool
    """Seeded by the thresholded CAM argmax (no quasi-superpixel)."""
    missing_masks: bool
    """The image was not in the quasi-superpixel store."""
    cam_key: str
    """The CAM array seeded (``cam`` or ``cam_caa``)."""
    scores: SeedScores | None
    """Its confusion matrices; None without ground truth."""


class SeedsTask(NamedTuple):
    """One image's seeding work (plain data, so it can travel to a worker)."""

    image_id: str
    height: int
    width: int
    label: str | None
    """Its ground-truth label PNG; None: not scored."""
    out_png: str
    alpha: float
    fallback_thresh: float
    bg_powers: tuple[float, ...]
    num_classes: int
    cam_inputs: str | None = None
    """What the image's CAMs must have been computed from."""
    sam_inputs: str | None = None
    """What the image's quasi-superpixels must have been computed from."""


def seeds_for_image(stores: tuple[ImageStore, ImageStore], task: SeedsTask) -> SeedOutcome:
    """Seed one image of ``stores`` (its CAM store and quasi-superpixel store:
    ``pipeline.schemas.open_cams``, ``open_masks``), write its PNG, and score it against its
    ground truth if any."""
    cams, sam = stores
    hw = (task.height, task.width)
    if task.image_id not in cams:
        raise PipelineError(f"image {task.image_id} is not in the CAM store {cams.path} "
                            "(run the cams stage, or import-cams, for this split)")
    if task.cam_inputs is not None:
        check_inputs(cams, task.image_id, task.cam_inputs, "wsss cams")
    arrays = cams.read(task.image_id)
    if seeded_cam(arrays) not in arrays or "fg_cls" not in arrays:
        raise PipelineError(f"image {task.image_id} in {cams.path} lacks 'cam' or 'fg_cls'")
    attrs = cams.read_attrs(task.image_id)
    if "height" in attrs and (attrs["height"], attrs["width"]) != hw:
        raise PipelineError(f"image {task.image_id}: CAM store says {attrs['height']}x"
                            f"{attrs['width']}, the index {hw[0]}x{hw[1]}")
    missing = task.image_id not in sam
    if missing:
        masks, levels = np.zeros((0, *hw), bool), np.zeros(0, np.uint8)
    else:
        if task.sam_inputs is not None:
            check_inputs(sam, task.image_id, task.sam_inputs, "wsss sam-masks")
        qs = sam.read(task.image_id)
        masks, levels = qs["masks"], qs["levels"]
    seed = seed_image(arrays, masks, levels, hw, task.alpha, task.fallback_thresh, task.image_id)
    write_palette_png(task.out_png, seed.seed)
    scores = None
    if task.label is not None:
        try:
            gt = read_label(task.label)
        except (ImageReadError, OSError) as exc:
            raise PipelineError(f"image {task.image_id}: cannot read ground truth: {exc}") from exc
        scores = score_seed(arrays, seed.seed, gt, task.bg_powers, task.num_classes, task.image_id)
    return SeedOutcome(task.image_id, seed.fallback, missing, seed.cam_key, scores)
