"""Through DVC: the SAM memory budget does not rerun sam_masks, compute.precision does."""
import pytest
import yaml
from dvc_project import dvc_env, make_project, ran_stages, sh

pytestmark = pytest.mark.slow

TINY = {"dataset": {"name": "demo", "demo": {"n_train": 2, "n_val": 1, "seed": 0}},
        "compute": {"scheduler": "local", "device": "cpu"},
        "sam": {"model": "tiny", "points_per_side": 4, "points_per_batch": 16, "crop_n_layers": 0,
                "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}}  # the random tiny SAM's setting


def _set(repo, section, key, value):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_memory_budget_is_not_a_dependency_but_precision_is(tmp_path):
    env = dvc_env(tmp_path / "home")
    repo = tmp_path / "repo"
    make_project(repo, env, TINY, stages=("prepare", "sam_masks"),
                 sections=("dataset", "compute", "sam"))
    assert ran_stages(sh("dvc", "repro", "sam_masks", cwd=repo, env=env)) == {"prepare",
                                                                              "sam_masks"}
    _set(repo, "sam", "max_batch_memory_mb", 1)
    assert "up to date" in sh("dvc", "status", "sam_masks", cwd=repo, env=env)
    _set(repo, "compute", "precision", "bf16")
    status = sh("dvc", "status", "sam_masks", cwd=repo, env=env)
    assert "modified:" in status and "compute.precision" in status
    assert ran_stages(sh("dvc", "repro", "sam_masks", cwd=repo, env=env)) == {"sam_masks"}


def test_world_oracle_through_dvc_is_labelled_and_its_code_reruns_only_what_it_decides(tmp_path):
    """sam.model world-oracle: metrics and report say sam_oracle; a new world seed recomputes the
    masks. Its code is a dependency for every model, but a tiny-SAM store resumes with nothing
    to compute when only the oracle's code changed."""
    import json

    env = dvc_env(tmp_path / "home")
    repo = tmp_path / "repo"
    env["PYTHONPATH"] = str(repo)  # the stages run (and digest) the project's copy of the code
    oracle = {**TINY, "sam": {**TINY["sam"], "model": "world-oracle", "points_per_side": 8,
                              "pred_iou_thresh": 0.86, "stability_score_thresh": 0.92}}
    make_project(repo, env, oracle, stages=("prepare", "sam_masks"),
                 sections=("dataset", "compute", "sam"))
    assert ran_stages(sh("dvc", "repro", "sam_masks", cwd=repo, env=env)) == {"prepare", "sam_masks"}
    metrics = json.loads((repo / "cache" / "metrics" / "sam_masks.json").read_text())
    assert metrics["sam_oracle"] is True and metrics["masks_per_image"] > 1
    report = json.loads(sh("wsss", "report", "--json", cwd=repo, env=env))
    assert report["sam_oracle"] is True and report["untrained"] is False

    _set(repo, "dataset", "demo", {**TINY["dataset"]["demo"], "seed": 1})
    out = sh("dvc", "repro", "sam_masks", cwd=repo, env=env)
    assert ran_stages(out) == {"prepare", "sam_masks"}
    assert "sam_masks: 3 images computed, 0 already" in out

    _set(repo, "sam", "model", "tiny")
    assert ran_stages(sh("dvc", "repro", "sam_masks", cwd=repo, env=env)) == {"sam_masks"}
    assert json.loads((repo / "cache" / "metrics" / "sam_masks.json").read_text())["sam_oracle"] is False
    oracle_code = repo / "pipeline" / "demo" / "sam_oracle.py"
    oracle_code.write_text(oracle_code.read_text() + "\n# an edit\n")
    out = sh("dvc", "repro", "sam_masks", cwd=repo, env=env)
    assert ran_stages(out) == {"sam_masks"} and "sam_masks: 0 images computed, 3 already" in out
