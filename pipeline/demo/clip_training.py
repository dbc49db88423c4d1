"""Region-level contrastive pretraining of the demo's tiny CLIP on the procedural world.

Real CLIP localises because of web-scale pretraining; a tiny CLIP trained on image captions for
minutes classifies well but its Grad-CAMs do not localise. So the demo CLIP is pretrained as
region-aware CLIP variants are: with captions of regions (boxes of several scales on the patch
grid, from single patches to the whole view) that name the classes and background kinds inside
them. A region's feature is exactly the pipeline's image feature (algorithms.md §2) restricted to
the region: ``ln_post`` over the tokens, mean of the region's patch tokens, ``@ proj``; over the
whole view it *is* the pipeline's feature (``pool_type: avg`` in the model config).

The loss is open_clip's own :class:`open_clip.ClipLoss`. Identical captions in one contrastive
batch would be false negatives, so each step's regions are split into groups whose captions
name pairwise different (classes, background kinds) sets, and ClipLoss runs on each group.

The world's masks shape only this pretraining (which regions get which caption); the pipeline
itself later sees image-level labels only.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.clip.model import PATCH, resize_pos_embed, to_model_input
from pipeline.demo.world import BACKGROUND_KINDS, DEMO_CLASSES, TRAINING_STREAM, WorldImage, render
from pipeline.prompts.learner import encode_prompt_embeddings

DEMO_CLIP_MODEL = "wsss-demo-ViT-16"
"""open_clip config of the demo CLIP (pipeline/clip/model_configs)."""

N_CLASSES = len(DEMO_CLASSES)
N_KINDS = len(BACKGROUND_KINDS)
OTHER = N_CLASSES + N_KINDS
"""Concept index of distractors and clutter (named in no caption)."""
N_CONCEPTS = OTHER + 1


@dataclass(frozen=True)
class ClipTrainingConfig:
    world_seed: int = 0
    n_images: int = 500
    """Training images rendered from the world's training stream (reused with augmentation)."""
    steps: int = 700
    batch_size: int = 8
    crop_sizes: tuple[int, ...] = (128, 160)
    """Square crop side per step (multiples of the 16-px patch), drawn per step."""
    scale_range: tuple[float, float] = (0.9, 2.0)
    """Random rescale of the image before cropping (the pipeline's views upscale 0.9-2.5x)."""
    regions_per_image: int = 16
    max_groups: int = 4
    """Contrastive groups per step: a key (caption content) is used at most this many times."""
    patch_weight: float = 1.0
    """Weight of the single-patch term: every patch that one concept fills (``patch_purity``)
    against the captions of all concepts (the smallest regions, every patch every step)."""
    patch_purity: float = 0.6
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    class_frac: float = 0.15
    """A class is named for a region when it covers this fraction of it ..."""
    class_share: float = 0.5
    """... or when this share of the class's visible pixels in the view lies inside the region."""
    kind_frac: float = 0.3
    """A background kind is named when it covers this fraction of the region (two at most)."""
    seed: int = 0


# -- captions ---------------------------------------------------------------------------------------

_FG_TEMPLATES = ("a photo of {}.", "{}.", "a picture of {}.", "an image with {}.", "there is {}.")
_BOTH_TEMPLATES = ("a photo of {} on the {}.", "{} in front of the {}.", "a picture of {} and the {}.",
                   "{} with the {} behind.")
_BG_TEMPLATES = ("a photo of the {}.", "the {}.", "a picture of the {}.", "an empty view of the {}.")


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def caption(classes: tuple[int, ...], kinds: tuple[int, ...], rng: np.random.Generator) -> str:
    """A caption naming ``classes`` (indices into DEMO_CLASSES) and background ``kinds``."""
    fg = [f"a {DEMO_CLASSES[c]}" for c in classes]
    bg = [BACKGROUND_KINDS[k] for k in kinds]
    rng.shuffle(fg)
    rng.shuffle(bg)
    if fg and bg:
        return _BOTH_TEMPLATES[int(rng.integers(len(_BOTH_TEMPLATES)))].format(_and(fg), " and the ".join(bg))
    if fg:
        return _FG_TEMPLATES[int(rng.integers(len(_FG_TEMPLATES)))].format(_and(fg))
    return _BG_TEMPLATES[int(rng.integers(len(_BG_TEMPLATES)))].format(" and the ".join(bg))


# -- data ------------------------------------------------------------------------------------------


