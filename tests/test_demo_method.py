"""The embedded default shows the method working (slow): on a reduced demo run through DVC, the
trained demo CLIP's learned prompts give CAMs well above the all-background score, and SAMS seeds
beat those CAMs. Floors and orderings, not exact numbers."""
import json

import pytest

from tests.dvc_project import dvc_env, make_project, ran_stages, sh

pytestmark = pytest.mark.slow

STAGES = ("prepare", "sam_masks", "clip_features", "train_prompts@cls", "cams@cls", "seeds@coarse")
REDUCED = {
    "dataset": {"demo": {"n_train": 16, "n_val": 2, "seed": 0}},
    "compute": {"scheduler": "local", "device": "cpu"},
    "sam": {"points_per_side": 8, "crop_n_layers": 0},
    "clip_features": {"n_views": 2},
}


def test_reduced_demo_seeds_beat_cams_which_beat_all_background(tmp_path):
    env = dvc_env(tmp_path / "home")
    repo = tmp_path / "repo"
    make_project(repo, env, REDUCED)
    out = sh("dvc", "repro", "seeds@coarse", cwd=repo, env=env)
    assert ran_stages(out) == set(STAGES), out
    sam = json.loads((repo / "cache/metrics/sam_masks.json").read_text())
    coarse = json.loads((repo / "cache/metrics/seeds_coarse.json").read_text())
    assert sam["sam_oracle"] is True and coarse["untrained"] is False
    background, cam, seed = coarse["background_only"]["miou"], coarse["cam"]["best_miou"], coarse["seed"]["miou"]
    assert cam >= background + 10, (background, cam)
    assert seed >= cam + 5 and seed >= 35, (cam, seed)
