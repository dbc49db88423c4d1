"""benchmarks/gpu_check_compare.py: each comparison of a CUDA run's outputs with the CPU run's
passes on equal outputs and fails on a defect of the kind a broken CUDA path makes, on two small
synthetic project folders (the files the tiny graph writes, in their formats)."""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check_compare import (
    BF16,
    FP32,
    OutOfTolerance,
    compare_cams,
    compare_losses,
    compare_predictions,
    compare_prompts,
    compare_seeds,
)

from pipeline.data.imageio import read_label, write_palette_png
from pipeline.store import ImageStore

IDS = ("img_0", "img_1")


def write_project(root: Path) -> Path:
    """The outputs gpu_check compares: seeds, CAM stores, prompts, loss CSVs, predictions."""
    rng = np.random.default_rng(0)
    for which in ("coarse", "fine"):
        (root / "cache/seeds" / which).mkdir(parents=True)
        for i in IDS:
            write_palette_png(root / "cache/seeds" / which / f"{i}.png",
                              rng.integers(0, 4, (40, 50)).astype(np.uint8))
    for which in ("cls", "seg"):
        store = ImageStore.open_for_writing(root / f"cache/cams/{which}.zarr", {"fingerprint": "x"})
        for i in IDS:
            cam = rng.random((2, 6, 7)).astype(np.float32)
            store.write(i, {"cam": cam, "cam_caa": cam ** 2, "fg_cls": np.array([1, 3])})
    (root / "cache/prompts").mkdir(parents=True)
    for which in ("cls", "seg"):
        torch.save({"spec": {}, "ctx": torch.randn(16, 8, generator=torch.Generator().manual_seed(1)),
                    "contexts": {}}, root / f"cache/prompts/{which}.pt")
    (root / "cache/plots").mkdir(parents=True)
    for name in ("train_prompts_cls", "train_prompts_seg", "segmenter_train"):
        (root / f"cache/plots/{name}.csv").write_text("step,loss,lr\n1,2.5,0.01\n2,2.25,0.01\n3,2.0,0.01\n")
    for sub in ("", "raw"):
        (root / "cache/predictions" / sub).mkdir(parents=True, exist_ok=True)
        for i in IDS:
            write_palette_png(root / "cache/predictions" / sub / f"{i}.png",
                              rng.integers(0, 4, (40, 50)).astype(np.uint8))
    return root


def flip_labels(path: Path, fraction: float) -> None:
    label = read_label(path)
    flat = label.reshape(-1).copy()
    n = round(fraction * flat.size)
    flat[:n] = (flat[:n] + 1) % 4
    write_palette_png(path, flat.reshape(label.shape))


def edit_cams(root: Path, which: str, edit) -> None:
    store = ImageStore(root / f"cache/cams/{which}.zarr")
    for i in IDS:
        store.write(i, edit(store.read(i)))


def edit_prompt(root: Path, which: str, edit) -> None:
    path = root / f"cache/prompts/{which}.pt"
    state = torch.load(path, weights_only=True)
    state["ctx"] = edit(state["ctx"])
    torch.save(state, path)


def edit_loss(root: Path, name: str, step2: str) -> None:
    path = root / f"cache/plots/{name}.csv"
    path.write_text(path.read_text().replace("2,2.25,", f"2,{step2},"))


def compare_all(cpu: Path, cuda: Path, tol) -> dict[str, str]:
    """Each comparison's line, or ``FAILED: <its line>``."""
    runs = {
        "coarse seeds": lambda: compare_seeds(cpu, cuda, "coarse", tol),
        "fine seeds": lambda: compare_seeds(cpu, cuda, "fine", tol),
        "cls CAMs": lambda: compare_cams(cpu, cuda, "cls", tol),
        "seg CAMs": lambda: compare_cams(cpu, cuda, "seg", tol),
        "cls prompts": lambda: compare_prompts(cpu, cuda, "cls", tol),
        "seg prompts": lambda: compare_prompts(cpu, cuda, "seg", tol),
        "losses": lambda: compare_losses(cpu, cuda, tol),
        "predictions": lambda: compare_predictions(cpu / "cache/predictions", cuda / "cache/predictions", tol),
    }
    out = {}
    for name, run in runs.items():
        try:
            out[name] = run()
        except OutOfTolerance as exc:
            out[name] = f"FAILED: {exc}"
    return out


