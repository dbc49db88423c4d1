"""Training batches of prompt learning (algorithms.md §7): which (image, view) pairs an iteration
sees, their last-block inputs, image labels and, for segmentation prompts, the coarse seeds
cropped and flipped like the view.

Batches are drawn from ``(seed, iteration)`` only, so a resumed run is identical to an
uninterrupted one. The default ``path: cached`` reads one stored view's tokens from
``train_views.zarr`` (``clip-features``); ``path: exact`` runs the full image encoder on a fresh
augmentation every step, as the authors did.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.clip.features import encode_views, sample_views, view_rng
from pipeline.data.imageio import ImageReadError, read_label, read_rgb
from pipeline.errors import PipelineError
from pipeline.params import ClipFeaturesConfig, PromptsConfig
from pipeline.prompts.augment import ViewParams, apply_view_label
from pipeline.provenance import labelled_inputs
from pipeline.schemas import VIEWS_STORE, open_views, seed_path


class BatchSource:
    """(last-block inputs (B, 1+196, D), image labels (B, C), seed crops or None) per iteration."""

    def __init__(self, which, cfg: PromptsConfig, split, features: Path, seeds: Path | None,
                 features_cfg: ClipFeaturesConfig, clip):
        self.which, self.cfg, self.clip = which, cfg, clip
        self.seeds = seeds
        self.features_cfg = features_cfg
        self.records = split.good()
        if not self.records:
            raise PipelineError("the train split has no usable image")
        self.n_classes = len(split.class_names)
        self.views = None
        self._view_params: dict[str, np.ndarray] = {}  # (K, 18) per image, read once
        if cfg.path == "cached":
            self.views = open_views(features)
            missing = [r.id for r in self.records if r.id not in self.views]
            if missing:
                raise PipelineError(f"{features / VIEWS_STORE} lacks image {missing[0]!r} "
                                 f"({len(missing)} missing; rerun `wsss clip-features`)")
            # (an image that records no inputs was written by other tools: taken as it is)
            stale = [r.id for r in self.records
                     if self.views.recorded_inputs(r.id) not in (None, labelled_inputs(r))]
            if stale:
                raise PipelineError(f"{features / VIEWS_STORE} holds image {stale[0]!r} computed from "
                                 f"another version of the image or its labels ({len(stale)} such; "
                                 "rerun `wsss clip-features`)")
            if list(self.views.attrs.get("class_names", [])) != list(split.class_names):
                raise PipelineError(f"{features / VIEWS_STORE} was built for other classes; rerun clip-features")

    def batch(self, iteration: int):
        rng = np.random.default_rng([self.cfg.seed, iteration])
        n = len(self.records)
        picks = rng.choice(n, size=self.cfg.batch_size, replace=n < self.cfg.batch_size)
        records = [self.records[int(i)] for i in picks]
        if self.views is not None:
            xs, views = zip(*(self._cached_view(r, rng) for r in records))
            x = torch.stack(xs).float()
        else:
            views = [self._fresh_view(r, iteration, row) for row, r in enumerate(records)]
            # the exact path: the full encoder on this step's fresh views, as one batch
            x = encode_views(self.clip, None, views, images=[self._image(r) for r in records]).cpu()
        labels = np.zeros((len(records), self.n_classes), np.float32)
        for row, r in enumerate(records):
            labels[row, list(r.labels)] = 1
        seed_crops = None
        if self.which == "seg":
            seed_crops = torch.from_numpy(np.stack(
                [apply_view_label(self._seed(r.id), v) for r, v in zip(records, views)]))
        return x, torch.from_numpy(labels), seed_crops

    def _cached_view(self, record, rng):
        # One view's chunk is read and decompressed, not the K views of the image.
        params = self._view_params.get(record.id)
        if params is None:
            params = self._view_params[record.id] = self.views.read_array(record.id, "views")
        k = int(rng.integers(params.shape[0]))
        tokens = self.views.read_array(record.id, "tokens", k)
        return torch.from_numpy(tokens), ViewParams.from_array(params[k])

    def _image(self, record) -> np.ndarray:
        try:
            return read_rgb(record.image, record.digest)
        except ImageReadError as exc:
            raise PipelineError(f"image {record.id} ({record.image}): {exc}") from exc

    def _fresh_view(self, record, iteration: int, row: int):
        # the row keeps an image drawn twice into one batch from getting the same view
        return sample_views(view_rng(self.cfg.seed, record.id, iteration, row),
                            (record.height, record.width), 1, self.features_cfg.augment)[0]

    def _seed(self, image_id: str) -> np.ndarray:
        path = seed_path(self.seeds, image_id)
        try:
            return read_label(path)
        except (ImageReadError, OSError) as exc:
            raise PipelineError(f"coarse seed of {image_id} unreadable at {path}: {exc} (run seeds@coarse)") from exc
