"""The whole pipeline through DVC on a small embedded default: full run, selective reruns,
experiments, a killed stage resumed, and the per-image stages on a 2-worker dask cluster."""
import csv
import json
import filecmp
import io
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from dvc_project import dvc_env, make_project, ran_stages, sh, tree_files

pytestmark = pytest.mark.slow

ALL_STAGES = {
    "prepare", "sam_masks", "clip_features", "train_prompts@cls", "cams@cls", "seeds@coarse",
    "train_prompts@seg", "cams@seg", "seeds@fine", "train_segmenter", "predict", "panels",
}
# The fixed sample of the panels stage: the first 4 train and the first 4 val images.
PANELS = {f"cache/plots/panels/demo_{i:04d}.png" for i in (0, 1, 2, 3, 6, 7, 8)}
SMALL = {
    "dataset": {"demo": {"n_train": 6, "n_val": 3, "seed": 0}},
    "compute": {"scheduler": "local", "device": "cpu"},
    "sam": {"points_per_side": 8, "points_per_batch": 64, "crop_n_layers": 0},
    "clip_features": {"n_views": 2},
    "prompts": {w: {"iterations": 3, "warmup_iterations": 1, "batch_size": 4, "checkpoint_every": 2}
                for w in ("cls", "seg")},
    "segmenter": {"iterations": 3, "batch_size": 2, "val_every": 3, "checkpoint_every": 2},
    "predict": {"scales": [1.0], "alpha_sweep": [1.0, 2.0]},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    env = dvc_env(root / "home")
    repo = root / "repo"
    make_project(repo, env, SMALL)
    out = sh("dvc", "repro", cwd=repo, env=env)
    assert ran_stages(out) == ALL_STAGES, out
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-q", "-m", "run", cwd=repo, env=env)
    return repo, env


def _set_param(repo: Path, dotted: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_full_run_produces_every_artifact_and_metric(project):
    repo, env = project
    for path in ("cache/index/train.json", "cache/sam_masks.zarr/zarr.json",
                 "cache/clip_features/inference.zarr", "cache/prompts/cls.pt", "cache/prompts/seg.pt",
                 "cache/cams/cls.zarr", "cache/cams/seg.zarr", "cache/segmenter/best.pt",
                 "cache/metrics/seeds_coarse.json", "cache/metrics/seeds_fine.json",
                 "cache/metrics/predict.json"):
        assert (repo / path).exists(), path
    train_ids = [r["id"] for r in yaml.safe_load((repo / "cache/index/train.json").read_text())["records"]]
    for which in ("coarse", "fine"):
        assert sorted(p.stem for p in (repo / "cache/seeds" / which).glob("*.png")) == sorted(train_ids)
    metrics = sh("dvc", "metrics", "show", cwd=repo, env=env)
    assert "seeds_fine.json" in metrics and "predict.json" in metrics
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=repo, env=env)


def test_alpha_change_reruns_only_seeds_fine_and_after(project):
    repo, env = project
    _set_param(repo, "seeds.fine.alpha", 0.9)
    status = sh("dvc", "status", cwd=repo, env=env)
    assert "seeds@fine" in status and "seeds@coarse" not in status and "sam_masks" not in status
    out = sh("dvc", "repro", cwd=repo, env=env)
    ran = ran_stages(out)
    assert "seeds@fine" in ran and ran <= {"seeds@fine", "train_segmenter", "predict", "panels"}, out
    sh("git", "commit", "-q", "-am", "alpha", cwd=repo, env=env)


def test_sam_param_change_reruns_sam_masks_and_everything_after(project):
    repo, env = project
    _set_param(repo, "sam.occupation_thresh", 0.5)
    out = sh("dvc", "repro", cwd=repo, env=env)
    ran = ran_stages(out)
    assert "sam_masks" in ran, out
    assert not ran & {"prepare", "clip_features", "train_prompts@cls", "cams@cls"}, out
    assert ran <= ALL_STAGES - {"prepare", "clip_features", "train_prompts@cls", "cams@cls"}
    sh("git", "commit", "-q", "-am", "sam", cwd=repo, env=env)


def test_dvc_exp_run_with_set_param(project):
    repo, env = project
    out = sh("dvc", "exp", "run", "-S", "seeds.fine.alpha=0.8", cwd=repo, env=env)
    assert "Running stage 'seeds@fine'" in out
    assert "Running stage 'sam_masks'" not in out
    assert yaml.safe_load((repo / "params.yaml").read_text())["seeds"]["fine"]["alpha"] == 0.8
    shown = sh("dvc", "exp", "show", "--csv", cwd=repo, env=env)
    rows = list(csv.DictReader(io.StringIO(shown)))
    # the experiment's row (not the workspace's) and the baseline commit's row
    exp = [r for r in rows if r["typ"].startswith("branch_") and r["seeds.fine.alpha"] == "0.8"]
    base = [r for r in rows if r["typ"] == "baseline" and r["rev"] != "workspace"]
    assert exp and base, shown
    # commits hold the metrics (git-tracked files), so runs compare instead of showing "!"
    metric_cols = [c for c in rows[0] if c.startswith("cache/metrics/seeds_fine.json:")]
    assert metric_cols, rows[0].keys()
    for col in metric_cols:
        assert exp[0][col] not in ("!", ""), (col, exp[0][col])
        assert base[0][col] not in ("!", ""), (col, base[0][col])
    diff = sh("dvc", "metrics", "diff", cwd=repo, env=env)
    assert "seeds_fine.json" in diff or "No changes" in diff or diff.strip() == "", diff
    # The panels of both revisions, side by side (in this tiny graph alpha 0.8 and 0.9 may give the
    # same seeds, hence the same pictures: each revision's is its own file, the experiment's is
    # the workspace's, where `dvc exp run` leaves its outputs).
    name = sh("dvc", "exp", "list", "--name-only", cwd=repo, env=env).split()[0]
    plots = json.loads(sh("dvc", "plots", "diff", "HEAD", name, "--json", cwd=repo, env=env))
    images = {path: {e["revisions"][0]: e["url"] for e in entries if e.get("type") == "image"}
              for path, entries in plots.get("data", plots).items() if path.endswith(".png")}
    assert set(images) == PANELS, sorted(images)
    train_panel = images["cache/plots/panels/demo_0000.png"]
    assert set(train_panel) == {"HEAD", name}, train_panel
    assert Path(train_panel["HEAD"]) != Path(train_panel[name])
    assert Path(train_panel[name]).read_bytes() == (repo / "cache/plots/panels/demo_0000.png").read_bytes()
    assert Path(train_panel["HEAD"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_render_offline(project, tmp_path):
    repo, env = project
    sh("dvc", "plots", "show", "-o", tmp_path / "plots", cwd=repo, env=env)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "vegaEmbed(" in page and "cdn.jsdelivr" not in page
    assert "<script src=" not in page  # everything the page runs is in the page
    # The panels are drawn in the same page as the curves.
    for panel in PANELS:
        assert Path(panel).name in page, panel
    assert len(list((tmp_path / "plots").rglob("*demo_0000.png"))) == 1


def _same_tree(a: Path, b: Path) -> None:
    files = tree_files(a)
    assert files and files == tree_files(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []


def test_per_image_stages_on_a_two_worker_cluster_match(project, tmp_path):
    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["compute"].update(scheduler="local-cluster", workers=2)
    cluster_params = tmp_path / "params.yaml"
    cluster_params.write_text(yaml.safe_dump(params))
    p = ["--params", cluster_params, "--index", "cache/index"]
    sh("wsss", "clip-features", *p, "--out", tmp_path / "clip_features", cwd=repo, env=env)
    _same_tree(repo / "cache/clip_features", tmp_path / "clip_features")
    sh("wsss", "cams", "--which", "cls", *p, "--features", "cache/clip_features",
       "--prompts", "cache/prompts/cls.pt", "--out", tmp_path / "cls.zarr", cwd=repo, env=env)
    _same_tree(repo / "cache/cams/cls.zarr", tmp_path / "cls.zarr")
    sh("wsss", "seeds", "--which", "coarse", *p, "--cams", "cache/cams/cls.zarr",
       "--sam-masks", "cache/sam_masks.zarr", "--out", tmp_path / "coarse",
       "--metrics", tmp_path / "m.json", "--plots", tmp_path / "p.json", cwd=repo, env=env)
    _same_tree(repo / "cache/seeds/coarse", tmp_path / "coarse")


def test_killed_stage_resumes_to_identical_artifacts(project, tmp_path):
    repo, env = project
    ref = tmp_path / "ref.zarr"
    sh("wsss", "sam-masks", "--index", "cache/index", "--out", ref, cwd=repo, env=env)
    out = tmp_path / "killed.zarr"
    cmd = ["wsss", "sam-masks", "--index", "cache/index", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    # a complete image is one `<id>.zip` in the store (pipeline/store.py)
    while time.time() < deadline and not (out.exists() and any(p.suffix == ".zip" for p in out.iterdir())):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = sum(p.suffix == ".zip" for p in out.iterdir())
    assert 1 <= n_before < 9, "the kill should land between the first and the last image"
    log = sh(*cmd, cwd=repo, env=env)
    assert "already in the store (resumed)" in log
    _same_tree(ref, out)


def test_another_world_in_the_same_workspace_equals_a_fresh_clone(project, tmp_path):
    """Per-image stores resume only images whose inputs are unchanged: a new dataset.demo.seed
    renders other images under the same ids, and every artifact must then be what a fresh
    project computes (the stores used to resume the old world's images)."""
    import shutil

    repo, env = project
    workspace = tmp_path / "workspace"
    shutil.copytree(repo, workspace, symlinks=True)
    _set_param(workspace, "dataset.demo.seed", 1)
    assert ran_stages(sh("dvc", "repro", cwd=workspace, env=env)) == ALL_STAGES
    fresh = tmp_path / "fresh"
    # the workspace's params as they are (earlier tests of this module change some), seed 1
    make_project(fresh, env, yaml.safe_load((workspace / "params.yaml").read_text()))
    assert ran_stages(sh("dvc", "repro", cwd=fresh, env=env)) == ALL_STAGES
    for artifact in ("index", "sam_masks.zarr", "clip_features", "cams", "seeds", "prompts",
                     "segmenter", "predictions", "metrics"):
        _same_tree(fresh / "cache" / artifact, workspace / "cache" / artifact)
