"""benchmarks/stage_costs.py: the table and the VOC totals on the embedded tiny models (--tiny)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stage_costs.py"
STAGES = ("clip_features", "train_prompts@cls", "cams@cls", "seeds@coarse", "train_prompts@seg",
          "cams@seg", "seeds@fine", "train_segmenter", "train_segmenter (val)", "predict")


def test_stage_costs_tiny_prints_every_stage_and_the_voc_totals(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--in-process", "--repeats", "1", "--warmup", "0",
         "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    lines = out.strip().splitlines()
    assert lines[-1] == "RATIO stage_costs=1.0"
    table = lines[lines.index(next(l for l in lines if l.startswith("stage "))):]
    totals = lines[lines.index(next(l for l in lines if l.startswith("VOC totals"))):]
    for stage in STAGES:
        assert any(l.startswith(stage + " ") for l in table), stage
        assert any(l.startswith(stage + " ") for l in totals), stage
    assert any("1,800 steps" in l for l in totals) and any("17,000 steps" in l for l in totals)
    assert any("52,910 iterations x 16 samples" in l for l in totals)
    assert any("27 passes x 1,449 val images" in l for l in totals)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert all(r["seconds"] > 0 and r["memory_gb"] > 0 for r in rows)
