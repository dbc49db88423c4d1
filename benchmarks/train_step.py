"""Time per prompt-training step at real ViT-B/16 size: cached path vs exact path.

Random weights (open_clip ``ViT-B-16``, pretrained=None), batch 16 of 224² views, the VOC prompt
sets (20 foreground + 25 background). The cached path starts from stored last-block inputs and
runs the last block + text encoder; the exact path runs the full image encoder first (without
the per-sample image decoding and augmentation it also needs in a real run, so the ratio is a
lower bound). Prints ``RATIO train_step_cls=<exact/cached>`` and ``RATIO train_step_seg=...``.

    .venv/bin/python benchmarks/train_step.py [--steps 3] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch

from pipeline.prompts.class_names import VOC_BACKGROUND_NAMES, VOC_PROMPT_NAMES
from pipeline.clip.model import create_clip
from pipeline.prompts.training import classification_loss, segmentation_loss
from pipeline.prompts.learner import PromptLearner
from timing import time_interleaved  # benchmarks/timing.py (the script's folder is on sys.path)


def _batch(batch: int, n_fg: int, gen: torch.Generator):
    """Image labels and seed crops with one or two class rectangles per view."""
    labels = torch.zeros(batch, n_fg)
    seeds = torch.zeros(batch, 224, 224, dtype=torch.uint8)
    for i in range(batch):
        for k, c in enumerate(torch.randperm(n_fg, generator=gen)[: 1 + i % 2].tolist()):
            labels[i, c] = 1
            seeds[i, 20 + 80 * k : 120 + 80 * k, 30 : 190] = c + 1
    return labels, seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    clip = create_clip("ViT-B-16", seed=0).to(device)
    images = torch.randn(args.batch, 3, 224, 224, generator=gen).to(device)
    with torch.no_grad():
        cached = clip.encode_to_last_block(images).half()  # as stored in train_views.zarr
    n_fg = len(VOC_PROMPT_NAMES)
    labels, seeds = _batch(args.batch, n_fg, gen)
    labels, seeds = labels.to(device), seeds.to(device)
    styles = {
        "cls": dict(names=list(VOC_PROMPT_NAMES) + list(VOC_BACKGROUND_NAMES), shared_context=True,
                    class_position="end", init_std=0.015),
        "seg": dict(names=list(VOC_PROMPT_NAMES) + [""] * len(VOC_BACKGROUND_NAMES),
                    shared_context=False, class_position="front", init_std=0.0125),
    }
    ratios = {}
    for which, style in styles.items():
        learner = PromptLearner(clip.model, style["names"], n_fg, 16, style["shared_context"],
                                style["class_position"], style["init_std"]).to(device)
        opt = torch.optim.SGD([learner.ctx], lr=1e-3, momentum=0.9, weight_decay=5e-4)

        def step(x):
            if which == "cls":
                loss = classification_loss(clip, learner, x, labels)
            else:
                loss, _ = segmentation_loss(clip, learner, x, seeds)
            opt.zero_grad()
            loss.backward()
            opt.step()

        def exact():
            with torch.no_grad():
                x = clip.encode_to_last_block(images)
            step(x)

        t_cached, t_exact = time_interleaved([lambda: step(cached.float()), exact], args.steps,
                                              args.warmup, sync)
        ratios[which] = t_exact / t_cached
        print(f"{which}: cached {t_cached:.3f} s/step, exact {t_exact:.3f} s/step (medians) "
              f"(batch {args.batch}, {device})", flush=True)
    for which, r in ratios.items():
        print(f"RATIO train_step_{which}={r:.2f}")


if __name__ == "__main__":
    main()
