"""Pretraining of the demo's tiny CLIP on the procedural world: dense concepts, then Grad-CAMs.

Real CLIP localises because of web-scale pretraining; a tiny CLIP trained from scratch for
minutes does not, even when it classifies (a feasibility probe measured CAM mIoU 23 at mAP 65).
So the demo CLIP is pretrained in phases (``ClipPhase``), each with a fresh AdamW and its own
warm-up and cosine schedule:

1. *features*: every patch token (``ln_post -> proj``, the pipeline's per-patch feature) is
   classified by cosine against 12 concept heads (6 classes, 6 background kinds) with soft targets
   (the pixel shares of the patch), object and background patches weighted equally; the image
   feature (exactly the pipeline's: mean of the projected patch tokens) gets a multi-label BCE
   against the class heads. The heads are learnable prototypes, and the text tower is trained to
   hit them from several prompt templates (this keeps the text embeddings apart; with the text
   tower as the heads from the start they collapse onto one direction), plus a patch term against
   the text embeddings themselves.
2. *cam*, 3. *cam-fine*: the text embeddings become the heads, and a Grad-CAM term trains the
   pipeline's own Softmax-Grad-CAM (§2: the class prompts against the VOC background prompts) to
   be high on the patches of each present class and low elsewhere.

An optional fourth phase (``AFFINITY_PHASE``, not in the committed recipe) adds a term that makes
the attention the pipeline's CAA reads (the mean over the last ``attention_blocks`` blocks) put
each patch's mass on patches of its own concept, as real CLIP's late attention does. Without it the
tiny model's attention carries no affinity and CAA spreads every CAM (measured on the demo's train
split: CAM mIoU 45.0 -> 34.5 in the best of 8 CAA settings), which is why the embedded default
runs without CAA.

The world's masks shape only this pretraining (as SAM's masks shaped SAM); the pipeline itself
later sees image-level labels only. Deterministic for a config and torch thread count; a run
writes a resume state every ``checkpoint_every`` steps and continues from it when restarted.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import tensorfile
from pipeline.clip.model import PATCH, to_model_input, vision_trunk
from pipeline.clip.pretrained import known_sha256
from pipeline.demo.world import BACKGROUND_KINDS, DEMO_CLASSES, TRAINING_STREAM, WorldImage, render
from pipeline.prompts.learner import encode_prompt_embeddings

DEMO_CLIP_MODEL = "wsss-demo-ViT-16"
"""open_clip config of the demo CLIP (pipeline/clip/model_configs)."""
DEMO_CLIP_FILE = Path(__file__).resolve().parents[1] / "weights" / "clip_demo.pt"
"""The committed demo CLIP (open_clip state dict, fp16), made by ``wsss demo-models --only clip``."""
DEMO_CLIP_SHA256 = known_sha256(DEMO_CLIP_MODEL, DEMO_CLIP_FILE)
"""SHA-256 of ``DEMO_CLIP_FILE`` (verified like OpenAI's published file: ``clip.checkpoint_sha256``
may stay empty)."""

N_CLASSES = len(DEMO_CLASSES)
N_KINDS = len(BACKGROUND_KINDS)
OTHER = N_CLASSES + N_KINDS
"""Concept index of distractors and clutter (named by no head)."""
N_CONCEPTS = OTHER + 1


@dataclass(frozen=True)
class ClipPhase:
    """One phase of the recipe: its own optimizer, warm-up and cosine schedule."""

    name: str
    steps: int
    lr: float
    warmup: int
    prototypes: bool
    """Heads are learnable concept prototypes (the text tower is trained to hit them); otherwise
    the text embeddings of the concept prompts are the heads."""
    cam_weight: float = 0.0
    """Weight of the Grad-CAM term (0: off)."""
    affinity_weight: float = 0.0
    """Weight of the attention-affinity term (0: off)."""


DEFAULT_PHASES = (
    ClipPhase("features", steps=3000, lr=1e-3, warmup=100, prototypes=True),
    ClipPhase("cam", steps=1000, lr=5e-4, warmup=20, prototypes=False, cam_weight=0.5),
    ClipPhase("cam-fine", steps=600, lr=3e-4, warmup=20, prototypes=False, cam_weight=0.5),
)

AFFINITY_PHASE = ClipPhase("affinity", steps=600, lr=3e-4, warmup=20, prototypes=False, cam_weight=0.5,
                           affinity_weight=1.0)
"""An optional fourth phase (not in the committed recipe): the attention-affinity term. Measured
after the committed three phases, on world 0's 48 held-out images: CAM mIoU 53.6 -> 56.6 but mAP
80.9 -> 76.5; in the demo pipeline (learned prompts, 32 train images) it made CAA no longer worse
than the raw CAM (31.7 -> 32.2) but the learned prompts' raw CAM fell from 45.0 to 31.7."""


