"""DVC conventions on a custom dataset: the data is a dependency, so editing a label, adding an
image or changing a mask reruns `prepare` (and only then)."""
import json

import numpy as np
import pytest
from PIL import Image

from dvc_project import dvc_env, make_project, ran_stages, sh
from pipeline.data.imageio import write_palette_png

pytestmark = pytest.mark.slow


def _image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), np.uint8)).save(path)


def _mask(path, value):
    m = np.zeros((24, 32), np.uint8)
    m[4:12, 4:20] = value
    write_palette_png(path, m)


@pytest.fixture()
def project(tmp_path):
    env = dvc_env(tmp_path / "home")
    repo = tmp_path / "repo"
    data = {"name": "custom", "root": "data/mine", "class_names": "data/mine/classes.txt",
            "labels_file": "data/mine/labels.json", "train_split": "train", "eval_split": "val"}
    make_project(repo, env, {"dataset": data}, stages=("prepare",), sections=("dataset", "compute"))
    root = repo / "data" / "mine"
    for i, image_id in enumerate(("a", "b", "c")):
        _image(root / "images" / f"{image_id}.jpg", i)
        _mask(root / "masks" / f"{image_id}.png", 1 + i % 2)
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "labels.json").write_text(json.dumps({"a": ["cat"], "b": ["dog"], "c": ["cat"]}))
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\n")
    (root / "splits" / "val.txt").write_text("c\n")
    assert ran_stages(sh("dvc", "repro", cwd=repo, env=env)) == {"prepare"}
    assert "up to date" in sh("dvc", "status", cwd=repo, env=env)
    return repo, env, root


def _train_labels(repo):
    records = json.loads((repo / "cache" / "index" / "train.json").read_text())["records"]
    return {r["id"]: r["labels"] for r in records}


def test_a_labels_edit_reruns_prepare(project):
    repo, env, root = project
    (root / "labels.json").write_text(json.dumps({"a": ["cat", "dog"], "b": ["dog"], "c": ["cat"]}))
    assert "prepare" in sh("dvc", "status", cwd=repo, env=env)
    assert ran_stages(sh("dvc", "repro", cwd=repo, env=env)) == {"prepare"}
    assert _train_labels(repo)["a"] == [0, 1]


def test_an_added_image_reruns_prepare(project):
    repo, env, root = project
    _image(root / "images" / "d.jpg", 9)
    (root / "labels.json").write_text(json.dumps({"a": ["cat"], "b": ["dog"], "c": ["cat"], "d": ["dog"]}))
    (root / "splits" / "train.txt").write_text("a\nb\nd\n")
    assert ran_stages(sh("dvc", "repro", cwd=repo, env=env)) == {"prepare"}
    assert set(_train_labels(repo)) == {"a", "b", "d"}


def test_a_changed_mask_reruns_prepare(project):
    repo, env, root = project
    _mask(root / "masks" / "c.png", 2)
    status = sh("dvc", "status", cwd=repo, env=env)
    assert "prepare" in status and "modified" in status
    assert ran_stages(sh("dvc", "repro", cwd=repo, env=env)) == {"prepare"}
