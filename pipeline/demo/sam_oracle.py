"""``sam.model: world-oracle``: the demo world's own masks as a stand-in for a trained demo SAM.

Until a tiny SAM trained on the demo world segments it at three levels (issue 17), the rest of the
method (SAMS, the seeds, the segmenter) would see no quasi-superpixels worth the name. This
stand-in answers each prompt point with what a perfect SAM would return: the sub-part, part and
whole under the point (:func:`pipeline.demo.world.point_masks`, SAM's level order 0, 1, 2), with
certain logits and predicted IoU 1 (0 for a level that only repeats the one above: a part
without sub-parts, a whole without parts). Everything after the network (IoU and stability thresholds,
box NMS with level offsets, crop NMS, small-region clean-up, occupation filter, store layout) is
:class:`~pipeline.sam.quasi_superpixels.QuasiSuperpixelGenerator`'s unchanged code, so the
quasi-superpixels are what the method would get from a SAM that knows the world, no better.

It only knows the demo world: it needs the rendered :class:`~pipeline.demo.world.WorldImage` of
each image, which its masker (:func:`world_oracle_masker`, the ``sam_masks`` stage's per-image
model) re-renders from ``dataset.demo.seed`` and the image's id. Its results are labelled
``sam_oracle`` wherever they are read (its store and metrics say ``sam_oracle: true``).
"""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import torch

from pipeline.demo.dataset import demo_index
from pipeline.demo.world import WorldImage, point_masks, render
from pipeline.errors import PipelineError
from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator, QuasiSuperpixels

#: The ``sam.model`` name of the stand-in (registered in ``pipeline/demo/registry.py``).
WORLD_ORACLE = "world-oracle"

#: Logit magnitude of the oracle's masks: far from the mask threshold (0) on both sides, so the
#: stability score is 1 for any ``stability_score_offset`` below it.
ORACLE_LOGIT = 10.0


class _OraclePredictor:
    """What the generator touches of ``SamPredictor`` outside ``_predict``: no network (so no
    :class:`~pipeline.sam.point_decoder.PointDecoder`), nothing to embed."""

    device = "cpu"

    def __init__(self) -> None:
        self.model = SimpleNamespace(mask_threshold=0.0)

    def set_image(self, image: np.ndarray) -> None:
        pass

    def reset_image(self) -> None:
        pass


class WorldOracleGenerator(QuasiSuperpixelGenerator):
    """Quasi-superpixels of a demo-world image whose prompt answers are the world's own masks.

    Takes :class:`QuasiSuperpixelGenerator`'s settings (``max_batch_memory_mb`` plays no part:
    every batch is ``points_per_batch`` points). Use :meth:`generate_world`.
    """

    def __init__(self, **settings) -> None:
        super().__init__(_OraclePredictor(), **settings)
        self._sample: WorldImage | None = None
        self._crop_box: list[int] | None = None

    def generate_world(self, image: np.ndarray, sample: WorldImage) -> QuasiSuperpixels:
        """The quasi-superpixels of ``image`` (H, W, 3) uint8, the picture of ``sample``."""
        if image.shape[:2] != sample.whole.shape:
            raise ValueError(f"image is {image.shape[0]}x{image.shape[1]} but the world sample "
                             f"is {sample.whole.shape[0]}x{sample.whole.shape[1]}")
        self._sample = sample
        try:
            return self.generate(image)
        finally:
            self._sample = None

    def generate(self, image: np.ndarray) -> QuasiSuperpixels:
        if self._sample is None:
            raise RuntimeError("the world oracle needs the image's world sample: "
                               "call generate_world(image, sample)")
        return super().generate(image)

    def _process_crop(self, image, crop_box, layer_idx, orig_size):
        self._crop_box = crop_box
        return super()._process_crop(image, crop_box, layer_idx, orig_size)

    def _predict(self, points, crop_size, decoder):
        """The base ``_predict``'s outputs: iou_preds (B, 3), the flat IoU-survivor index
        (point-major, level-minor) and their (K, h, w) logits in crop coordinates."""
        sample = self._sample
        x0, y0, x1, y1 = self._crop_box
        h, w = sample.whole.shape
        ys = np.clip(np.floor(points[:, 1]).astype(np.int64) + y0, 0, h - 1)
        xs = np.clip(np.floor(points[:, 0]).astype(np.int64) + x0, 0, w - 1)
        # Points on the same sub-part, part and whole get the same masks: compute each once.
        keys = np.stack([sample.whole[ys, xs], sample.part[ys, xs], sample.subpart[ys, xs]], 1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        distinct = np.stack([point_masks(sample, int(ys[i]), int(xs[i]))[:, y0:y1, x0:x1]
                             for i in first])
        masks = torch.from_numpy(distinct[inverse.reshape(-1)])  # (B, 3, h, w)
        # A level without a mask of its own repeats the level above (point_masks): predicted
        # IoU 0 there, so the copy loses the NMS to the mask at its true level (a tie would keep
        # the lower level, which comes first) and fails any IoU threshold.
        own = np.stack([keys[:, 2] > 0, keys[:, 1] > 0, np.ones(len(keys), bool)], 1)
        iou_preds = torch.from_numpy(own.astype(np.float32))
        index = torch.nonzero(self._iou_survivors(iou_preds).flatten()).flatten()
        masks = masks.flatten(0, 1)
        masks = masks if len(index) == len(masks) else masks[index]
        logits = torch.where(masks, torch.tensor(ORACLE_LOGIT), torch.tensor(-ORACLE_LOGIT))
        return iou_preds, index, logits


def world_oracle_masker(model, checkpoint, checkpoint_sha256, mask_threshold, device, precision,
                        world_seed, **settings):
    """The oracle's masker (its generator entry; it needs no weights and no device):
    ``(image_id, image) -> QuasiSuperpixels`` of the world ``world_seed`` (``dataset.demo.seed``)."""
    generator = WorldOracleGenerator(precision=precision, **settings)
    return partial(world_oracle_masks, generator, world_seed)


def world_oracle_masks(generator, world_seed: int, image_id: str, image):
    """The oracle needs the image's world: re-rendered from the seed and the id's index."""
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


def oracle_provenance(model, checkpoint, checkpoint_sha256) -> dict:
    """No weights: the store records where its masks come from instead of a checksum."""
    return {"sha256": "none (the demo world's own masks)", "untrained": False}
