"""One copy on disk: with the project's `cache.type` (reflink, else hardlink, else symlink) the
stores in the workspace are links to .dvc/cache, and resume, persist, a stage rerun, a store reset
and `dvc checkout` leave every cache object intact (the stages replace files, never edit them)."""
import hashlib
import os
from pathlib import Path

import pytest
import yaml
from dvc_project import dvc_env, make_project, sh, tree_files

pytestmark = pytest.mark.slow

STAGES = ("prepare", "sam_masks")
TINY = {"dataset": {"name": "demo", "demo": {"n_train": 3, "n_val": 2, "seed": 0}},
        "compute": {"scheduler": "local", "device": "cpu"},
        "sam": {"model": "tiny", "points_per_side": 8, "points_per_batch": 64, "crop_n_layers": 0,
                "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}}  # the random tiny SAM's setting


def _cache_is_intact(repo: Path) -> int:
    """Every file object in .dvc/cache still has the content its name (its md5) says."""
    objects = [p for p in (repo / ".dvc" / "cache" / "files" / "md5").rglob("*")
               if p.is_file() and not p.name.endswith(".dir")]
    for p in objects:
        assert hashlib.md5(p.read_bytes()).hexdigest() == p.parent.name + p.name, p
    return len(objects)


def _linked(repo: Path, store: Path) -> list[str]:
    """Files of ``store`` that share their data with a cache object (same inode, or a symlink)."""
    cache_inodes = {p.stat().st_ino for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()}
    return [str(p) for p in store.rglob("*")
            if p.is_symlink() or (p.is_file() and p.stat().st_ino in cache_inodes)]


def _set(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _snapshot(store: Path) -> dict[str, bytes]:
    return {f: (store / f).read_bytes() for f in tree_files(store)}


def test_linked_outputs_survive_resume_rerun_reset_and_checkout(tmp_path):
    env = dvc_env(tmp_path / "home")
    repo = tmp_path / "repo"
    make_project(repo, env, TINY, stages=STAGES, sections=("dataset", "compute", "sam"))
    assert "hardlink" in sh("dvc", "config", "cache.type", cwd=repo, env=env)
    store = repo / "cache" / "sam_masks.zarr"

    sh("dvc", "repro", "sam_masks", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-q", "-m", "masks", cwd=repo, env=env)
    first = _snapshot(store)
    assert len(first) == 6  # zarr.json + 5 images
    assert sorted(_linked(repo, store)) == sorted(str(store / f) for f in first)  # one copy
    n_objects = _cache_is_intact(repo)

    # resume through DVC: a run killed after 4 of 5 images leaves the store without one image;
    # the persist output is kept, the stage computes only the missing image
    victim = sorted(f for f in first if f.endswith(".zip"))[2]
    (store / victim).unlink()
    out = sh("dvc", "repro", "sam_masks", cwd=repo, env=env)
    assert "Running stage 'sam_masks'" in out and "1 images computed, 4 already" in out, out
    assert _snapshot(store) == first
    assert _cache_is_intact(repo) == n_objects
    assert len(_linked(repo, store)) == len(first)  # DVC's commit linked the files again

    # a rerun that keeps the fingerprint but changes the store attrs (the checkpoint's location
    # is provenance only) rewrites zarr.json: by replacing it, so its cache object stays as it was
    # (the file must exist: it is a dep of the stage; the tiny SAM loads no weights from it)
    (repo / "elsewhere").mkdir()
    (repo / "elsewhere" / "sam.pth").write_bytes(b"the tiny SAM ignores its checkpoint")
    _set(repo, "sam", "checkpoint", "elsewhere/sam.pth")
    out = sh("dvc", "repro", "sam_masks", cwd=repo, env=env)
    assert "0 images computed, 5 already" in out, out
    assert "elsewhere/sam.pth" in (store / "zarr.json").read_text()
    assert _cache_is_intact(repo) == n_objects + 1  # the new zarr.json, the old one intact
    assert "up to date" in sh("dvc", "status", "sam_masks", cwd=repo, env=env)

    # a param the masks depend on resets the store (its linked files are unlinked, not emptied)
    sh("git", "checkout", "params.yaml", cwd=repo, env=env)
    _set(repo, "sam", "occupation_thresh", 0.5)
    out = sh("dvc", "repro", "sam_masks", cwd=repo, env=env)
    assert "5 images computed, 0 already" in out, out
    _cache_is_intact(repo)

    # back to the committed params: `dvc checkout` restores the first store from the cache
    sh("git", "checkout", "params.yaml", "dvc.lock", cwd=repo, env=env)
    sh("dvc", "checkout", "sam_masks", cwd=repo, env=env)
    assert _snapshot(store) == first
    assert "up to date" in sh("dvc", "status", *STAGES, cwd=repo, env=env)
    out = sh("dvc", "repro", "sam_masks", cwd=repo, env=env)
    assert "Stage 'sam_masks' didn't change, skipping" in out
    assert _cache_is_intact(repo) >= n_objects
    assert not os.path.exists(store.with_name("sam_masks.zarr.partial"))
