"""benchmarks/demo_worlds.py's verdict: the floors of the ablation order (issue 31), on rows
shaped like ``wsss report --json``."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from demo_worlds import main, missed_floors, table  # noqa: E402

GOOD = {"cam_miou": 45.0, "coarse_seed_miou": 58.0, "fine_seed_miou": 70.0,
        "predict_raw_miou": 62.0, "predict_post_miou": 66.0, "background_only_miou": 30.0}


def test_a_world_in_order_misses_nothing():
    assert missed_floors(GOOD) == []
    assert "none" in table([{"world": 3, **GOOD}]).splitlines()[1]


@pytest.mark.parametrize("change, missed", [
    ({"cam_miou": 39.9}, ["CAM >= 40"]),
    ({"coarse_seed_miou": 54.9}, ["coarse >= CAM + 10"]),
    ({"fine_seed_miou": 57.0}, ["fine >= coarse"]),
    ({"fine_seed_miou": 54.0, "coarse_seed_miou": 54.0, "cam_miou": 40.0},
     ["fine >= 55"]),
    ({"predict_raw_miou": 59.9}, ["raw >= fine - 10"]),
    ({"predict_post_miou": 61.0}, ["post >= raw"]),
])
def test_each_floor_is_checked(change, missed):
    assert missed_floors({**GOOD, **change}) == missed


def test_a_missing_value_misses_its_floors():
    row = dict(GOOD)
    del row["predict_post_miou"]
    assert missed_floors(row) == ["post >= raw"]
    assert missed_floors({**GOOD, "cam_miou": math.nan})[:2] == ["CAM >= 40", "coarse >= CAM + 10"]


def test_bad_settings_stop_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--set", "no-equals-sign", "--workspace", str(tmp_path)])
    assert not (tmp_path / "repo").exists()