def concept_map(sample: WorldImage) -> np.ndarray:
    """(H, W) uint8: class c -> c, background kind k -> N_CLASSES + k, anything else -> OTHER."""
    obj = sample.instance_class[sample.whole]
    out = np.full(obj.shape, OTHER, np.uint8)
    out[obj >= 0] = obj[obj >= 0]
    stuff = sample.stuff != 255
    out[stuff] = N_CLASSES + sample.stuff[stuff]
    return out


def jpeg_roundtrip(image: np.ndarray, quality: int = 95) -> np.ndarray:
    """The image as the pipeline reads it back from the demo's JPEG files."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32)
    x = x * rng.uniform(0.7, 1.3) + rng.uniform(-25, 25)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.5, 1.5)
    return np.clip(x, 0, 255).astype(np.uint8)


def sample_view(image: np.ndarray, concepts: np.ndarray, crop: int, scale_range, rng,
                object_centred: float = 0.5):
    """A random rescaled, cropped, flipped, jittered view: (crop, crop, 3) uint8 and
    (crop, crop) concepts (255 where the crop is padding). With probability ``object_centred``
    the crop is centred on a random object pixel."""
    h, w = concepts.shape
    s = rng.uniform(*scale_range)
    nh, nw = max(int(h * s + 0.5), 1), max(int(w * s + 0.5), 1)
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    con = np.asarray(Image.fromarray(concepts).resize((nw, nh), Image.NEAREST))
    y0 = int(rng.integers(0, max(nh - crop, 0) + 1))
    x0 = int(rng.integers(0, max(nw - crop, 0) + 1))
    if rng.random() < object_centred:
        ys, xs = np.nonzero(con < N_CLASSES)
        if len(ys):
            k = int(rng.integers(len(ys)))
            y0 = int(np.clip(ys[k] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, max(nh - crop, 0)))
            x0 = int(np.clip(xs[k] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, max(nw - crop, 0)))
    img, con = img[y0:y0 + crop, x0:x0 + crop], con[y0:y0 + crop, x0:x0 + crop]
    if img.shape[0] < crop or img.shape[1] < crop:
        pad = ((0, crop - img.shape[0]), (0, crop - img.shape[1]))
        img = np.pad(img, pad + ((0, 0),))
        con = np.pad(con, pad, constant_values=255)
    if rng.random() < 0.5:
        img, con = img[:, ::-1], con[:, ::-1]
    return _jitter(img, rng), np.ascontiguousarray(con)


def patch_histograms(concepts: np.ndarray) -> np.ndarray:
    """(gh, gw, N_CONCEPTS) pixel counts of each concept per 16-px patch (padding not counted)."""
    h, w = concepts.shape
    gh, gw = h // PATCH, w // PATCH
    onehot = np.zeros((h * w, N_CONCEPTS + 1), np.float32)
    onehot[np.arange(h * w), np.minimum(concepts.reshape(-1), N_CONCEPTS)] = 1
    onehot = onehot.reshape(gh, PATCH, gw, PATCH, N_CONCEPTS + 1).sum(axis=(1, 3))
    return onehot[..., :N_CONCEPTS]


def sample_regions(hist: np.ndarray, n: int, cfg: ClipTrainingConfig, rng: np.random.Generator):
    """``n`` boxes (y0, x0, y1, x1) on the patch grid with their (classes, kinds) keys.

    Scales: single patches, 2x2 and 3x3 blocks, random boxes, and the whole view. Regions that
    name nothing (distractors, padding) are dropped.
    """
    gh, gw, _ = hist.shape
    totals = hist.sum(axis=(0, 1))
    cum = np.zeros((gh + 1, gw + 1, N_CONCEPTS), np.float32)
    cum[1:, 1:] = hist.cumsum(0).cumsum(1)
    out = []
    for i in range(n):
        if i == 0:
            y0, x0, y1, x1 = 0, 0, gh, gw
        else:
            r = rng.random()
            if r < 0.4:
                bh = bw = 1
            elif r < 0.6:
                bh = bw = 2
            elif r < 0.75:
                bh = bw = 3
            else:
                bh, bw = int(rng.integers(2, gh + 1)), int(rng.integers(2, gw + 1))
            y0, x0 = int(rng.integers(0, gh - bh + 1)), int(rng.integers(0, gw - bw + 1))
            y1, x1 = y0 + bh, x0 + bw
        counts = cum[y1, x1] - cum[y0, x1] - cum[y1, x0] + cum[y0, x0]
        area = counts.sum()
        if area < PATCH * PATCH * 0.5:
            continue
        frac = counts / area
        cls = tuple(int(c) for c in range(N_CLASSES)
                    if counts[c] > 0 and (frac[c] >= cfg.class_frac or counts[c] >= cfg.class_share * totals[c]))
        kf = frac[N_CLASSES:OTHER]
        kinds = tuple(sorted(int(k) for k in np.argsort(-kf)[:2] if kf[k] >= cfg.kind_frac))
        if not cls and not kinds:
            continue
        out.append(((y0, x0, y1, x1), (cls, kinds)))
    return out


def group_unique(keys: list, rng: np.random.Generator, max_groups: int) -> list[list[int]]:
    """Split indices into at most ``max_groups`` groups in which no key repeats (random order,
    first fit); regions whose key already fills every group are left out of the step."""
    groups: list[list[int]] = []
    seen: list[set] = []
    for i in rng.permutation(len(keys)):
        if len(groups) == max_groups and all(keys[i] in s for s in seen):
            continue
        for g, s in zip(groups, seen):
            if keys[i] not in s:
                g.append(int(i))
                s.add(keys[i])
                break
        else:
            groups.append([int(i)])
            seen.append({keys[i]})
    return [g for g in groups if len(g) >= 2]


# -- model -------------------------------------------------------------------------------------------


def create_demo_clip(seed: int) -> torch.nn.Module:
    """The untrained demo CLIP (open_clip's factory, the project's registered config)."""
    from pipeline.clip.model import register_model_configs

    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(DEMO_CLIP_MODEL, force_quick_gelu=True)


def patch_features(model, images: torch.Tensor) -> torch.Tensor:
    """(B, hw, E) projected patch tokens: ln_post of the last block's output, ``@ proj``.

    The positional embedding is resized to the view's grid as the pipeline does at inference.
    """
    v = model.visual
    x = v.conv1(images)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + resize_pos_embed(v.positional_embedding, v.grid_size, (h, w))
    x = v.ln_pre(x)
    x = v.transformer(x)
    return v.ln_post(x)[:, 1:] @ v.proj


class CaptionEncoder:
    """Tokenises captions (open_clip's tokenizer, the real vocabulary) and encodes them with the
    text tower, truncated after the longest caption (exact under the causal mask)."""

    def __init__(self):
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16")

    def __call__(self, model, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts)
        eos = tokens.argmax(dim=1)
        tokens = tokens[:, : int(eos.max()) + 1]
        return encode_prompt_embeddings(model, model.token_embedding(tokens), eos)


def _lr_factor(step: int, cfg: ClipTrainingConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * t))


def training_images(cfg: ClipTrainingConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, concepts = [], []
    for i in range(cfg.n_images):
        s = render(cfg.world_seed, i, TRAINING_STREAM)
        images.append(jpeg_roundtrip(s.image))
        concepts.append(concept_map(s))
    return images, concepts


def train_clip(cfg: ClipTrainingConfig, data=None,
               progress: Callable[[int, dict], None] | None = None) -> torch.nn.Module:
    """Train the demo CLIP from scratch; deterministic for a given config and thread count."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 7])
    images, concepts = data if data is not None else training_images(cfg)
    model = create_demo_clip(cfg.seed)
    model.train()
    encoder = CaptionEncoder()
    loss_fn = open_clip.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    for step in range(cfg.steps):
        crop = int(cfg.crop_sizes[int(rng.integers(len(cfg.crop_sizes)))])
        picks = rng.choice(len(images), size=cfg.batch_size, replace=False)
        views, regions, cons = [], [], []
        for b, i in enumerate(picks):
            img, con = sample_view(images[i], concepts[i], crop, cfg.scale_range, rng)
            views.append(img)
            cons.append(con)
            for box, key in sample_regions(patch_histograms(con), cfg.regions_per_image, cfg, rng):
                regions.append((b, box, key))
        feats = patch_features(model, to_model_input(np.stack(views)))
        g = crop // PATCH
        feats = feats.reshape(len(views), g, g, -1)
        region_feats = torch.stack([feats[b, y0:y1, x0:x1].mean(dim=(0, 1)) for b, (y0, x0, y1, x1), _ in regions])
        texts = [caption(key[0], key[1], rng) for _, _, key in regions]
        text_feats = encoder(model, texts)
        region_feats = F.normalize(region_feats, dim=-1)
        text_feats = F.normalize(text_feats, dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        groups = group_unique([key for _, _, key in regions], rng, cfg.max_groups)
        total = sum(len(gr) for gr in groups)
        loss = sum(loss_fn(region_feats[gr], text_feats[gr], scale) * (len(gr) / total) for gr in groups)
        # single patches: each pure patch against one caption per concept (a fresh template each
        # step), the image-to-text half of the same contrastive loss, with no duplicate captions
        hist = np.stack([patch_histograms(c) for c in cons]).reshape(-1, N_CONCEPTS)
        area = hist.sum(1)
        dominant = hist.argmax(1)
        pure = (area > 0) & (hist.max(1) >= cfg.patch_purity * np.maximum(area, 1)) & (dominant != OTHER)
        if pure.any():
            concept_texts = [caption((c,), (), rng) for c in range(N_CLASSES)] + \
                            [caption((), (k,), rng) for k in range(N_KINDS)]
            concept_feats = F.normalize(encoder(model, concept_texts), dim=-1)
            patches = F.normalize(feats.reshape(-1, feats.shape[-1])[torch.from_numpy(np.nonzero(pure)[0])], dim=-1)
            target = torch.from_numpy(dominant[pure]).long()
            # class-balanced: object patches are a few per cent of the pure ones, and a model that
            # names only background kinds would otherwise already score well
            per_patch = F.cross_entropy(scale * patches @ concept_feats.T, target, reduction="none")
            is_obj = target < N_CLASSES
            parts = [per_patch[m].mean() for m in (is_obj, ~is_obj) if bool(m.any())]
            patch_loss = sum(parts) / len(parts)
            loss = loss + cfg.patch_weight * patch_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, {"loss": float(loss.detach()), "scale": float(scale.detach()), "groups": len(groups),
                            "regions": total})
    return model.eval()


# -- evaluation -----------------------------------------------------------------------------------


EVAL_OFFSET = 1_000_000
"""Held-out images of the training stream start here (never trained on, never in a demo split)."""


def evaluation_images(world_seed: int, n: int) -> list[WorldImage]:
    return [render(world_seed, EVAL_OFFSET + i, TRAINING_STREAM) for i in range(n)]


def evaluate_clip(model, samples: list[WorldImage], bg_powers=tuple(range(1, 11))) -> dict:
    """Held-out quality of a demo CLIP through the pipeline's own inference code (percent).

    Hand-written prompts ("a photo of a car.", the 25 VOC background names) stand in for the
    learned ones: classification mAP of the image features, and the mIoU of the Softmax-GradCAMs
    of the labelled classes (best background power), next to the all-background score.
    """
    import copy

    from pipeline.cams.score import cam_score
    from pipeline.clip.model import FrozenClip, inference_resize
    from pipeline.metrics import CamEvaluator, ConfusionAccumulator, percent
    from pipeline.prompts.class_names import VOC_BACKGROUND_NAMES
    from pipeline.prompts.learner import clip_logits
    from pipeline.prompts.training import batched_gradcam

    clip = FrozenClip(copy.deepcopy(model).float(), untrained=False)
    encoder = CaptionEncoder()
    texts = [f"a photo of a {c}." for c in DEMO_CLASSES] + [f"a photo of the {b}." for b in VOC_BACKGROUND_NAMES]
    with torch.no_grad():
        text = encoder(clip.model, texts)
    cams = CamEvaluator(N_CLASSES + 1, bg_powers)
    background = ConfusionAccumulator(N_CLASSES + 1)
    scores, targets = [], []
    for s in samples:
        image = inference_resize(jpeg_roundtrip(s.image))
        x = clip.encode_to_last_block(to_model_input(image[None]))
        gh, gw = image.shape[0] // PATCH, image.shape[1] // PATCH
        with torch.no_grad():
            logits = clip_logits(clip.last_block_tail(x)[1], text, clip.logit_scale)[0, :N_CLASSES]
        y = np.zeros(N_CLASSES, np.float32)
        y[list(s.classes)] = 1
        scores.append(logits.numpy())
        targets.append(y)
        cam = batched_gradcam(clip, text, x, torch.from_numpy(y)[None], N_CLASSES, (gh, gw), create_graph=False)
        cams.add(cam_score(cam.detach().numpy(), s.label.shape), np.array(s.classes), s.label)
        background.add(np.zeros_like(s.label), s.label)
    return {"cam_miou": cams.results()["best_miou"], "cam_best_power": cams.results()["best_power"],
            "all_background_miou": percent(background.scores().miou),
            "classification_map": percent(_mean_average_precision(np.stack(scores), np.stack(targets)))}


def _mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    aps = []
    for c in range(targets.shape[1]):
        if targets[:, c].sum() == 0:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = targets[order, c]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return float(np.mean(aps))