@dataclass(frozen=True)
class ClipTrainingConfig:
    world_seed: int = 0
    n_images: int = 1000
    """Training images rendered from the world's training stream (reused with augmentation)."""
    phases: tuple[ClipPhase, ...] = DEFAULT_PHASES
    batch_size: int = 16
    crop_sizes: tuple[int, ...] = (128, 160)
    """Square crop side per step (multiples of the 16-px patch), drawn per step."""
    scale_range: tuple[float, float] = (0.9, 2.0)
    """Random rescale of the image before cropping (the pipeline's views upscale 0.9-2.5x)."""
    object_centred: float = 0.5
    """Probability that a view is centred on a random object pixel."""
    weight_decay: float = 0.05
    patch_weight: float = 1.0
    image_weight: float = 0.5
    text_weight: float = 1.0
    patch_text_weight: float = 0.5
    """Phases with prototypes: the patch term once more against the text embeddings."""
    object_share: float = 0.5
    """Share of object patches in the patch term (the rest: background-kind patches)."""
    cam_views: int = 8
    """Views of each step that the Grad-CAM term uses."""
    attention_blocks: int = 4
    """Final blocks whose mean attention the affinity term trains (params.yaml clip.attention_blocks)."""
    patch_scale: float = 20.0
    """Initial temperature of the patch term (learnable, reset at each phase)."""
    logit_scale: float = 14.3
    """Initial ``exp(logit_scale)`` of the model."""
    max_logit_scale: float = 50.0
    """Clamp of ``exp(logit_scale)`` in the image term."""
    canonical_prompt: float = 0.5
    """Probability of the canonical template ("a photo of a car.") for a concept in a step."""
    text_templates: int = 3
    """Prompts per concept per step in the text-to-prototype term."""
    seed: int = 0

    @property
    def steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def with_phase_steps(self, steps: int) -> "ClipTrainingConfig":
        """The same recipe with every phase cut to ``steps`` steps (quick runs and tests)."""
        return replace(self, phases=tuple(replace(p, steps=steps, warmup=min(p.warmup, steps)) for p in self.phases))


CLASS_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.", "there is a {}.",
                   "a photo of the {}.", "a {} in the picture.")
KIND_TEMPLATES = ("a photo of the {}.", "the {}.", "a picture of the {}.", "an image of the {}.",
                  "a view of the {}.", "a photo of a {}.")


def concept_prompts(rng: np.random.Generator, canonical: float) -> list[str]:
    """One prompt per concept (classes, then background kinds): the canonical template with
    probability ``canonical``, otherwise a random one."""
    out = []
    for names, templates in ((DEMO_CLASSES, CLASS_TEMPLATES), (BACKGROUND_KINDS, KIND_TEMPLATES)):
        for name in names:
            t = templates[0] if rng.random() < canonical else templates[int(rng.integers(len(templates)))]
            out.append(t.format(name))
    return out


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
    return _last_block_features(model, vision_trunk(model.visual, images, cast=False)[0])


