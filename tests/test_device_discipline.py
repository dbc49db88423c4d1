"""Every torch path of every stage on a simulated CUDA device (tests/simulated_cuda.py).

A tiny project runs the stages in dvc.yaml's order on the CPU (the reference). Each test then runs
one stage again with ``compute.device: cuda`` under :func:`simulated_cuda`, from the reference's
upstream artifacts, and checks that (a) no op met tensors of two devices and no CUDA tensor
reached numpy, (b) the outputs equal the CPU run's: the arithmetic is the CPU's, so any difference
is a device-dependent branch taken wrongly (the CPU run goes under a pass-through mode, so both take
the same kernels). The SAM is segment-anything's own classes (tiny,
random weights) with thresholds 0 so that masks survive into the small-region clean-up.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.data.imageio import read_label
from pipeline.store import ImageStore
from stages.cli import main
from tests.simulated_cuda import DeviceMismatchError, PassThroughMode, simulated_cuda
from tests.tiny_params import tiny_graph_params

REPO = Path(__file__).resolve().parents[1]


def _invoke(*args, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def _params(root: Path, device: str) -> Path:
    path = root / f"params_{device}.yaml"
    path.write_text(yaml.safe_dump(tiny_graph_params(device, n_train=3)))
    return path


class Project:
    """Paths of one tiny project; ``run(stage, out_root)`` runs a stage with dvc.yaml's arguments."""

    def __init__(self, root: Path):
        self.root = root
        self.index = root / "index"

    def args(self, stage: str, params: Path, out: Path) -> list:
        ref = self.root / "cpu"
        common = ["--params", params, "--index", self.index]
        return {
            "sam_masks": ["sam-masks", *common, "--out", out / "sam_masks.zarr",
                          "--metrics", out / "sam_masks.json"],
            "clip_features": ["clip-features", *common, "--out", out / "clip_features"],
            "prompts_cls": ["train-prompts", "--which", "cls", *common,
                            "--features", ref / "clip_features", "--out", out / "cls.pt",
                            "--metrics", out / "cls.csv"],
            "cams_cls": ["cams", "--which", "cls", *common, "--features", ref / "clip_features",
                         "--prompts", ref / "cls.pt", "--out", out / "cls.zarr"],
            "seeds_coarse": ["seeds", "--which", "coarse", *common, "--cams", ref / "cls.zarr",
                             "--sam-masks", ref / "sam_masks.zarr", "--out", out / "coarse",
                             "--metrics", out / "seeds_coarse.json",
                             "--plots", out / "seeds_coarse_per_class.json"],
            "prompts_seg": ["train-prompts", "--which", "seg", *common,
                            "--features", ref / "clip_features", "--seeds", ref / "coarse",
                            "--init-prompts", ref / "cls.pt", "--out", out / "seg.pt",
                            "--metrics", out / "seg.csv"],
            "cams_seg": ["cams", "--which", "seg", *common, "--features", ref / "clip_features",
                         "--prompts", ref / "seg.pt", "--out", out / "seg.zarr"],
            "train_segmenter": ["train-segmenter", *common, "--seeds", ref / "coarse",
                                "--out", out / "segmenter", "--plots", out / "segmenter.csv"],
            "predict": ["predict", *common, "--segmenter", ref / "segmenter",
                        "--sam-masks", ref / "sam_masks.zarr", "--out", out / "predictions",
                        "--metrics", out / "predict.json"],
            # new images: SAM's generator runs inside predict for the post-processing
            "predict_images": ["predict", "--params", params, "--images", self.index / "demo" / "JPEGImages",
                               "--segmenter", ref / "segmenter", "--out", out / "predictions_images"],
        }[stage]


STAGES = ("sam_masks", "clip_features", "prompts_cls", "cams_cls", "seeds_coarse", "prompts_seg",
          "cams_seg", "train_segmenter", "predict", "predict_images")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    root = tmp_path_factory.mktemp("device")
    proj = Project(root)
    cpu = _params(root, "cpu")
    _invoke("prepare", "--params", cpu, "--out", proj.index)
    with PassThroughMode():
        for stage in STAGES:
            _invoke(*proj.args(stage, cpu, root / "cpu"))
    return proj


def _stores_equal(a: Path, b: Path) -> None:
    sa, sb = ImageStore(a), ImageStore(b)
    assert sa.ids() == sb.ids() and sa.ids()
    for image_id in sa.ids():
        ra, rb = sa.read(image_id), sb.read(image_id)
        assert sorted(ra) == sorted(rb)
        for name in ra:
            np.testing.assert_array_equal(ra[name], rb[name], err_msg=f"{a.name} {image_id} {name}")


