"""Per-image CAM time for both prompt sets: shared inference cache vs two full encoder passes.

Real ViT-B/16 size (random weights), a 512×384 inference image (32×24 patches), two present
classes, VOC prompt sets. Cached: for cls and seg, the last block + batched Grad-CAM + CAA on the
stored last-block input and attention (what ``wsss cams`` does). Uncached: for each prompt set a
full encoder pass (with the last-8 attention) and the same CAM + CAA. Prints ``RATIO cams=...``.

    .venv/bin/python benchmarks/cams.py [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch

from harness import print_ratio, sync, time_interleaved  # first: puts this checkout on sys.path
from pipeline.cams.caa import class_aware_attention_affinity
from pipeline.prompts.class_names import VOC_BACKGROUND_NAMES, VOC_PROMPT_NAMES
from pipeline.clip.model import create_clip
from pipeline.prompts.training import batched_gradcam
from pipeline.prompts.learner import PromptLearner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    clip = create_clip("ViT-B-16", seed=0).to(device)
    n_fg = len(VOC_PROMPT_NAMES)
    texts = {}
    for which, (names, shared, pos) in {
        "cls": (list(VOC_PROMPT_NAMES) + list(VOC_BACKGROUND_NAMES), True, "end"),
        "seg": (list(VOC_PROMPT_NAMES) + [""] * len(VOC_BACKGROUND_NAMES), False, "front"),
    }.items():
        learner = PromptLearner(clip.model, names, n_fg, 16, shared, pos).to(device)
        with torch.no_grad():
            texts[which] = learner.text_features(clip.model)
    image = torch.randn(1, 3, 384, 512, generator=torch.Generator().manual_seed(0)).to(device)
    grid = (24, 32)
    labels = torch.zeros(1, n_fg, device=device)
    labels[0, [4, 14]] = 1

    def cams(x, att, which):
        cam = batched_gradcam(clip, texts[which], x, labels, n_fg, grid, create_graph=False).detach()
        return class_aware_attention_affinity(cam, att[0], 1, 0.4, 2, "score")


    with torch.no_grad():
        x, att = clip.encode_with_attention(image, 8)

    def from_cache():
        for which in ("cls", "seg"):
            cams(x, att, which)

    def uncached():
        for which in ("cls", "seg"):
            with torch.no_grad():
                xi, ai = clip.encode_with_attention(image, 8)
            cams(xi, ai, which)

    def cache_once():
        with torch.no_grad():
            clip.encode_with_attention(image, 8)

    t_cache, t_full, t_build = time_interleaved([from_cache, uncached, cache_once], args.repeats,
                                                warmup=1, sync=lambda: sync(device))
    print(f"per image, both prompt sets: from cache {t_cache:.3f} s, two full passes {t_full:.3f} s; "
          f"building the cache once {t_build:.3f} s ({device})")
    print_ratio("cams", t_full / t_cache)


if __name__ == "__main__":
    main()
