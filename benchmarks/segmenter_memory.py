"""Training memory per sample of DeepLabV3+ ResNet-101 at 512² crops: output stride 8 vs 16,
and what ``segmenter.sub_batches`` saves (CPU measurement; the network is the paper's).

Random encoder weights in torchvision's ``resnet101`` state-dict format go through the real
loading path (``build_segmenter("deeplabv3plus_r101", 21, encoder_weights=...)``). Each
configuration runs in a fresh process: the model, SGD optimizer and one warm-up step at 64²
(which allocates gradients and momentum) come first, then the peak-RSS counter is reset
(``/proc/self/clear_refs`` 5) and one ``train_step`` at 512² runs. Reported per configuration:

- ``peak``: peak RSS during the step minus RSS before it (activations, their gradients,
  temporaries; not the weights, gradients and momentum held before),
- ``saved``: bytes of the distinct tensors autograd saved for backward (exact accounting through
  ``torch.autograd.graph.saved_tensors_hooks``; for sub-batches, the largest pass).

Per sample = difference between batch sizes (BatchNorm in training needs at least 2 images), so
fixed costs cancel. On a GPU, add about 0.7 GB (weights + gradients + momentum of 59M parameters)
plus the allocator's slack. Ends with ``RATIO segmenter_memory_stride=<stride 8 / stride 16 per
sample>`` and ``RATIO segmenter_memory_sub_batches=<peak 1 pass / peak with --sub-batches>``.

    .venv/bin/python benchmarks/segmenter_memory.py [--batches 2 3] [--sub-batches 2] [--precision fp32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import print_ratio, reset_peak_rss, status_kib

CROP, CLASSES = 512, 21


def child(weights: str, stride: int, batch: int, sub_batches: int, precision: str) -> dict:
    import torch

    from pipeline.segmenter.model import build_segmenter
    from pipeline.segmenter.training import build_optimizer, train_step

    torch.manual_seed(0)
    net = build_segmenter("deeplabv3plus_r101", CLASSES, encoder_weights=weights, output_stride=stride)
    opt = build_optimizer(net)
    small = torch.randn(2, 3, 64, 64), torch.randint(0, CLASSES, (2, 64, 64))
    train_step(net, opt, *small, 0.01, precision=precision)
    x = torch.randn(batch, 3, CROP, CROP)
    y = torch.randint(0, CLASSES, (batch, CROP, CROP))
    passes: list[dict[int, int]] = []

    def pack(t):
        if not passes or getattr(net, "_new_pass", False):
            passes.append({})
            net._new_pass = False
        passes[-1][t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    # A new pass starts at each forward of the whole network.
    net.register_forward_pre_hook(lambda m, i: setattr(m, "_new_pass", True))
    before = status_kib("VmRSS")
    if not reset_peak_rss():  # the peak-RSS counter (VmHWM) starts again from here
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(net, opt, x, y, 0.01, sub_batches=sub_batches, precision=precision)
    peak = status_kib("VmHWM")
    return {"stride": stride, "batch": batch, "sub_batches": sub_batches, "precision": precision,
            "peak_gb": (peak - before) / 2**20, "saved_gb": max(sum(p.values()) for p in passes) / 2**30}


def run(weights: str, stride: int, batch: int, sub_batches: int, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--child", weights, str(stride), str(batch), str(sub_batches), precision]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ}).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"stride {stride:2d}  batch {batch}  sub_batches {sub_batches}  {precision}:  "
          f"peak +{result['peak_gb']:.2f} GB  saved {result['saved_gb']:.2f} GB", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs=2, default=[2, 3])
    ap.add_argument("--sub-batches", type=int, default=2, help="0: skip the sub-batch run")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--strides", type=int, nargs="+", default=[16, 8])
    args = ap.parse_args()
    import torch
    import torchvision

    b1, b2 = args.batches
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "resnet101.pth")
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet101().state_dict(), weights)
        per_sample = {}
        for stride in args.strides:
            r1, r2 = (run(weights, stride, b, 1, args.precision) for b in (b1, b2))
            per_sample[stride] = {k: (r2[k] - r1[k]) / (b2 - b1) for k in ("peak_gb", "saved_gb")}
            print(f"stride {stride:2d} per sample: peak {per_sample[stride]['peak_gb']:.2f} GB, "
                  f"saved activations {per_sample[stride]['saved_gb']:.2f} GB", flush=True)
        if args.sub_batches > 1:
            stride = min(args.strides)
            batch = b1 * args.sub_batches
            one = run(weights, stride, batch, 1, args.precision)
            split = run(weights, stride, batch, args.sub_batches, args.precision)
    if 8 in per_sample and 16 in per_sample:
        print_ratio("segmenter_memory_stride", per_sample[8]["peak_gb"] / per_sample[16]["peak_gb"])
    if args.sub_batches > 1:
        print_ratio("segmenter_memory_sub_batches", one["peak_gb"] / split["peak_gb"])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        w, s, b, n, p = sys.argv[2:7]
        print(json.dumps(child(w, int(s), int(b), int(n), p)))
    else:
        main()
