"""Images per second of ``sams_seed`` against a per-mask Python loop of the same formula (§5).

Inputs are random but seeded: 500x375 images (VOC's typical size), 60 rectangular and elliptic
quasi-superpixels with random levels, 3 present classes, CAMs at the 32x24 patch grid. Both
implementations must give identical seeds. Prints both rates and ends with
``RATIO seeds=<loop time / vectorised time>``.

    .venv/bin/python benchmarks/seeds.py [--images 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import time

# One thread for every library, so the ratio measures the algorithm, not the core count.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import print_ratio  # noqa: E402  (first: puts this checkout on sys.path)
from pipeline.seeds.sams import sams_seed  # noqa: E402

H, W, N_MASKS, N_CLASSES, ALPHA = 375, 500, 60, 3, 0.7


def make_inputs(n: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    out = []
    for _ in range(n):
        cam = rng.normal(size=(N_CLASSES, (H + 15) // 16, (W + 15) // 16)).astype(np.float32)
        fg_cls = np.sort(rng.choice(20, N_CLASSES, replace=False))
        cy, cx = rng.uniform(0, H, N_MASKS), rng.uniform(0, W, N_MASKS)
        ry, rx = rng.uniform(10, H / 2, N_MASKS), rng.uniform(10, W / 2, N_MASKS)
        ellipse = rng.random(N_MASKS) < 0.5
        dy = (yy[None] - cy[:, None, None]) / ry[:, None, None]
        dx = (xx[None] - cx[:, None, None]) / rx[:, None, None]
        masks = np.where(ellipse[:, None, None], dy**2 + dx**2 <= 1,
                         (np.abs(dy) <= 1) & (np.abs(dx) <= 1))
        levels = rng.integers(0, 3, N_MASKS).astype(np.uint8)
        out.append((cam, fg_cls, masks, levels))
    return out


def loop_seed(cam, fg_cls, masks, levels, alpha, image_hw):
    """§5 written the straightforward way: one Python iteration per mask, twice."""
    M = F.interpolate(torch.from_numpy(cam)[None], size=tuple(image_hw), mode="bilinear",
                      align_corners=False)[0].clamp_min(0)
    means = []
    for mask in masks:
        m = torch.from_numpy(mask)
        means.append(M[:, m].sum(dim=1) / m.sum())
    m = torch.stack(means, dim=1).clamp_min(0)
    lo, hi = m.min(dim=1, keepdim=True).values, m.max(dim=1, keepdim=True).values
    s = (m - lo) / (hi - lo + 1e-7)
    scores = torch.cat([((1 - s.max(dim=0).values) ** alpha)[None], s])
    entries = []
    for i in range(len(masks)):
        k = int(scores[:, i].argmax())
        label = 0 if k == 0 else int(fg_cls[k - 1]) + 1
        entries.append((int(levels[i]), float(scores[k, i]), i, label))
    seed = np.zeros(tuple(image_hw), np.uint8)
    for _, _, i, label in sorted(entries):
        seed[masks[i]] = label
    return seed


def rate(fn, inputs, repeats: int) -> tuple[float, list[np.ndarray]]:
    """Best-of-``repeats`` seconds per image, and the outputs."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(*x, ALPHA, (H, W)) for x in inputs]
        best = min(best, (time.perf_counter() - t0) / len(inputs))
    return best, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    inputs = make_inputs(args.images)
    t_ours, ours = rate(sams_seed, inputs, args.repeats)
    t_loop, loop = rate(loop_seed, inputs, args.repeats)
    for a, b in zip(ours, loop):
        assert np.array_equal(a, b), "vectorised and loop seeds differ"
    print(f"{args.images} images {W}x{H}, {N_MASKS} masks, {N_CLASSES} classes, 1 thread")
    print(f"sams_seed (vectorised): {1 / t_ours:8.2f} images/s  ({1000 * t_ours:.1f} ms/image)")
    print(f"per-mask loop:          {1 / t_loop:8.2f} images/s  ({1000 * t_loop:.1f} ms/image)")
    print_ratio("seeds", t_loop / t_ours)


if __name__ == "__main__":
    main()
