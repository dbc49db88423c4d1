"""params.yaml itself: DVC's own rewrite (`dvc exp run -S`) changes only the line it sets."""
import difflib
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _dvc_set(path: Path, dotted: str, value) -> None:
    from dvc.utils.serialize import modify_yaml  # what `dvc exp run -S` writes through

    with modify_yaml(str(path)) as data:
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value


def _changed_lines(a: Path, b: Path) -> list[str]:
    diff = difflib.unified_diff(a.read_text().splitlines(), b.read_text().splitlines(), n=0, lineterm="")
    return [l for l in diff if l[:1] in "+-" and not l.startswith(("+++", "---"))]


def test_dvc_round_trip_changes_nothing(tmp_path):
    copy = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", copy)
    with __import__("dvc.utils.serialize", fromlist=["modify_yaml"]).modify_yaml(str(copy)):
        pass
    assert copy.read_text() == (REPO / "params.yaml").read_text()


@pytest.mark.parametrize("dotted, value", [
    ("seeds.fine.alpha", 0.8),
    ("sam.checkpoint", "weights/sam_vit_b_01ec64.pth"),
    ("prompts.cls.iterations", 250),
    ("dataset.demo.seed", 3),
])
def test_setting_one_param_changes_one_line(tmp_path, dotted, value):
    copy = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", copy)
    _dvc_set(copy, dotted, value)
    changed = _changed_lines(REPO / "params.yaml", copy)
    assert len(changed) == 2, changed  # one line out, one line in
    assert changed[1].lstrip("+").strip().startswith(f"{dotted.split('.')[-1]}: {value}")
    node = yaml.safe_load(copy.read_text())
    for part in dotted.split("."):
        node = node[part]
    assert node == value
