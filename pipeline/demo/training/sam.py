"""Training the demo's tiny SAM on the procedural world's sub-part / part / whole masks.

The model is segment-anything's own :class:`Sam` (its ``PromptEncoder`` and ``MaskDecoder``) built
from the ``demo`` spec (registered by ``pipeline.demo.registry``); its image encoder is a CLIP-shaped ViT
(``pipeline.sam.clip_encoder``) that starts from the trained demo CLIP's vision tower
(``init="clip"``), as real SAM starts from a pretrained encoder. It is trained as SAM's automatic
mask generator uses it: one positive point prompt, ``multimask_output=True``, and multimask slot
k (0 sub-part, 1 part, 2 whole) supervised by the level-k mask under the point
(``pipeline.demo.world.point_masks``: a part without sub-parts, or a background region, repeats
the coarser mask).

The recipe starts from the feasibility probe's best (``../shared/demo_probe/sam``): per mask, a
class-balanced binary cross-entropy (alpha = the mask's background share, clamped to
[0.5, ``alpha_max``]; SAM's unbalanced focal loss collapses a model trained from scratch to empty
masks) plus dice, and the mean squared error between the predicted IoU and the IoU of the
thresholded output, so the generator's IoU filter reads a calibrated score. The clamp is a
curriculum: 0.98 first (no collapse, point-dependent masks, but every uncertain pixel is worth
covering: masks of half the image), 0.75 from ``late_from_step`` (a pixel must be 25 % likely).
Points are region-balanced (a random finest region of the view, then a random pixel of it), on
objects, or uniform. Targets
are the id maps sampled at the centres of the 64 x 64 low-resolution logit pixels (the geometry
``Sam.postprocess_masks`` inverts); padding is left out of the loss. Images go through the
predictor's own transform (``ResizeLongestSide``, ``Sam.preprocess``), whole or as random crops
(the generator's crop layer sees crops), with brightness / contrast jitter.

Deterministic for a config and torch thread count; with a state folder the run writes
``STATE_FILE`` every ``checkpoint_every`` steps and a rerun continues from it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from pipeline.demo.training.clip import jpeg_roundtrip, load_resume_state, save_atomic
from pipeline.demo.world import TRAINING_STREAM, WorldImage, point_masks, render
from pipeline.sam.models import build_sam
from pipeline.sam.specs import SamSpec, sam_spec

LEVELS = ("subpart", "part", "whole")
DEMO_SAM_FILE = Path(__file__).resolve().parents[1] / "weights" / "sam_demo.pth"
"""The committed demo SAM (segment-anything state dict), made by ``wsss demo-models --only sam``;
its SHA-256 is pinned where ``pipeline.demo.registry`` registers its weights (none yet)."""
STATE_FILE = "sam_training_state.pt"
"""Resume state of a demo SAM run, in its output folder."""


@dataclass(frozen=True)
class SamTrainingConfig:
    world_seed: int = 0
    n_images: int = 500
    """Training images rendered from the world's training stream (reused with augmentation)."""
    steps: int = 2800
    batch_size: int = 8
    """Images per step (the encoder runs once per image)."""
    points_per_image: int = 16
    """Prompts per image per step (the decoder runs once per prompt: the cost of a step)."""
    region_point_frac: float = 0.5
    """Share of points drawn region-balanced: a random finest region (sub-part, else part, else
    whole) of the view, then a random pixel of it (small sub-parts get their share)."""
    object_point_frac: float = 0.25
    """Share of points on random object pixels (the rest: uniform, as the generator's grid)."""
    crop_prob: float = 0.3
    """Probability of training on a random crop (45-80 % per side)."""
    lr: float = 3e-3
    encoder_lr_scale: float = 0.3
    """The image encoder's learning rate relative to ``lr`` (it starts pretrained)."""
    weight_decay: float = 0.05
    warmup_steps: int = 50
    final_lr_frac: float = 0.02
    """Cosine decay from ``lr`` to this fraction of it."""
    alpha_max: float = 0.98
    """Upper clamp of the balanced cross-entropy's positive weight alpha (the mask's background
    share) early on: near-equal total weight for a small mask's pixels and the rest keeps the
    model off the all-empty collapse, but makes it cover every pixel it is unsure of (measured:
    masks of about half the image for every point after 1,000 steps)."""
    late_alpha_max: float = 0.75
    """The clamp from ``late_from_step`` on: a pixel is then worth predicting only when it is at
    least 25 % likely to belong to the mask (the balanced cross-entropy's optimum), which suits
    IoU (curriculum: point-dependent masks first, tight ones after)."""
    late_from_step: int = 1100
    init: str = "clip"
    """``clip``: the image encoder's trunk starts from a trained demo CLIP; ``random``."""
    seed: int = 0