def _last_block_features(model, x: torch.Tensor) -> torch.Tensor:
    """(B, hw, E) projected patch tokens from the last block's inputs ``x`` (B, 1 + hw, D)."""
    v = model.visual
    return v.ln_post(v.transformer.resblocks[-1](x))[:, 1:] @ v.proj


class CaptionEncoder:
    """Tokenises captions (open_clip's tokenizer, the real vocabulary) and encodes them with the
    text tower, truncated after the longest caption (exact under the causal mask)."""

    def __init__(self):
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16")

    def __call__(self, model, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts)
        eos = tokens.argmax(dim=1)
        tokens = tokens[:, : int(eos.max()) + 1].to(model.token_embedding.weight.device)
        return encode_prompt_embeddings(model, model.token_embedding(tokens), eos)


def _lr_factor(step: int, phase: ClipPhase) -> float:
    if step < phase.warmup:
        return (step + 1) / phase.warmup
    t = (step - phase.warmup) / max(phase.steps - phase.warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * t))


def training_images(cfg: ClipTrainingConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, concepts = [], []
    for i in range(cfg.n_images):
        s = render(cfg.world_seed, i, TRAINING_STREAM)
        images.append(jpeg_roundtrip(s.image))
        concepts.append(concept_map(s))
    return images, concepts


def _affinity_loss(att: torch.Tensor, hist: np.ndarray, object_share: float) -> torch.Tensor:
    """-log of the share of each patch's attention (B, hw, hw) that lands on patches of its own
    concept (the dominant one of patches at least half one known concept); object and
    background patches weighted ``object_share`` : 1 - ``object_share``."""
    area = hist.sum(2)
    dominant = hist[:, :, :OTHER].argmax(2)
    known = (area >= 0.5 * PATCH * PATCH) & (hist[:, :, :OTHER].max(2) >= 0.5 * np.maximum(area, 1))
    if not known.any():
        return att.sum() * 0
    same = torch.from_numpy((dominant[:, :, None] == dominant[:, None, :]) & known[:, None, :]).float().to(att.device)
    share = (att * same).sum(2) / att.sum(2).clamp_min(1e-8)
    nll = -torch.log(share + 1e-4)[torch.from_numpy(known).to(att.device)]
    is_obj = torch.from_numpy(dominant[known] < N_CLASSES).to(att.device)
    if is_obj.any() and (~is_obj).any():
        return object_share * nll[is_obj].mean() + (1 - object_share) * nll[~is_obj].mean()
    return nll.mean()


def _soft_patch_loss(logp: torch.Tensor, hist: np.ndarray, object_share: float) -> torch.Tensor:
    """Cross-entropy of per-patch log-probabilities (n, 12) against the pixel shares of the known
    concepts; object (>= 30 % class pixels) and background patches weighted ``object_share`` :
    1 - ``object_share``. Patches mostly of distractors or clutter (``OTHER``) are pushed towards
    any background kind with weight 0.25. Patches under half inside the view are left out."""
    area = hist.sum(1)
    known = hist[:, :OTHER].sum(1)
    valid = area >= 0.5 * PATCH * PATCH
    frac_known = known / np.maximum(area, 1)
    sel_k, sel_o = valid & (frac_known >= 0.5), valid & (frac_known < 0.5)
    terms = []
    if sel_k.any():
        target = torch.from_numpy(hist[sel_k, :OTHER] / known[sel_k, None]).float().to(logp.device)
        ce = -(target * logp[torch.from_numpy(np.nonzero(sel_k)[0]).to(logp.device)]).sum(1)
        is_obj = torch.from_numpy(hist[sel_k, :N_CLASSES].sum(1) / known[sel_k] >= 0.3).to(logp.device)
        if is_obj.any() and (~is_obj).any():
            terms.append(object_share * ce[is_obj].mean() + (1 - object_share) * ce[~is_obj].mean())
        else:
            terms.append(ce.mean())
    if sel_o.any():
        lo = logp[torch.from_numpy(np.nonzero(sel_o)[0]).to(logp.device)]
        terms.append(0.25 * -torch.logsumexp(lo[:, N_CLASSES:], dim=1).mean())
    return sum(terms) if terms else logp.sum() * 0


def _present_classes(hist: np.ndarray) -> np.ndarray:
    """(B, N_CLASSES) float32 labels of views from their (B, hw, N_CONCEPTS) patch histograms:
    a class is present with at least a quarter patch of pixels."""
    return (hist[:, :, :N_CLASSES].sum(1) >= 0.25 * PATCH * PATCH).astype(np.float32)


def _cam_loss(model, x: torch.Tensor, grid: tuple[int, int], hist: np.ndarray, text: torch.Tensor) -> torch.Tensor:
    """The pipeline's Softmax-Grad-CAM of every present class, min-max normalised, trained towards
    1 on patches at least half that class and towards 0 on patches under 10 % that class.

    ``x`` (B, 1 + hw, D) last-block inputs, ``hist`` (B, hw, N_CONCEPTS), ``text`` the class
    prompts' then the background prompts' embeddings (the CAM's softmax runs over all of them)."""
    from pipeline.cams.gradcam import cams_from_weights, gradcam_copies, gradcam_weights
    from pipeline.clip.model import block_forward

    labels = torch.from_numpy(_present_classes(hist))
    if labels.sum() == 0:
        return x.sum() * 0
    v = model.visual
    image_idx, target, mask = gradcam_copies(labels, text.shape[0] - N_CLASSES)
    idx, cls = image_idx.numpy(), target.numpy()
    image_idx, target, mask = image_idx.to(x.device), target.to(x.device), mask.to(x.device)
    xb = x[image_idx]
    block = v.transformer.resblocks[-1]
    a = block.ln_1(xb)
    out, _ = block_forward(block, xb, a)
    feats = v.ln_post(out)[:, 1:].mean(dim=1) @ v.proj
    logits = model.logit_scale.exp() * F.normalize(feats, dim=-1) @ F.normalize(text, dim=-1).T
    weights = gradcam_weights(a, logits, target, mask, create_graph=True)
    cams = cams_from_weights(a, weights, grid).reshape(len(target), -1).clamp_min(0)
    lo, hi = cams.amin(1, keepdim=True), cams.amax(1, keepdim=True)
    cams = (cams - lo) / (hi - lo + 1e-5)
    area = hist[idx].sum(2)
    share = torch.from_numpy(hist[idx, :, cls] / np.maximum(area, 1)).float().to(x.device)
    inside = torch.from_numpy(area > 0).float().to(x.device)
    pos, neg = (share >= 0.5).float() * inside, (share < 0.1).float() * inside
    eps = 1e-4
    lp = -(torch.log(cams + eps) * pos).sum(1) / pos.sum(1).clamp_min(1)
    ln = -(torch.log(1 - cams + eps) * neg).sum(1) / neg.sum(1).clamp_min(1)
    return (lp + ln).mean()


class _Trainer:
    """The model, the phase's learnable extras and optimizer, and the data stream of one run."""

    def __init__(self, cfg: ClipTrainingConfig, data, device: torch.device | str = "cpu", precision: str = "fp32"):
        from pipeline.prompts.class_names import VOC_BACKGROUND_NAMES

        self.cfg = cfg
        self.images, self.concepts = data
        self.device, self.precision = torch.device(device), precision
        torch.manual_seed(cfg.seed)
        # initialised on the CPU whatever the device: the same initial weights everywhere
        self.model = create_demo_clip(cfg.seed)
        with torch.no_grad():
            self.model.logit_scale.fill_(math.log(cfg.logit_scale))
        self.model.to(self.device).train()
        embed = self.model.text_projection.shape[1]
        gen = torch.Generator().manual_seed(cfg.seed + 11)
        self.protos = torch.nn.Parameter(torch.randn(N_CONCEPTS - 1, embed, generator=gen).to(self.device))
        self.patch_logscale = torch.nn.Parameter(torch.zeros((), device=self.device))
        self.image_bias = torch.nn.Parameter(torch.zeros((), device=self.device))
        self.encoder = CaptionEncoder()
        self.canonical = [CLASS_TEMPLATES[0].format(c) for c in DEMO_CLASSES]
        self.cam_texts = self.canonical + [f"a photo of the {n}." for n in VOC_BACKGROUND_NAMES]
        self.phase_index, self.step = 0, 0
        self.seconds = 0.0
        self._start_phase()

    def _start_phase(self) -> None:
        phase = self.cfg.phases[self.phase_index]
        with torch.no_grad():
            self.patch_logscale.fill_(math.log(self.cfg.patch_scale))
            self.image_bias.fill_(-2.0)
        extras = [self.patch_logscale, self.image_bias] + ([self.protos] if phase.prototypes else [])
        named = list(self.model.named_parameters())
        decay = [q for n, q in named if q.ndim >= 2 and "embedding" not in n]
        rest = [q for n, q in named if not (q.ndim >= 2 and "embedding" not in n)] + extras
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=phase.lr, betas=(0.9, 0.98))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(s, phase))
        self.rng = np.random.default_rng([self.cfg.seed, 7, self.phase_index])

    @property
    def done(self) -> bool:
        return self.phase_index >= len(self.cfg.phases)

    def state(self) -> dict:
        return {"config": asdict(self.cfg), "phase_index": self.phase_index, "step": self.step,
                "seconds": self.seconds, "model": self.model.state_dict(),
                "extras": {"protos": self.protos.detach().clone(), "patch_logscale": self.patch_logscale.detach().clone(),
                           "image_bias": self.image_bias.detach().clone()},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": self.rng.bit_generator.state}

    def load(self, state: dict) -> None:
        self.phase_index, self.step, self.seconds = state["phase_index"], state["step"], state["seconds"]
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            self.protos.copy_(state["extras"]["protos"])
        if self.done:
            return
        self._start_phase()
        if self.step == 0:
            return  # a phase starts fresh: optimizer, schedule, data stream and scalars as above
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.rng.bit_generator.state = state["rng"]
        with torch.no_grad():
            self.patch_logscale.copy_(state["extras"]["patch_logscale"])
            self.image_bias.copy_(state["extras"]["image_bias"])


    def train_step(self) -> dict:
        from pipeline.precision import autocast

        cfg, phase, rng = self.cfg, self.cfg.phases[self.phase_index], self.rng
        crop = int(cfg.crop_sizes[int(rng.integers(len(cfg.crop_sizes)))])
        picks = rng.choice(len(self.images), size=min(cfg.batch_size, len(self.images)), replace=False)
        views, cons = zip(*[sample_view(self.images[i], self.concepts[i], crop, cfg.scale_range, rng,
                                        cfg.object_centred) for i in picks])
        with autocast(self.device, self.precision):
            loss, losses = self._losses(phase, rng, views, cons)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.step += 1
        if self.step == phase.steps:
            self.phase_index, self.step = self.phase_index + 1, 0
            if not self.done:
                self._start_phase()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, (_, v) in losses.items()}}

    def _losses(self, phase: ClipPhase, rng: np.random.Generator, views, cons):
        """The step's total loss and its weighted terms (the views are sampled on the CPU, then
        moved: the same batches on every device)."""
        cfg, model = self.cfg, self.model
        images = to_model_input(np.stack(views)).to(self.device)
        # the trunk of the pipeline's frozen encoder (pipeline.clip.model), embeddings uncast
        x, attention = vision_trunk(model.visual, images, cfg.attention_blocks if phase.affinity_weight > 0 else 0,
                                    cast=False)
        grid = (images.shape[-2] // PATCH, images.shape[-1] // PATCH)
        feats = _last_block_features(model, x)
        B, L, E = feats.shape
        hist = np.stack([patch_histograms(c) for c in cons]).reshape(B, L, N_CONCEPTS)
        text = F.normalize(self.encoder(model, concept_prompts(rng, cfg.canonical_prompt)), dim=-1)
        patches = F.normalize(feats.reshape(B * L, E), dim=-1)
        temperature = self.patch_logscale.exp().clamp(max=100)
        heads = F.normalize(self.protos, dim=-1) if phase.prototypes else text
        losses = {"patch": (cfg.patch_weight, _soft_patch_loss(
            F.log_softmax(temperature * patches @ heads.T, dim=-1), hist.reshape(B * L, -1), cfg.object_share))}
        if phase.prototypes:
            prompts, concept = [], []
            for _ in range(cfg.text_templates):
                prompts += concept_prompts(rng, cfg.canonical_prompt)
                concept += list(range(N_CONCEPTS - 1))
            emb = F.normalize(self.encoder(model, prompts), dim=-1)
            cos = emb @ F.normalize(self.protos, dim=-1).detach().T
            target = torch.tensor(concept, device=self.device)
            losses["text"] = (cfg.text_weight, F.cross_entropy(30.0 * cos, target)
                              + (1 - cos[torch.arange(len(concept), device=self.device), target]).mean())
            logp = F.log_softmax(temperature * patches @ text.T, dim=-1)
            losses["patch_text"] = (cfg.patch_text_weight, _soft_patch_loss(logp, hist.reshape(B * L, -1), 1.0))
            class_heads = F.normalize(self.protos[:N_CLASSES], dim=-1)
        else:
            class_heads = F.normalize(self.encoder(model, self.canonical), dim=-1)
        image = F.normalize(feats.mean(1), dim=-1)
        logits = model.logit_scale.exp().clamp(max=cfg.max_logit_scale) * image @ class_heads.T + self.image_bias
        losses["image"] = (cfg.image_weight, F.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(_present_classes(hist)).to(self.device)))
        if phase.cam_weight > 0:
            k = min(cfg.cam_views, B)
            losses["cam"] = (phase.cam_weight, _cam_loss(model, x[:k], grid, hist[:k],
                                                         self.encoder(model, self.cam_texts)))
        if phase.affinity_weight > 0:
            losses["affinity"] = (phase.affinity_weight, _affinity_loss(attention, hist, cfg.object_share))
        return sum(w * v for w, v in losses.values()), losses


