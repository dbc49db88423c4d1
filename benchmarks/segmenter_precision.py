"""bf16 vs fp32 (``compute.precision``) for the segmenter on CPU: prediction agreement and speed.

A tiny segmenter (the embedded default's architecture) is trained in fp32 on the demo world's
ground truth (train images 0..n_train-1, as ``prepare`` draws them), then the demo val images
(the next n_val) are predicted with multi-scale + flip inference in fp32 and in bf16 from the
same weights. Reported: pixels whose argmax agrees, the largest probability difference, the
mIoU of both against ground truth; with ``--train-bf16`` also a second training run in bf16 from
the same initialisation and random stream (its mIoU and agreement with the fp32-trained model).
Inference times are interleaved (benchmarks/harness.py). Ends with
``RATIO segmenter_bf16_speed=<fp32 time / bf16 time>`` (CPU; bf16 is meant for CUDA).

    .venv/bin/python benchmarks/segmenter_precision.py [--iterations 150] [--train-bf16]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from harness import print_ratio, time_interleaved  # first: puts this checkout on sys.path
from pipeline.demo.world import DEMO_CLASSES, render  # noqa: E402
from pipeline.metrics import ConfusionAccumulator  # noqa: E402
from pipeline.segmenter.model import build_segmenter, predict_probs  # noqa: E402
from pipeline.segmenter.training import (  # noqa: E402
    SegmentationAugment, build_optimizer, collate, poly_lr, train_step,
)

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


def train(data, args, precision: str) -> torch.nn.Module:
    net = build_segmenter("tiny", len(DEMO_CLASSES) + 1, seed=0, output_stride=args.output_stride)
    opt = build_optimizer(net)
    augment = SegmentationAugment(crop_size=args.crop, scale_range=(0.5, 2.0))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for step in range(args.iterations):
        batch = rng.choice(len(data), size=args.batch, replace=False)
        x, y = collate([augment(*data[i], rng) for i in batch])
        loss = train_step(net, opt, x, y, poly_lr(0.01, step, args.iterations), precision=precision)
        if (step + 1) % 50 == 0:
            print(f"  {precision} training: iteration {step + 1}, loss {loss:.3f}", flush=True)
    return net.eval()


def predict_all(net, val, precision):
    return [predict_probs(net, image, SCALES, flip=True, precision=precision) for image, _ in val]


def miou(probs, val) -> float:
    acc = ConfusionAccumulator(len(DEMO_CLASSES) + 1)
    for p, (_, gt) in zip(probs, val):
        acc.add(p.argmax(0).numpy(), gt)
    return acc.scores().miou


def agreement(a, b) -> float:
    same = sum(int((p.argmax(0) == q.argmax(0)).sum()) for p, q in zip(a, b))
    return same / sum(p[0].numel() for p in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-val", type=int, default=24)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--output-stride", type=int, default=16, help="the embedded default's (paper: 8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-bf16", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = [(s.image, s.label) for s in map(lambda i: render(0, i), range(args.n_train))]
    val = [(s.image, s.label) for s in map(lambda i: render(0, i), range(args.n_train, args.n_train + args.n_val))]
    pixels = sum(gt.size for _, gt in val)
    print(f"demo: {args.n_train} train, {args.n_val} val images ({pixels} val pixels); tiny segmenter, "
          f"output stride {args.output_stride}, {args.iterations} iterations at batch {args.batch}", flush=True)
    net = train(data, args, "fp32")
    p32, p16 = predict_all(net, val, "fp32"), predict_all(net, val, "bf16")
    diff = max(float((a - b).abs().max()) for a, b in zip(p32, p16))
    print(f"fp32-trained model, inference fp32 vs bf16: argmax agreement {agreement(p32, p16):.5f}, "
          f"max |prob difference| {diff:.4f}, val mIoU fp32 {miou(p32, val):.4f} / bf16 {miou(p16, val):.4f}")
    if args.train_bf16:
        net16 = train(data, args, "bf16")
        q16 = predict_all(net16, val, "bf16")
        print(f"bf16-trained model (bf16 inference): val mIoU {miou(q16, val):.4f}, "
              f"argmax agreement with the fp32-trained model {agreement(p32, q16):.5f}")
    image = val[0][0]
    t32, t16 = time_interleaved(
        [lambda: predict_probs(net, image, SCALES, True, "fp32"), lambda: predict_probs(net, image, SCALES, True, "bf16")],
        steps=5,
    )
    print(f"inference of one {image.shape[1]}x{image.shape[0]} image (5 scales + flip): fp32 {t32 * 1e3:.0f} ms, "
          f"bf16 {t16 * 1e3:.0f} ms (median of 5, interleaved)")
    print_ratio("segmenter_bf16_speed", t32 / t16)


if __name__ == "__main__":
    main()