# -- data ------------------------------------------------------------------------------------------

class _Item:
    """One training image (JPEG round trip) and its id maps (uint16: compact)."""

    __slots__ = ("image", "whole", "part", "subpart", "objects")

    def __init__(self, s: WorldImage):
        self.image = jpeg_roundtrip(s.image)
        for name in ("whole", "part", "subpart"):
            m = getattr(s, name)
            if m.max() >= 2 ** 16:
                raise ValueError(f"{name} ids beyond uint16")
            setattr(self, name, m.astype(np.uint16))
        self.objects = s.instance_class[s.whole] >= 0


def level_maps(whole: np.ndarray, part: np.ndarray, subpart: np.ndarray) -> np.ndarray:
    """(3, H, W) int64 raw id maps in SAM's level order (sub-part, part, whole; 0: none)."""
    return np.stack([subpart, part, whole]).astype(np.int64)


def finest_regions(maps: np.ndarray) -> np.ndarray:
    """(H, W) int64 id of each pixel's finest region (its sub-part, else its part, else its
    whole), unique across levels: the regions that region-balanced points are drawn from."""
    sub, part, whole = maps
    return np.where(sub > 0, sub + (2 << 20), np.where(part > 0, part + (1 << 20), whole))


def sample_points(finest: np.ndarray, objects: np.ndarray | None, n: int, region_frac: float,
                  object_frac: float, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) integer (y, x) points of a view: region-balanced (``finest``: the region map of
    :func:`finest_regions`), on objects, uniform."""
    h, w = finest.shape
    n_reg = int(round(n * region_frac))
    n_obj = int(round(n * object_frac))
    n_uni = n - n_reg - n_obj
    pts = []
    if n_reg:
        regions, inv = np.unique(finest, return_inverse=True)
        inv = inv.reshape(-1)
        order = np.argsort(inv, kind="stable")
        counts = np.bincount(inv, minlength=len(regions))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        r = rng.integers(0, len(regions), n_reg)
        flat = order[starts[r] + (rng.random(n_reg) * counts[r]).astype(np.int64)]
        pts.append(np.stack([flat // w, flat % w], 1))
    if n_obj:
        ys, xs = np.nonzero(objects)
        if len(ys):
            pick = rng.integers(0, len(ys), n_obj)
            pts.append(np.stack([ys[pick], xs[pick]], 1))
        else:
            n_uni += n_obj
    if n_uni:
        pts.append(np.stack([rng.integers(0, h, n_uni), rng.integers(0, w, n_uni)], 1))
    return np.concatenate(pts)


def lowres_targets(maps: np.ndarray, pts: np.ndarray, resized_hw: tuple[int, int], size: int, low: int):
    """(P, 3, low, low) float targets and (low, low) validity of a view's points, aligned with the
    decoder's low-res logits: low-res pixel i covers input pixels [i s, (i + 1) s) with
    s = size / low; its centre maps to view pixel floor((i + 0.5) s * h / rh) (nearest), and
    pixels in the padding (beyond the resized view) are invalid. ``maps``: :func:`level_maps`;
    the targets are ``point_masks``' (a missing level repeats the coarser mask)."""
    h, w = maps.shape[1:]
    rh, rw = resized_hw
    c = (np.arange(low) + 0.5) * (size / low)
    iy = np.minimum((c * h / rh).astype(np.int64), h - 1)
    ix = np.minimum((c * w / rw).astype(np.int64), w - 1)
    valid = (c < rh)[:, None] & (c < rw)[None, :]
    grid = np.where(valid[None], maps[:, iy][:, :, ix], -1)  # (3, low, low)
    under = maps[:, pts[:, 0], pts[:, 1]].T  # (P, 3)
    same = grid[None] == under[:, :, None, None]  # (P, 3, low, low)
    whole = same[:, 2]
    part = np.where((under[:, 1] > 0)[:, None, None], same[:, 1], whole)
    sub = np.where((under[:, 0] > 0)[:, None, None], same[:, 0], part)
    return torch.from_numpy(np.stack([sub, part, whole], 1)).float(), torch.from_numpy(valid).float()


