"""The embedded default shows the method working (slow): a reduced demo run of the whole DVC graph
with the trained demo CLIP, the world-oracle SAM stand-in and the demo segmenter. The learned
prompts' CAMs beat the all-background score, SAMS seeds beat those CAMs, the fine seeds are at
least the coarse ones, and SAMS post-processing improves the segmenter. Floors and orderings, not
exact numbers: a broken hand-over between stages (a view transform, CAM resizing, class order,
palette, levels) drops one of them far below its floor."""
import json

import pytest

from tests.dvc_project import dvc_env, make_project, ran_stages, sh

pytestmark = pytest.mark.slow

REDUCED = {
    # the embedded default's 32 train images and 4 views (with 16 and 2, the cls prompts' 300
    # steps reached only CAM 21.8, measured)
    "dataset": {"demo": {"n_train": 32, "n_val": 8, "seed": 0}},
    "compute": {"scheduler": "local", "device": "cpu"},
    "sam": {"points_per_side": 8, "crop_n_layers": 0},
    "segmenter": {"iterations": 150, "val_every": 50, "checkpoint_every": 50},
    "predict": {"scales": [0.75, 1.0, 1.25]},
}


def test_reduced_demo_shows_the_method_working(tmp_path):
    env = dvc_env(tmp_path / "home")
    repo = tmp_path / "repo"
    make_project(repo, env, REDUCED)
    out = sh("dvc", "repro", cwd=repo, env=env)
    assert {"seeds@coarse", "seeds@fine", "train_segmenter", "predict"} <= ran_stages(out), out
    sam = json.loads((repo / "cache/metrics/sam_masks.json").read_text())
    coarse = json.loads((repo / "cache/metrics/seeds_coarse.json").read_text())
    fine = json.loads((repo / "cache/metrics/seeds_fine.json").read_text())
    predict = json.loads((repo / "cache/metrics/predict.json").read_text())
    assert sam["sam_oracle"] is True and coarse["untrained"] is False and predict["untrained"] is False
    background, cam, seed = coarse["background_only"]["miou"], coarse["cam"]["best_miou"], coarse["seed"]["miou"]
    assert cam >= background + 10, (background, cam)
    assert seed >= cam + 5 and seed >= 35, (cam, seed)
    # measured here: coarse 66.7, fine 70.9 (the seg prompts start from the cls context and L_CAL
    # moves them at the demo's lr 10; docs/demo.md, "What `make demo` shows")
    assert fine["seed"]["miou"] >= max(50, seed), (seed, fine["seed"]["miou"])
    raw, post = predict["raw"]["miou"], predict["postprocessed"]["miou"]
    print(f"reduced demo: all-background {background}, CAM {cam}, coarse {seed}, "
          f"fine {fine['seed']['miou']}, segmenter raw {raw}, post-processed {post}")
    assert predict["model"] == "demo_clip_vit"
    assert post >= raw and post >= 30, (raw, post)