@pytest.fixture(scope="module")
def cpu_project(tmp_path_factory):
    return write_project(tmp_path_factory.mktemp("cpu"))


@pytest.fixture
def cuda_project(cpu_project, tmp_path):
    return Path(shutil.copytree(cpu_project, tmp_path / "cuda"))


def test_equal_outputs_pass_every_comparison(cpu_project, cuda_project):
    for tol in (FP32, BF16):
        lines = compare_all(cpu_project, cuda_project, tol)
        assert not [line for line in lines.values() if line.startswith("FAILED")], lines


# (name, defect, the comparison that must fail in fp32, whether it must fail in bf16 too)
DEFECTS = {
    "3% of coarse seed pixels relabelled": (
        lambda r: [flip_labels(r / "cache/seeds/coarse" / f"{i}.png", 0.03) for i in IDS],
        "coarse seeds", False),
    "15% of fine seed pixels relabelled": (
        lambda r: [flip_labels(r / "cache/seeds/fine" / f"{i}.png", 0.15) for i in IDS],
        "fine seeds", True),
    "seed of another size": (
        lambda r: write_palette_png(r / "cache/seeds/fine/img_0.png", np.zeros((40, 49), np.uint8)),
        "fine seeds", True),
    "cls CAMs shifted by two patches": (
        lambda r: edit_cams(r, "cls", lambda a: {**a, "cam": np.roll(a["cam"], 2, axis=-1)}),
        "cls CAMs", True),
    "seg CAMs scaled by 1.5 (correlation 1)": (
        lambda r: edit_cams(r, "seg", lambda a: {**a, "cam_caa": 1.5 * a["cam_caa"]}),
        "seg CAMs", True),
    "seg CAMs scaled by 1.05": (
        lambda r: edit_cams(r, "seg", lambda a: {**a, "cam": 1.05 * a["cam"]}),
        "seg CAMs", False),
    "a NaN in the cls CAMs": (
        lambda r: edit_cams(r, "cls", lambda a: {**a, "cam": np.where(a["cam"] > 0.99, np.nan, a["cam"])}),
        "cls CAMs", True),
    "other present classes": (
        lambda r: edit_cams(r, "cls", lambda a: {**a, "fg_cls": np.array([1, 2])}),
        "cls CAMs", True),
    "cls prompts off by 3% of their range": (
        lambda r: edit_prompt(r, "cls", lambda c: c + 0.03 * c.abs().max()),
        "cls prompts", False),
    "seg prompts doubled": (lambda r: edit_prompt(r, "seg", lambda c: 2 * c),
        "seg prompts", True),
    "a NaN segmenter loss": (lambda r: edit_loss(r, "segmenter_train", "nan"), "losses", True),
    "a cls prompt loss 1% off": (lambda r: edit_loss(r, "train_prompts_cls", "2.2725"), "losses", False),
    "a segmenter loss 20% off": (lambda r: edit_loss(r, "segmenter_train", "2.7"), "losses", True),
    "3% of raw prediction pixels relabelled": (
        lambda r: [flip_labels(r / "cache/predictions/raw" / f"{i}.png", 0.03) for i in IDS],
        "predictions", False),
    "a prediction missing": (lambda r: (r / "cache/predictions/img_1.png").unlink(), "predictions", True),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_a_defect_fails_its_comparison_and_only_it(cpu_project, cuda_project, defect):
    inject, comparison, fails_in_bf16 = DEFECTS[defect]
    inject(cuda_project)
    for tol, must_fail in ((FP32, True), (BF16, fails_in_bf16)):
        lines = compare_all(cpu_project, cuda_project, tol)
        failed = sorted(name for name, line in lines.items() if line.startswith("FAILED"))
        assert failed == ([comparison] if must_fail else []), (tol, lines)
