"""What ``benchmarks/gpu_check.py`` compares between a CUDA run of the tiny graph and the CPU run,
and how close each must be.

Each ``compare_*`` function reads one output of two project folders (the CPU reference and a CUDA
variant) and returns a line of measurements, or raises :class:`OutOfTolerance` with that line when
one is outside its bound in :data:`TOLERANCES`. Non-finite values are always outside.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class OutOfTolerance(AssertionError):
    """A CUDA output differs from the CPU's by more than its tolerance (one line)."""


@dataclass(frozen=True)
class Tolerances:
    """How close a CUDA variant's outputs must be to the CPU run's (fractions)."""

    seed_agreement: float
    """Least fraction of seed pixels (coarse, fine; all train images) equal to the CPU's."""
    cam_correlation: float
    """Least Pearson correlation of a CAM array (``cam``, ``cam_caa``) over all images' pixels."""
    cam_max_diff: float
    """Largest |CUDA - CPU| of a CAM array, as a fraction of the CPU array's largest |value|."""
    prompt_max_diff: float
    """Largest |CUDA - CPU| of a trained prompt context, as a fraction of the CPU's largest |value|
    (gpu_check starts the cls context at zero, so that is the training's update)."""
    prompt_loss_diff: float
    """Largest |CUDA - CPU| of a prompt training loss, as a fraction of max(|CPU loss|, 1)."""
    segmenter_loss_diff: float
    """Largest |CUDA - CPU| of a segmenter training loss, as a fraction of |CPU loss|."""
    prediction_agreement: float
    """Least fraction of prediction pixels (raw and SAMS post-processed) equal to the CPU's, the
    same (CPU-trained) segmenter predicting on both devices."""


# bf16 autocast: an 8-bit significand (~4e-3 relative per rounding) in SAM, CLIP, prompt training
# and the segmenter; the Grad-CAM and all post-processing stay fp32. Measured with the CPU's bf16
# autocast (gpu_check's tiny graph at compute.precision bf16 on the CPU, against fp32): seeds
# 97.3% (coarse) and 99.3% (fine) equal, CAM correlation >= 0.9995 and max diff 3.8%, prompts 8%
# (of the trained context, which starts at zero: the update alone), prompt loss 0.5%, segmenter
# loss 1.7%, predictions of the fp32-trained segmenter 99.5% (raw) and 100% (post-processed).
# CUDA's bf16 kernels round alike but sum in other orders: each bound is at least 3 times the
# difference measured (most 4 to 10 times), and still far from a defect: CAMs shifted by two
# patches on CUDA only drop the CAM correlation to ~0.8 (tests/test_gpu_check_defects.py); a
# doubled prompt gradient moves the context by 96%.
# The segmenter's own predictions are not compared: its bf16-trained twin agreed on 32% of the
# pixels after three steps (an untrained net's classes are near ties), so gpu_check predicts with
# the CPU-trained segmenter on both devices.
BF16 = Tolerances(seed_agreement=0.90, cam_correlation=0.99, cam_max_diff=0.15,
                  prompt_max_diff=0.25, prompt_loss_diff=2e-2, segmenter_loss_diff=0.1,
                  prediction_agreement=0.95)

# fp32: the same arithmetic in other kernels. Summation order moves results by ~1e-6 relative, and
# cuDNN convolutions run in TF32 by default (PyTorch's ``torch.backends.cudnn.allow_tf32``: a
# 10-bit significand, 8 times finer than bf16's) in SAM's and CLIP's patch embeddings and the
# segmenter, while matmuls stay fp32; fp32 differences should be well under an eighth of bf16's
# above. The bounds are near-exact, 3 to 40 times that eighth: seeds 99%, CAM correlation 0.999
# and max diff 2%, prompts 1% of the update. The segmenter losses keep 2% because its ASPP
# dropout draws from the device's own generator (over 5 dropout seeds the tiny segmenter's first
# three losses moved 0.2%).
FP32 = Tolerances(seed_agreement=0.99, cam_correlation=0.999, cam_max_diff=0.02,
                  prompt_max_diff=1e-2, prompt_loss_diff=5e-3, segmenter_loss_diff=0.02,
                  prediction_agreement=0.99)

TOLERANCES = {"fp32": FP32, "bf16": BF16}
"""``compute.precision`` -> the tolerances of a CUDA run in it against the CPU's fp32 run."""


# -- measures -------------------------------------------------------------------------------------

