"""`wsss report` reads the stored metrics (recomputes nothing): table and JSON."""
import json

from click.testing import CliRunner

from stages.cli import main


def _write(d, name, data):
    (d / name).write_text(json.dumps(data))


def test_report_json_and_table_from_stored_metrics(tmp_path):
    d = tmp_path / "metrics"
    d.mkdir()
    _write(d, "sam_masks.json", {"masks_per_image": 11.25, "three_level_fraction": 0.875, "untrained": False})
    _write(d, "seeds_coarse.json", {"cam": {"best_miou": 35.5}, "cam_caa": {"best_miou": 41.25},
                                    "seed": {"miou": 55.0}, "background_only": {"miou": 12.5},
                                    "untrained": False})
    _write(d, "seeds_fine.json", {"cam": {"best_miou": 44.0}, "seed": {"miou": 60.5}, "untrained": False})
    res = CliRunner().invoke(main, ["report", "--metrics-dir", str(d), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["cam_miou"] == 35.5 and got["cam_caa_miou"] == 41.25
    assert got["coarse_seed_miou"] == 55.0 and got["fine_seed_miou"] == 60.5
    assert got["masks_per_image"] == 11.25 and got["three_level_fraction"] == 0.875
    assert got["predict_raw_miou"] is None and got["predict_post_miou"] is None
    assert got["missing"] == ["predict.json"] and got["untrained"] is False
    res = CliRunner().invoke(main, ["report", "--metrics-dir", str(d)])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert max(len(l) for l in lines) <= 80
    assert any("CAM + CAA mIoU" in l and l.endswith("41.2") for l in lines)
    assert any("segmenter val mIoU, raw" in l and l.endswith("n/a") for l in lines)
    assert "Not run yet: predict.json" in res.output


def test_report_names_a_broken_file(tmp_path):
    (tmp_path / "seeds_fine.json").write_text("{oops")
    res = CliRunner().invoke(main, ["report", "--metrics-dir", str(tmp_path)])
    assert res.exit_code == 1 and "seeds_fine.json: not valid JSON" in res.output


def test_report_names_the_world_oracle_when_it_made_the_masks(tmp_path):
    from stages.report import ORACLE_NOTE

    for oracle in (True, False):
        _write(tmp_path, "sam_masks.json", {"masks_per_image": 6.5, "three_level_fraction": 0.0,
                                            "untrained": False, "sam_oracle": oracle})
        res = CliRunner().invoke(main, ["report", "--metrics-dir", str(tmp_path), "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["sam_oracle"] is oracle
        res = CliRunner().invoke(main, ["report", "--metrics-dir", str(tmp_path)])
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        assert (ORACLE_NOTE in lines) is oracle
        if oracle:
            assert ORACLE_NOTE.startswith("SAM: world-oracle stand-in") and "not a trained SAM" in ORACLE_NOTE
            # Under the table: after its closing rule.
            assert lines.index(ORACLE_NOTE) > max(i for i, l in enumerate(lines) if set(l) == {"-"})
    # Metrics written before the flag existed: not an oracle.
    _write(tmp_path, "sam_masks.json", {"masks_per_image": 6.5, "untrained": True})
    res = CliRunner().invoke(main, ["report", "--metrics-dir", str(tmp_path), "--json"])
    assert json.loads(res.output)["sam_oracle"] is False
