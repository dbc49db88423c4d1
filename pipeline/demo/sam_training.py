"""Training the demo's tiny SAM on the procedural world's sub-part / part / whole masks.

The model is segment-anything's own :class:`Sam` built from the ``demo`` spec of
``pipeline.sam.models`` (the same assembly as the official variants). It is trained as SAM's
automatic mask generator uses it: one positive point prompt, ``multimask_output=True``, and
multimask slot k (0 sub-part, 1 part, 2 whole) supervised by the level-k mask under the point
(``pipeline.demo.world.point_masks``: a part without sub-parts, or a background region, repeats
the coarser mask). Losses are SAM's: focal (weight 20) + dice (weight 1) on the mask logits, and
the mean squared error between the predicted IoU and the IoU of the predicted mask, so the
generator's IoU filter (paper 0.86) reads a calibrated score.

Images go through the predictor's own transform (``ResizeLongestSide`` to the encoder's size,
``Sam.preprocess``), at random scales and with random crops as the generator's crop layer sees
them. Losses are computed on the 4x-upsampled low-resolution masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from pipeline.demo.clip_training import jpeg_roundtrip
from pipeline.demo.world import TRAINING_STREAM, WorldImage, point_masks, render
from pipeline.sam.models import SPECS, build_sam

FOCAL_WEIGHT = 20.0
"""SAM's focal : dice loss ratio (Kirillov et al. 2023, §3)."""
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


@dataclass(frozen=True)
class SamTrainingConfig:
    world_seed: int = 0
    n_images: int = 400
    """Training images rendered from the world's training stream (reused with augmentation)."""
    steps: int = 800
    batch_size: int = 4
    """Images per step (the encoder runs once per image)."""
    points_per_image: int = 12
    object_point_frac: float = 0.6
    """Share of prompt points drawn on objects (the rest anywhere, as the generator's grid)."""
    crop_prob: float = 0.4
    """Probability of training on a random crop (the generator's crop layer sees crops)."""
    lr: float = 5e-4
    """At 3e-3 the decoder collapses to one constant mask for every point within a few hundred
    steps (measured); 5e-4 learns nested, point-dependent masks."""
    weight_decay: float = 0.0
    warmup_steps: int = 50
    seed: int = 0


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask mean focal loss (N, ...) -> (N,), alpha-balanced per mask.

    Deviation from SAM's fixed alpha 0.25: alpha is each mask's background fraction (clamped to
    [0.5, 0.98]), so positives and negatives weigh alike. Trained from scratch (SAM starts from
    an MAE encoder), the tiny model otherwise collapses to empty masks, most demo masks covering
    a few per cent of the image.
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    dims = tuple(range(1, target.ndim))
    alpha = (1 - target.mean(dim=dims, keepdim=True)).clamp(0.5, 0.98)
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)


def _view(sample: WorldImage, rng: np.random.Generator, crop_prob: float):
    """(image, sample-like maps) of a random crop (or the whole image) of a world image."""
    h, w = sample.label.shape
    y0, x0, y1, x1 = 0, 0, h, w
    if rng.random() < crop_prob:
        ch, cw = int(h * rng.uniform(0.45, 0.75)), int(w * rng.uniform(0.45, 0.75))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        y1, x1 = y0 + ch, x0 + cw
    sl = (slice(y0, y1), slice(x0, x1))
    return sl