STATE_FILE = "clip_training_state.pt"
"""Resume state of a demo CLIP run, in its output folder."""


def train_clip(cfg: ClipTrainingConfig, data=None, progress: Callable[[int, dict], None] | None = None,
               state_dir: str | Path | None = None, checkpoint_every: int = 100,
               on_phase_end: Callable[[str, torch.nn.Module], None] | None = None,
               device: torch.device | str = "cpu", precision: str = "fp32") -> torch.nn.Module:
    """Train the demo CLIP on ``device`` (forward passes and losses under ``precision``,
    ``pipeline.precision``); deterministic for a given config, device and thread count.
    Initialisation and data sampling run on the CPU, so every device starts from the same
    weights and sees the same views.

    With ``state_dir``, the run writes ``STATE_FILE`` there every ``checkpoint_every`` steps and
    at each phase end, and a rerun with the same config continues from it (same result as an
    uninterrupted run); a state of another config is an error. ``on_phase_end(name, model)`` runs
    after each phase (evaluation curves).
    """
    trainer = _Trainer(cfg, data if data is not None else training_images(cfg), device, precision)
    path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    state = load_resume_state(path, asdict(cfg))
    if state is not None:
        trainer.load(state)
    done_steps = sum(p.steps for p in cfg.phases[:trainer.phase_index]) + trainer.step
    while not trainer.done:
        phase = cfg.phases[trainer.phase_index]
        start = time.perf_counter()
        stats = trainer.train_step()
        trainer.seconds += time.perf_counter() - start
        done_steps += 1
        ended = trainer.step == 0
        if path is not None and (ended or done_steps % checkpoint_every == 0):
            save_atomic(trainer.state(), path)
        if progress is not None:
            progress(done_steps - 1, {**stats, "phase": phase.name})
        if ended and on_phase_end is not None:
            on_phase_end(phase.name, trainer.model)
            trainer.model.train()
    return trainer.model.eval()


