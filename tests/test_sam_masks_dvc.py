"""Through DVC: the SAM memory budget does not rerun sam_masks, compute.precision does."""
import pytest
import yaml
from dvc_project import dvc_env, make_project, ran_stages, sh

pytestmark = pytest.mark.slow

TINY = {"dataset": {"name": "demo", "demo": {"n_train": 2, "n_val": 1, "seed": 0}},
        "compute": {"scheduler": "local", "device": "cpu"},
        "sam": {"model": "tiny", "points_per_side": 4, "points_per_batch": 16, "crop_n_layers": 0}}


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
