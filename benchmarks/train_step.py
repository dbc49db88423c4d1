"""Per prompt-training step at real ViT-B/16 size: three comparisons, each with its own RATIO.

``--what paths`` (default): cached path vs exact path. Random weights (open_clip ``ViT-B-16``,
pretrained=None), batch 16 of 224² views, the VOC prompt sets (20 foreground + 25 background). The
cached path starts from stored last-block inputs and runs the last block + text encoder; the exact
path runs the full image encoder first (without the per-sample image decoding and augmentation it
also needs in a real run, so the ratio is a lower bound). Prints ``RATIO train_step_cls=<exact/cached>``
and ``RATIO train_step_seg=...``.

``--what truncation``: the cached step with the text encoder over all 77 positions (the reference,
the default) vs only up to the last EOS (``prompts.<which>.truncate_text: true``). Prints
``RATIO text_truncation_<which>=<full/truncated>``.

``--what reads``: reading the cached views of one batch from ``train_views.zarr`` (K=16 views of
197×768 fp16 tokens per image): the whole group of each drawn image (the previous layout and
reader) vs the one view it uses (one chunk per view, ``ImageStore.read_array``). Prints
``RATIO view_reads=<whole/one>``.

    .venv/bin/python benchmarks/train_step.py [--what paths|truncation|reads] [--steps 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness import print_ratio, sync, time_interleaved  # first: puts this checkout on sys.path
from pipeline.prompts.class_names import VOC_BACKGROUND_NAMES, VOC_PROMPT_NAMES
from pipeline.clip.model import create_clip
from pipeline.prompts.training import classification_loss, segmentation_loss
from pipeline.prompts.learner import PromptLearner


def _batch(batch: int, n_fg: int, gen: torch.Generator):
    """Image labels and seed crops with one or two class rectangles per view."""
    labels = torch.zeros(batch, n_fg)
    seeds = torch.zeros(batch, 224, 224, dtype=torch.uint8)
    for i in range(batch):
        for k, c in enumerate(torch.randperm(n_fg, generator=gen)[: 1 + i % 2].tolist()):
            labels[i, c] = 1
            seeds[i, 20 + 80 * k : 120 + 80 * k, 30 : 190] = c + 1
    return labels, seeds


STYLES = {
    "cls": dict(names=list(VOC_PROMPT_NAMES) + list(VOC_BACKGROUND_NAMES), shared_context=True,
                class_position="end", init_std=0.015),
    "seg": dict(names=list(VOC_PROMPT_NAMES) + [""] * len(VOC_BACKGROUND_NAMES),
                shared_context=False, class_position="front", init_std=0.0125),
}


def _stepper(clip, which, labels, seeds, device, truncate=False):
    learner = PromptLearner(clip.model, STYLES[which]["names"], len(VOC_PROMPT_NAMES), 16,
                            STYLES[which]["shared_context"], STYLES[which]["class_position"],
                            STYLES[which]["init_std"], truncate=truncate).to(device)
    opt = torch.optim.SGD([learner.ctx], lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step(x):
        if which == "cls":
            loss = classification_loss(clip, learner, x, labels)
        else:
            loss, _ = segmentation_loss(clip, learner, x, seeds)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def bench_paths(args, clip, cached, images, labels, seeds, device) -> None:
    ratios = {}
    for which in STYLES:
        step = _stepper(clip, which, labels, seeds, device)

        def exact():
            with torch.no_grad():
                x = clip.encode_to_last_block(images)
            step(x)

        t_cached, t_exact = time_interleaved([lambda: step(cached.float()), exact], args.steps,
                                              args.warmup, lambda: sync(device))
        ratios[which] = t_exact / t_cached
        print(f"{which}: cached {t_cached:.3f} s/step, exact {t_exact:.3f} s/step (medians) "
              f"(batch {args.batch}, {device})", flush=True)
    for which, r in ratios.items():
        print_ratio(f"train_step_{which}", r)


def bench_truncation(args, clip, cached, labels, seeds, device) -> None:
    ratios = {}
    x = cached.float()
    for which in STYLES:
        full = _stepper(clip, which, labels, seeds, device, truncate=False)
        short = _stepper(clip, which, labels, seeds, device, truncate=True)
        t_full, t_short = time_interleaved([lambda: full(x), lambda: short(x)], args.steps,
                                           args.warmup, lambda: sync(device))
        ratios[which] = t_full / t_short
        print(f"{which}: text encoder over 77 positions {t_full:.3f} s/step, up to the last EOS "
              f"{t_short:.3f} s/step, saves {t_full - t_short:.3f} s/step (medians; batch "
              f"{args.batch}, {device})", flush=True)
    for which, r in ratios.items():
        print_ratio(f"text_truncation_{which}", r)


def bench_reads(args) -> None:
    from pipeline.store import ImageStore, write_group

    n_images, k, batch = args.images, 16, args.batch
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for layout in ("whole", "one"):
            path = Path(tmp) / f"{layout}.zarr"
            ImageStore.open_for_writing(path, {"fingerprint": layout})
            for i in range(n_images):
                tokens = (rng.standard_normal((k, 197, 768)) * 0.5).astype(np.float16)
                views = rng.random((k, 18)).astype(np.float32)
                chunks = {"tokens": (1, 197, 768)} if layout == "one" else None
                write_group(path, f"img{i:05d}", {"tokens": tokens, "views": views,
                                                  "labels": np.zeros(20, np.uint8)}, chunks=chunks)
            stores[layout] = ImageStore(path)
        ids = stores["one"].ids()
        size_mb = stores["whole"].image_path(ids[0]).stat().st_size / 2**20
        view_cache: dict[str, np.ndarray] = {}
        state = {"it": 0}

        def draws():
            r = np.random.default_rng(state["it"])
            state["it"] += 1
            return [(ids[int(i)], r) for i in r.choice(len(ids), batch)]

        def whole():  # the previous reader: every array of the group, then one view
            for image_id, r in draws():
                data = stores["whole"].read(image_id)
                j = int(r.integers(data["tokens"].shape[0]))
                data["tokens"][j], data["views"][j]

        def one():  # BatchSource._cached_view: view parameters once per image, one token chunk
            for image_id, r in draws():
                params = view_cache.get(image_id)
                if params is None:
                    params = view_cache[image_id] = stores["one"].read_array(image_id, "views")
                j = int(r.integers(params.shape[0]))
                stores["one"].read_array(image_id, "tokens", j), params[j]

        t_whole, t_one = time_interleaved([whole, one], args.steps, args.warmup)
        print(f"reading one batch of {batch} cached views ({n_images} images, K={k}, 197x768 fp16, "
              f"{size_mb:.1f} MB per image on disk): whole groups {t_whole:.3f} s/step, one view "
              f"chunk {t_one:.3f} s/step (medians)", flush=True)
        print_ratio("view_reads", t_whole / t_one)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=["paths", "truncation", "reads"], default="paths")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=64, help="reads: images in the store")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.what == "reads":
        return bench_reads(args)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    clip = create_clip("ViT-B-16", seed=0).to(device)
    images = torch.randn(args.batch, 3, 224, 224, generator=gen).to(device)
    with torch.no_grad():
        cached = clip.encode_to_last_block(images).half()  # as stored in train_views.zarr
    labels, seeds = _batch(args.batch, len(VOC_PROMPT_NAMES), gen)
    labels, seeds = labels.to(device), seeds.to(device)
    if args.what == "paths":
        bench_paths(args, clip, cached, images, labels, seeds, device)
    else:
        bench_truncation(args, clip, cached, labels, seeds, device)


if __name__ == "__main__":
    main()