def agreement(pairs) -> float:
    """Fraction of equal elements over (reference, other) array pairs of equal shapes."""
    same = total = 0
    for a, b in pairs:
        if a.shape != b.shape:
            raise OutOfTolerance(f"shape {b.shape} where the CPU run has {a.shape}")
        same += int((a == b).sum())
        total += a.size
    if total == 0:
        raise OutOfTolerance("nothing to compare")
    return same / total


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two flat arrays (NaN when either is constant or not finite)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def relative_max_diff(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """max |a - b| / max(max |a|, floor); NaN when either holds a non-finite value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise OutOfTolerance(f"shape {b.shape} where the CPU run has {a.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    scale = max(float(np.abs(a).max(initial=0.0)), floor)
    return float(np.abs(a - b).max(initial=0.0)) / scale if scale > 0 else math.nan


def verdict(what: str, measures: list[tuple[str, float, str, float]]) -> str:
    """``measures``: (name, value, ``">="`` or ``"<="``, bound). The line of all of them; raises
    :class:`OutOfTolerance` with it when one is outside (NaN always is)."""
    parts, bad = [], False
    for name, value, op, bound in measures:
        ok = value >= bound if op == ">=" else value <= bound  # NaN compares False: outside
        bad |= not ok
        parts.append(f"{name} {value:.6g} ({op} {bound:g}{'' if ok else ': OUTSIDE'})")
    line = f"{what}: " + ", ".join(parts)
    if bad:
        raise OutOfTolerance(line)
    return line


# -- outputs --------------------------------------------------------------------------------------

def _label_pairs(ref_dir: Path, other_dir: Path):
    from pipeline.data.imageio import read_label

    files = sorted(ref_dir.glob("*.png"))
    if not files:
        raise OutOfTolerance(f"no PNG in the CPU run's {ref_dir}")
    missing = [f.name for f in files if not (other_dir / f.name).is_file()]
    if missing:
        raise OutOfTolerance(f"{other_dir} lacks {', '.join(missing)}")
    return [(read_label(f), read_label(other_dir / f.name)) for f in files]


def compare_seeds(cpu: Path, other: Path, which: str, tol: Tolerances) -> str:
    """Pixel agreement of the ``which`` (coarse, fine) seeds."""
    pairs = _label_pairs(cpu / "cache" / "seeds" / which, other / "cache" / "seeds" / which)
    return verdict(f"{which} seeds", [("agreement", agreement(pairs), ">=", tol.seed_agreement)])


def compare_cams(cpu: Path, other: Path, which: str, tol: Tolerances) -> str:
    """Correlation and relative max difference of every CAM array of the ``which`` (cls, seg)
    store; the present classes (``fg_cls``) must be equal."""
    from pipeline.store import ImageStore

    ref = ImageStore(cpu / "cache" / "cams" / f"{which}.zarr")
    got = ImageStore(other / "cache" / "cams" / f"{which}.zarr")
    ids = ref.ids()
    if not ids or got.ids() != ids:
        raise OutOfTolerance(f"{which} CAMs of images {got.ids()} where the CPU run has {ids}")
    a = {i: ref.read(i) for i in ids}
    b = {i: got.read(i) for i in ids}
    for i in ids:
        if sorted(a[i]) != sorted(b[i]) or not np.array_equal(a[i]["fg_cls"], b[i]["fg_cls"]):
            raise OutOfTolerance(f"{which} CAMs of {i}: arrays {sorted(b[i])} classes "
                                 f"{b[i].get('fg_cls')} where the CPU run has {sorted(a[i])} "
                                 f"{a[i]['fg_cls']}")
    measures = []
    for key in sorted(k for k in a[ids[0]] if k != "fg_cls"):
        x = np.concatenate([a[i][key].ravel() for i in ids])
        y = np.concatenate([b[i][key].ravel() for i in ids])
        measures += [(f"{key} correlation", correlation(x, y), ">=", tol.cam_correlation),
                     (f"{key} max diff", relative_max_diff(x, y), "<=", tol.cam_max_diff)]
    return verdict(f"{which} CAMs", measures)


def compare_prompts(cpu: Path, other: Path, which: str, tol: Tolerances) -> str:
    """Relative max difference of the trained ``which`` prompt context (and of its stored
    iterations, when the file keeps some)."""
    from pipeline.prompts.checkpoints import read_prompts

    a = read_prompts(cpu / "cache" / "prompts" / f"{which}.pt")
    b = read_prompts(other / "cache" / "prompts" / f"{which}.pt")
    measures = [("context max diff", relative_max_diff(a["ctx"].numpy(), b["ctx"].numpy()), "<=",
                 tol.prompt_max_diff)]
    contexts_a, contexts_b = a.get("contexts") or {}, b.get("contexts") or {}
    if sorted(contexts_a) != sorted(contexts_b):
        raise OutOfTolerance(f"{which} prompts: iterations {sorted(contexts_b)} where the CPU run "
                             f"keeps {sorted(contexts_a)}")
    for it in sorted(contexts_a):
        measures.append((f"iteration {it} max diff", relative_max_diff(
            contexts_a[it].numpy(), contexts_b[it].numpy()), "<=", tol.prompt_max_diff))
    return verdict(f"{which} prompts", measures)


def read_losses(path: Path) -> dict[int, float]:
    """step -> loss of a training plot CSV (``step,loss,...``)."""
    with open(path, newline="") as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


def compare_losses(cpu: Path, other: Path, tol: Tolerances) -> str:
    """Every training loss (prompts cls and seg, segmenter) finite and close to the CPU's."""
    plots = (("cls prompt", "train_prompts_cls.csv", tol.prompt_loss_diff, 1.0),
             ("seg prompt", "train_prompts_seg.csv", tol.prompt_loss_diff, 1.0),
             ("segmenter", "segmenter_train.csv", tol.segmenter_loss_diff, 0.0))
    measures = []
    for name, file, bound, floor in plots:
        a, b = read_losses(cpu / "cache" / "plots" / file), read_losses(other / "cache" / "plots" / file)
        if not a or sorted(a) != sorted(b):
            raise OutOfTolerance(f"{name} losses at steps {sorted(b)} where the CPU run has {sorted(a)}")
        steps = sorted(a)
        x, y = np.array([a[s] for s in steps]), np.array([b[s] for s in steps])
        if not np.isfinite(y).all():
            raise OutOfTolerance(f"{name} losses not finite: {y.tolist()}")
        measures.append((f"{name} loss diff", max(abs(p - q) / max(abs(p), floor) for p, q in zip(x, y)),
                         "<=", bound))
    return verdict("losses (all finite)", measures)


def compare_predictions(cpu_predictions: Path, other_predictions: Path, tol: Tolerances) -> str:
    """Pixel agreement of the predictions, SAMS post-processed and raw (``raw/``)."""
    measures = []
    for name, sub in (("post-processed", ""), ("raw", "raw")):
        pairs = _label_pairs(cpu_predictions / sub, other_predictions / sub)
        measures.append((f"{name} agreement", agreement(pairs), ">=", tol.prediction_agreement))
    return verdict("predictions", measures)