def load_resume_state(path: Path | None, config: dict) -> dict | None:
    """The resume state at ``path`` (None: no path or no file), read as data only; one of another
    config, or one holding anything but tensors and plain data, is refused (TensorFileError)."""
    if path is None or not path.is_file():
        return None
    state = tensorfile.load_dict(path, "demo training resume state", f"delete it (rm {path}) to "
                                 "train from the start", ("config",))
    if state["config"] != config:
        raise tensorfile.TensorFileError(f"{path} is the resume state of another configuration; "
                                         "delete it to start over")
    return state


save_atomic = tensorfile.save_atomic

# -- evaluation -----------------------------------------------------------------------------------


EVAL_OFFSET = 1_000_000
"""Held-out images of the training stream start here (never trained on, never in a demo split)."""


def evaluation_images(world_seed: int, n: int) -> list[WorldImage]:
    return [render(world_seed, EVAL_OFFSET + i, TRAINING_STREAM) for i in range(n)]


EVAL_BG_POWERS = (0.25, 0.5, 0.75, *range(1, 11))
"""Background powers swept by :func:`evaluate_clip` (below 1: narrower CAMs)."""


def evaluate_clip(model, samples: list[WorldImage], bg_powers=EVAL_BG_POWERS, precision: str = "fp32") -> dict:
    """Held-out quality of a demo CLIP through the pipeline's own inference code (percent).

    Hand-written prompts ("a photo of a car.", the 25 VOC background names) stand in for the
    learned ones: classification mAP of the image features, and the mIoU of the Softmax-GradCAMs
    of the labelled classes (best background power), next to the all-background score. The
    model runs on its device under ``precision`` (``pipeline.precision``).
    """
    import copy

    from pipeline.precision import autocast

    from pipeline.cams.score import cam_score
    from pipeline.clip.model import FrozenClip, inference_resize
    from pipeline.metrics import CamEvaluator, ConfusionAccumulator, percent
    from pipeline.prompts.class_names import VOC_BACKGROUND_NAMES
    from pipeline.prompts.learner import clip_logits
    from pipeline.prompts.training import batched_gradcam

    clip = FrozenClip(copy.deepcopy(model).float(), untrained=False)
    device = clip.visual.proj.device
    encoder = CaptionEncoder()
    texts = [f"a photo of a {c}." for c in DEMO_CLASSES] + [f"a photo of the {b}." for b in VOC_BACKGROUND_NAMES]
    with torch.no_grad(), autocast(device, precision):
        text = encoder(clip.model, texts)
    cams = CamEvaluator(N_CLASSES + 1, bg_powers)
    background = ConfusionAccumulator(N_CLASSES + 1)
    scores, targets = [], []
    for s in samples:
        image = inference_resize(jpeg_roundtrip(s.image))
        gh, gw = image.shape[0] // PATCH, image.shape[1] // PATCH
        y = np.zeros(N_CLASSES, np.float32)
        y[list(s.classes)] = 1
        with autocast(device, precision):
            x = clip.encode_to_last_block(to_model_input(image[None]).to(device))
            with torch.no_grad():
                logits = clip_logits(clip.last_block_tail(x)[1], text, clip.logit_scale)[0, :N_CLASSES]
            cam = batched_gradcam(clip, text, x, torch.from_numpy(y)[None], N_CLASSES, (gh, gw), create_graph=False)
        scores.append(logits.float().cpu().numpy())
        targets.append(y)
        cams.add(cam_score(cam.detach().float().cpu().numpy(), s.label.shape), np.array(s.classes), s.label)
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
