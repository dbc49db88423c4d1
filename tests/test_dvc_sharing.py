"""Sharing SAM masks through a DVC remote: one clone computes and pushes, another pulls and is
up to date without recomputing, with byte-identical masks."""
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "sam_masks")

pytestmark = pytest.mark.slow


def sh(*args, cwd, env):
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def env(tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org", DVC_NO_ANALYTICS="1",
               HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return env


def make_project(root: Path) -> None:
    """The project's prepare and sam_masks stages, their code deps, and a tiny demo params.yaml."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = {name: dvc_yaml["stages"][name] for name in STAGES}
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    for stage in stages.values():
        for dep in stage["deps"]:
            if not dep.startswith("cache/"):
                (root / dep).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / dep, root / dep)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = {k: params[k] for k in ("dataset", "compute", "sam")}
    params["dataset"].update(name="demo", demo={"n_train": 2, "n_val": 2, "seed": 0})
    params["compute"].update(scheduler="local", device="cpu")
    params["sam"].update(model="tiny", points_per_side=8, points_per_batch=64, crop_n_layers=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_pull_shares_masks_without_recomputing(tmp_path, env):
    a, b, remote = tmp_path / "a", tmp_path / "b", tmp_path / "remote"
    make_project(a)
    sh("git", "init", "-q", cwd=a, env=env)
    sh("dvc", "init", "-q", cwd=a, env=env)
    sh("dvc", "config", "core.analytics", "false", cwd=a, env=env)
    sh("dvc", "remote", "add", "-d", "shared", str(remote), cwd=a, env=env)
    sh("git", "add", "-A", cwd=a, env=env)
    sh("git", "commit", "-q", "-m", "project", cwd=a, env=env)

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
    assert sum(f.endswith("masks/c/0/0/0") for f in files) == 4  # every image's masks chunk
    match, mismatch, errors = filecmp.cmpfiles(masks_a, masks_b, files, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(files)
