"""Sharing SAM masks through a DVC remote: one clone computes and pushes, another pulls and is
up to date without recomputing, with byte-identical masks."""
import filecmp
import zipfile

import pytest
from dvc_project import dvc_env, make_project, sh, tree_files

STAGES = ("prepare", "sam_masks")

pytestmark = pytest.mark.slow

TINY = {"dataset": {"name": "demo", "demo": {"n_train": 2, "n_val": 2, "seed": 0}},
        "compute": {"scheduler": "local", "device": "cpu"},
        "sam": {"model": "tiny", "points_per_side": 8, "points_per_batch": 64, "crop_n_layers": 0,
                "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}}  # the random tiny SAM's setting


@pytest.fixture
def env(tmp_path):
    return dvc_env(tmp_path / "home")


def test_pull_shares_masks_without_recomputing(tmp_path, env):
    a, b, remote = tmp_path / "a", tmp_path / "b", tmp_path / "remote"
    make_project(a, env, TINY, stages=STAGES, sections=("dataset", "compute", "sam"))
    sh("dvc", "remote", "add", "-d", "shared", str(remote), cwd=a, env=env)
    sh("git", "commit", "-q", "-am", "remote", cwd=a, env=env)

    out = sh("dvc", "repro", "sam_masks", cwd=a, env=env)
    assert "Running stage 'sam_masks'" in out
    sh("git", "add", "-A", cwd=a, env=env)  # dvc.lock and the .gitignore DVC wrote
    sh("git", "commit", "-q", "-m", "masks", cwd=a, env=env)
    sh("dvc", "push", cwd=a, env=env)

    sh("git", "clone", "-q", str(a), str(b), cwd=tmp_path, env=env)
    assert not (b / "cache" / "sam_masks.zarr").exists()
    sh("dvc", "pull", cwd=b, env=env)
    assert "up to date" in sh("dvc", "status", *STAGES, cwd=b, env=env)
    out = sh("dvc", "repro", "sam_masks", cwd=b, env=env)
    assert "Running stage" not in out
    assert "Stage 'sam_masks' didn't change, skipping" in out

    masks_a, masks_b = a / "cache" / "sam_masks.zarr", b / "cache" / "sam_masks.zarr"
    files = tree_files(masks_a)
    assert files == tree_files(masks_b)
    # one file per image (plus the store's zarr.json), each holding that image's masks chunk
    images = [f for f in files if f.endswith(".zip")]
    assert len(images) == 4 and len(files) == 5
    for f in images:
        with zipfile.ZipFile(masks_b / f) as zf:
            assert "masks/c/0/0/0" in zf.namelist()
    match, mismatch, errors = filecmp.cmpfiles(masks_a, masks_b, files, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(files)

    # a teammate who pulls only the masks (`dvc pull cache/sam_masks.zarr`): prepare reruns
    # (its index was not pulled) and gives the same index, so sam_masks stays up to date
    c = tmp_path / "c"
    sh("git", "clone", "-q", str(a), str(c), cwd=tmp_path, env=env)
    sh("dvc", "pull", "cache/sam_masks.zarr", cwd=c, env=env)
    assert not (c / "cache" / "index").exists()
    out = sh("dvc", "repro", "sam_masks", cwd=c, env=env)
    assert "Running stage 'sam_masks'" not in out
    assert "Stage 'sam_masks' didn't change, skipping" in out
    assert tree_files(c / "cache" / "sam_masks.zarr") == files