def training_items(cfg: SamTrainingConfig) -> list[_Item]:
    return [_Item(render(cfg.world_seed, i, TRAINING_STREAM)) for i in range(cfg.n_images)]


# -- losses ----------------------------------------------------------------------------------------

def balanced_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                 alpha_max: float = 0.98) -> torch.Tensor:
    """(P, K) per-mask binary cross-entropy over the valid pixels, positives weighted by the
    mask's background share alpha (clamped to [0.5, ``alpha_max``]) and negatives by 1 - alpha
    (x2, so a half-covered mask weighs as plain BCE)."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    area = valid.sum()
    alpha = (1 - (target * valid).flatten(2).sum(-1) / area).clamp(0.5, alpha_max)[..., None, None]
    ce = 2 * (alpha * target + (1 - alpha) * (1 - target)) * ce
    return (ce * valid).flatten(2).sum(-1) / area


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    p = (torch.sigmoid(logits) * valid).flatten(2)
    t = target.flatten(2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


# -- model -----------------------------------------------------------------------------------------

def build_demo_sam(seed: int, spec: SamSpec | None = None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam(spec or sam_spec("demo"))


def _lr_factor(step: int, cfg: SamTrainingConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))


class _Trainer:
    def __init__(self, cfg: SamTrainingConfig, items: list[_Item], clip_state: dict | None,
                 spec: SamSpec | None, device: torch.device | str = "cpu", precision: str = "fp32"):
        from pipeline.sam.clip_encoder import load_clip_visual

        self.cfg, self.items = cfg, items
        self.device, self.precision = torch.device(device), precision
        torch.manual_seed(cfg.seed)
        # built and initialised on the CPU whatever the device: the same initial weights everywhere
        self.sam = build_demo_sam(cfg.seed, spec)
        if cfg.init == "clip":
            if clip_state is None:
                raise ValueError("init='clip' needs the demo CLIP's state dict")
            load_clip_visual(self.sam.image_encoder, {k: v.cpu() for k, v in clip_state.items()})
        elif cfg.init != "random":
            raise ValueError(f"unknown init {cfg.init!r} (clip, random)")
        self.sam.to(self.device).train()
        self.size = self.sam.image_encoder.img_size
        self.low = 4 * self.sam.prompt_encoder.image_embedding_size[0]
        self.transform = ResizeLongestSide(self.size)
        groups = {}
        for name, p in self.sam.named_parameters():
            enc = name.startswith("image_encoder.")
            decay = p.ndim >= 2 and "embedding" not in name and "pos" not in name
            groups.setdefault((enc, decay), []).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": ps, "lr": cfg.lr * (cfg.encoder_lr_scale if enc else 1.0),
              "weight_decay": cfg.weight_decay if decay else 0.0} for (enc, decay), ps in sorted(groups.items())],
            lr=cfg.lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(s, cfg))
        self.rng = np.random.default_rng([cfg.seed, 11])
        self.step, self.seconds = 0, 0.0
        self.iou_ema = np.zeros(3)

    def state(self) -> dict:
        return {"config": asdict(self.cfg), "step": self.step, "seconds": self.seconds,
                "model": self.sam.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": self.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "iou_ema": self.iou_ema.tolist()}

    def load(self, state: dict) -> None:
        self.step, self.seconds = state["step"], state["seconds"]
        self.sam.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.iou_ema = np.array(state["iou_ema"])

    def _view(self, item: _Item):
        cfg, rng = self.cfg, self.rng
        h, w = item.whole.shape
        y0, x0, y1, x1 = 0, 0, h, w
        if rng.random() < cfg.crop_prob:
            ch, cw = int(h * rng.uniform(0.45, 0.8)), int(w * rng.uniform(0.45, 0.8))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            y1, x1 = y0 + ch, x0 + cw
        sl = (slice(y0, y1), slice(x0, x1))
        crop = np.ascontiguousarray(item.image[sl])
        if rng.random() < 0.5:  # brightness / contrast jitter
            crop = np.clip(crop.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
        return crop, level_maps(item.whole[sl], item.part[sl], item.subpart[sl]), item.objects[sl]

    def train_step(self) -> dict:
        from pipeline.precision import autocast

        cfg, sam, device = self.cfg, self.sam, self.device
        picks = self.rng.choice(len(self.items), size=min(cfg.batch_size, len(self.items)), replace=False)
        inputs, prompts = [], []
        for i in picks:
            crop, maps, objects = self._view(self.items[int(i)])
            resized = self.transform.apply_image(crop)
            inputs.append(sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1).float().to(device)))
            pts = sample_points(finest_regions(maps), objects, cfg.points_per_image, cfg.region_point_frac,
                                cfg.object_point_frac, self.rng)
            target, valid = lowres_targets(maps, pts, resized.shape[:2], self.size, self.low)
            coords = self.transform.apply_coords(pts[:, ::-1].astype(np.float64) + 0.5, crop.shape[:2])
            prompts.append((torch.as_tensor(coords, dtype=torch.float32).to(device), target.to(device),
                            valid.to(device)))
        with autocast(device, self.precision):
            emb = sam.image_encoder(torch.stack(inputs))
            pe = sam.prompt_encoder.get_dense_pe()
            losses, ious = [], []
            for b, (coords, target, valid) in enumerate(prompts):
                labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=device)
                sparse, dense = sam.prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
                logits, iou_pred = sam.mask_decoder(image_embeddings=emb[b:b + 1], image_pe=pe,
                                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                    multimask_output=True)
                logits, iou_pred = logits.float(), iou_pred.float()  # the losses in fp32 (no-op in fp32)
                v = valid[None, None]
                with torch.no_grad():
                    pred = (logits > 0).float() * v
                    inter = (pred * target).flatten(2).sum(-1)
                    union = ((pred + target) > 0).float().flatten(2).sum(-1)
                    iou = inter / union.clamp_min(1)
                alpha_max = cfg.alpha_max if self.step < cfg.late_from_step else cfg.late_alpha_max
                mask_loss = balanced_bce(logits, target, v, alpha_max) + dice_loss(logits, target, v)  # (P, 3)
                losses.append(mask_loss.sum(-1).mean() + F.mse_loss(iou_pred, iou, reduction="none").sum(-1).mean())
                ious.append(iou)
            loss = torch.stack(losses).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        iou = torch.cat(ious).mean(0).cpu().numpy()
        self.iou_ema = iou if self.step == 0 else 0.95 * self.iou_ema + 0.05 * iou
        self.step += 1
        return {"loss": float(loss.detach()), **{f"iou_{k}": float(x) for k, x in zip(LEVELS, self.iou_ema)}}


def train_sam(cfg: SamTrainingConfig, clip_state: dict | None = None, data: list | None = None,
              progress: Callable[[int, dict], None] | None = None, state_dir: str | Path | None = None,
              checkpoint_every: int = 100, evaluate_every: int = 0,
              on_evaluate: Callable[[int, float, dict, torch.nn.Module], None] | None = None,
              spec: SamSpec | None = None, device: torch.device | str = "cpu",
              precision: str = "fp32") -> torch.nn.Module:
    """Train the demo SAM on ``device`` (forward passes under ``precision``, ``pipeline.precision``;
    the losses in fp32); deterministic for a given config, CLIP state, device and thread count.
    Initialisation and data sampling run on the CPU, so every device starts from the same weights
    and sees the same batches.

    ``clip_state``: the demo CLIP's open_clip state dict (``init="clip"``). With ``state_dir``,
    the run writes ``STATE_FILE`` there every ``checkpoint_every`` steps and a rerun with the same
    config continues from it (the same result as an uninterrupted run); a state of another config
    is an error. ``on_evaluate(step, train_seconds, train_stats, model)`` runs every
    ``evaluate_every`` steps and after the last (held-out curves); it must not touch the
    training's random streams (it gets the model in eval mode, training resumes after it).
    """
    trainer = _Trainer(cfg, data if data is not None else training_items(cfg), clip_state, spec, device, precision)
    path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    state = load_resume_state(path, asdict(cfg))
    if state is not None:
        trainer.load(state)
    stats = {}
    while trainer.step < cfg.steps:
        start = time.perf_counter()
        stats = trainer.train_step()
        trainer.seconds += time.perf_counter() - start
        if path is not None and (trainer.step % checkpoint_every == 0 or trainer.step == cfg.steps):
            save_atomic(trainer.state(), path)
        if progress is not None:
            progress(trainer.step - 1, stats)
        if on_evaluate is not None and (trainer.step == cfg.steps
                                        or (evaluate_every and trainer.step % evaluate_every == 0)):
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                on_evaluate(trainer.step, trainer.seconds, stats, trainer.sam.eval())
            trainer.sam.train()
    return trainer.sam.eval()


# -- evaluation ------------------------------------------------------------------------------------

def point_iou(sam, samples: list[WorldImage], points_per_image: int = 24, seed: int = 0,
              precision: str = "fp32") -> dict:
    """Single positive point prompts through ``SamPredictor`` at each image's own size: the mean
    IoU, per level, of the best of the three outputs against the level's mask under the point
    (``point_masks``; a missing level repeats the coarser mask). Points are region-balanced:
    a random finest region of the image (sub-part, else part, else whole), then a random pixel of
    it. Also the same on object points only, and the per-output IoU of slot k against level k.
    The model runs on its device under ``precision`` (``pipeline.precision``)."""
    from segment_anything import SamPredictor

    from pipeline.precision import autocast

    predictor = SamPredictor(sam.eval())
    rng = np.random.default_rng([seed, 99])
    rows, on_object = [], []
    with torch.no_grad(), autocast(predictor.device, precision):
        for s in samples:
            image = jpeg_roundtrip(s.image)
            predictor.set_image(image)
            pts = sample_points(finest_regions(level_maps(s.whole, s.part, s.subpart)), None,
                                points_per_image, 1.0, 0.0, rng)
            coords = predictor.transform.apply_coords(pts[:, ::-1].astype(np.float64) + 0.5, image.shape[:2])
            masks, _, _ = predictor.predict_torch(
                torch.as_tensor(coords, dtype=torch.float32).to(predictor.device)[:, None],
                torch.ones(len(pts), 1, dtype=torch.int, device=predictor.device), multimask_output=True)
            masks = masks.cpu().numpy()
            for j, (y, x) in enumerate(pts):
                truth = point_masks(s, int(y), int(x))
                m = masks[j]
                inter = (m[None] & truth[:, None]).reshape(3, 3, -1).sum(-1)
                union = (m[None] | truth[:, None]).reshape(3, 3, -1).sum(-1)
                rows.append(inter / np.maximum(union, 1))  # (level, output)
                on_object.append(bool(s.instance_class[s.whole[y, x]] >= 0))
    iou = np.stack(rows)
    obj = np.array(on_object)

    def per_level(a):
        return {name: round(float(a[:, lv].max(1).mean()), 4) for lv, name in enumerate(LEVELS)}

    return {**per_level(iou), "n_points": len(iou),
            "object_points": {**per_level(iou[obj]), "n_points": int(obj.sum())} if obj.any() else None,
            "slot_k": {name: round(float(iou[:, lv, lv].mean()), 4) for lv, name in enumerate(LEVELS)}}


def evaluate_sam(sam, samples: list[WorldImage], precision: str = "fp32", **generator_settings) -> dict:
    """Quasi-superpixels of a demo SAM on held-out world images (``QuasiSuperpixelGenerator``
    with ``generator_settings``): masks per image, the percentage of images with all three
    levels, and of object instances matched by some mask at IoU >= 0.5. The model runs on its
    device, the generator's forward passes under ``precision``."""
    from segment_anything import SamPredictor

    from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator

    generator = QuasiSuperpixelGenerator(SamPredictor(sam.eval()), precision=precision, **generator_settings)
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