def _points(sample: WorldImage, sl, n: int, object_frac: float, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) integer (y, x) prompt points inside the crop."""
    whole = sample.whole[sl]
    on_object = sample.instance_class[whole] >= 0
    ys, xs = np.nonzero(on_object)
    n_obj = int(round(n * object_frac)) if len(ys) else 0
    h, w = whole.shape
    pts = [np.stack([rng.integers(0, h, n - n_obj), rng.integers(0, w, n - n_obj)], 1)]
    if n_obj:
        pick = rng.integers(0, len(ys), n_obj)
        pts.append(np.stack([ys[pick], xs[pick]], 1))
    return np.concatenate(pts)


class _Crop:
    """The maps of a world image restricted to a crop (what ``point_masks`` needs)."""

    def __init__(self, sample: WorldImage, sl):
        self.whole = sample.whole[sl]
        self.part = sample.part[sl]
        self.subpart = sample.subpart[sl]


def build_demo_sam(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam(SPECS["demo"])


def _lr_factor(step: int, cfg: SamTrainingConfig) -> float:
    import math

    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * t))


def training_samples(cfg: SamTrainingConfig) -> list[tuple[np.ndarray, WorldImage]]:
    out = []
    for i in range(cfg.n_images):
        s = render(cfg.world_seed, i, TRAINING_STREAM)
        out.append((jpeg_roundtrip(s.image), s))
    return out


def train_sam(cfg: SamTrainingConfig, data=None,
              progress: Callable[[int, dict], None] | None = None) -> torch.nn.Module:
    """Train the demo SAM from scratch; deterministic for a given config and thread count."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 11])
    data = data if data is not None else training_samples(cfg)
    sam = build_demo_sam(cfg.seed)
    sam.train()
    size = sam.image_encoder.img_size
    transform = ResizeLongestSide(size)
    opt = torch.optim.AdamW(sam.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    for step in range(cfg.steps):
        picks = rng.choice(len(data), size=cfg.batch_size, replace=False)
        inputs, prompts = [], []
        for i in picks:
            image, sample = data[int(i)]
            sl = _view(sample, rng, cfg.crop_prob)
            crop = np.ascontiguousarray(image[sl])
            if rng.random() < 0.5:  # brightness / contrast jitter
                crop = np.clip(crop.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
            resized = transform.apply_image(crop)
            x = torch.as_tensor(resized).permute(2, 0, 1).float()
            inputs.append(sam.preprocess(x))  # normalise and pad to size x size
            maps = _Crop(sample, sl)
            pts = _points(sample, sl, cfg.points_per_image, cfg.object_point_frac, rng)
            targets = np.stack([point_masks(maps, int(y), int(x)) for y, x in pts])  # (P, 3, h, w)
            rh, rw = resized.shape[:2]
            t = torch.from_numpy(targets).float()
            t = F.interpolate(t, size=(rh, rw), mode="nearest")
            t = F.pad(t, (0, size - rw, 0, size - rh))
            coords = transform.apply_coords(pts[:, ::-1].astype(np.float64) + 0.5, crop.shape[:2])
            prompts.append((torch.as_tensor(coords, dtype=torch.float32), t, (rh, rw)))
        emb = sam.image_encoder(torch.stack(inputs))
        losses = []
        stats = {"iou": 0.0, "iou_pred": 0.0}
        for b, (coords, target, (rh, rw)) in enumerate(prompts):
            labels = torch.ones(coords.shape[0], 1, dtype=torch.int)
            sparse, dense = sam.prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
            logits, iou_pred = sam.mask_decoder(
                image_embeddings=emb[b:b + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
            # low-res logits are (P, 3, size/4, size/4); targets at that resolution, valid area only
            lh, lw = logits.shape[-2:]
            tgt = F.interpolate(target, size=(lh, lw), mode="area")
            valid = torch.zeros(1, 1, lh, lw)
            valid[..., : -(-rh * lh // size), : -(-rw * lw // size)] = 1
            tgt_bin = (tgt >= 0.5).float()
            lg = logits * valid - 20.0 * (1 - valid)  # padding counts as confidently empty
            p, k = lg.shape[:2]
            focal = sigmoid_focal_loss(lg.flatten(0, 1), tgt_bin.flatten(0, 1))
            dice = dice_loss(lg.flatten(0, 1), tgt_bin.flatten(0, 1))
            with torch.no_grad():
                pred = (lg > 0).float()
                inter = (pred * tgt_bin).flatten(2).sum(-1)
                union = ((pred + tgt_bin) > 0).float().flatten(2).sum(-1)
                iou = inter / union.clamp_min(1)
            iou_loss = F.mse_loss(iou_pred, iou, reduction="none").flatten()
            losses.append((FOCAL_WEIGHT * focal + DICE_WEIGHT * dice + IOU_WEIGHT * iou_loss).mean())
            stats["iou"] += float(iou.mean()) / len(prompts)
            stats["iou_pred"] += float(iou_pred.detach().mean()) / len(prompts)
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, {"loss": float(loss.detach()), **stats})
    return sam.eval()


def evaluate_sam(sam, samples: list[WorldImage], **generator_settings) -> dict:
    """Quasi-superpixels of a demo SAM on held-out world images (``QuasiSuperpixelGenerator``
    with ``generator_settings``): masks per image, the percentage of images with all three
    levels, and of object instances matched by some mask at IoU >= 0.5."""
    from segment_anything import SamPredictor

    from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator

    generator = QuasiSuperpixelGenerator(SamPredictor(sam.eval()), **generator_settings)
    counts, three, matched, objects = [], 0, 0, 0
    with torch.no_grad():
        for s in samples:
            qs = generator.generate(jpeg_roundtrip(s.image))
            counts.append(len(qs))
            three += len(set(qs.levels.tolist())) == 3
            flat = torch.from_numpy(qs.masks.reshape(len(qs), s.image.shape[0] * s.image.shape[1])).float()
            for wid in np.nonzero(s.instance_class >= 0)[0]:
                gt = torch.from_numpy((s.whole == wid).reshape(-1)).float()
                objects += 1
                if len(qs):
                    inter = flat @ gt
                    iou = inter / (flat.sum(1) + gt.sum() - inter)
                    matched += bool((iou >= 0.5).any())
    return {"masks_per_image": float(np.mean(counts)) if counts else 0.0,
            "three_level_percent": 100.0 * three / max(len(samples), 1),
            "object_recall_at_0.5_percent": 100.0 * matched / max(objects, 1), "settings": generator_settings}