def _pngs_equal(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.glob("*.png"))
    assert files and files == sorted(p.name for p in b.glob("*.png"))
    for name in files:
        np.testing.assert_array_equal(read_label(a / name), read_label(b / name), err_msg=name)


def _run_on_cuda(project: Project, stage: str) -> Path:
    out = project.root / f"cuda_{stage}"
    shutil.rmtree(out, ignore_errors=True)
    params = _params(project.root, "cuda")
    with simulated_cuda() as mode:
        _invoke(*project.args(stage, params, out))
    assert mode.checked_ops > 0
    return out


def test_sam_masks_on_cuda_equal_cpu(project):
    out = _run_on_cuda(project, "sam_masks")
    ref = project.root / "cpu" / "sam_masks.zarr"
    masks = [len(ImageStore(ref).read_array(i, "levels")) for i in ImageStore(ref).ids()]
    assert sum(masks) > 0, "no mask survived: the clean-up was not exercised"
    _stores_equal(ref, out / "sam_masks.zarr")


def test_clip_features_on_cuda_equal_cpu(project):
    out = _run_on_cuda(project, "clip_features")
    for store in ("train_views.zarr", "inference.zarr"):
        _stores_equal(project.root / "cpu" / "clip_features" / store, out / "clip_features" / store)


@pytest.mark.parametrize("which", ["cls", "seg"])
def test_train_prompts_on_cuda_equal_cpu(project, which):
    out = _run_on_cuda(project, f"prompts_{which}")
    ref = torch.load(project.root / "cpu" / f"{which}.pt", map_location="cpu", weights_only=True)
    got = torch.load(out / f"{which}.pt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(got["ctx"], ref["ctx"], rtol=0, atol=0)


@pytest.mark.parametrize("which", ["cls", "seg"])
def test_cams_on_cuda_equal_cpu(project, which):
    out = _run_on_cuda(project, f"cams_{which}")
    _stores_equal(project.root / "cpu" / f"{which}.zarr", out / f"{which}.zarr")


def test_seeds_on_cuda_equal_cpu(project):
    out = _run_on_cuda(project, "seeds_coarse")
    _pngs_equal(project.root / "cpu" / "coarse", out / "coarse")


def test_train_segmenter_on_cuda_equal_cpu(project):
    out = _run_on_cuda(project, "train_segmenter")
    assert (out / "segmenter.csv").read_text() == (project.root / "cpu" / "segmenter.csv").read_text()
    ref = torch.load(project.root / "cpu" / "segmenter" / "last.pt", map_location="cpu", weights_only=True)
    got = torch.load(out / "segmenter" / "last.pt", map_location="cpu", weights_only=True)
    _same(got, ref)


def _same(got, ref, where: str = "") -> None:
    """Exactly equal, recursively (tensors bit for bit)."""
    if isinstance(ref, torch.Tensor):
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=where)
    elif isinstance(ref, dict):
        assert sorted(got) == sorted(ref), where
        for key in ref:
            _same(got[key], ref[key], f"{where}.{key}")
    else:
        assert got == ref, where


def test_predict_with_postprocessing_on_cuda_equal_cpu(project):
    out = _run_on_cuda(project, "predict")
    assert json.loads((out / "predict.json").read_text()) == \
        json.loads((project.root / "cpu" / "predict.json").read_text())
    _pngs_equal(project.root / "cpu" / "predictions", out / "predictions")


def test_predict_on_new_images_runs_sam_on_cuda_and_equals_cpu(project):
    out = _run_on_cuda(project, "predict_images")
    ref = project.root / "cpu" / "predictions_images"
    _pngs_equal(ref / "raw", out / "predictions_images" / "raw")
    _pngs_equal(ref, out / "predictions_images")


def test_simulation_catches_a_cpu_tensor_meeting_a_cuda_one():
    with simulated_cuda():
        a = torch.ones(3, device="cuda")
        with pytest.raises(DeviceMismatchError, match="cpu and cuda:0"):
            a + torch.ones(3)
        with pytest.raises(DeviceMismatchError, match="numpy"):
            np.asarray(a)
        assert (a + torch.tensor(1.0)).device == torch.device("cuda", 0)  # CPU scalars mix
        assert a.cpu().numpy().tolist() == [1.0, 1.0, 1.0]
