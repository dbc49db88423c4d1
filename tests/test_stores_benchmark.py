"""benchmarks/stores.py on 3 images: both layouts written, pushed and pulled through DVC, the
same bytes in both, and the ratios printed last (the store_files and dvc_push lines at the end)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stores.py"

pytestmark = pytest.mark.slow


def test_stores_benchmark_tiny_run_prints_both_layouts_and_the_ratios(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "3", "--views", "4", "--width", "16",
         "--reads", "3", "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    lines = out.strip().splitlines()
    assert lines[-2].startswith("RATIO store_files=") and lines[-1].startswith("RATIO dvc_push=")
    files = {m.group(1): float(m.group(2))
             for m in re.finditer(r"^(legacy|new)\s*: ([\d.]+) files", out, re.M)}
    # legacy: sam_masks 15 files per image, train views (1 + 4) + 2 + 2 + 1 = 10 with 4 views,
    # CAMs 7,
    # plus each store's root zarr.json; new: one zip per image and store
    assert files == {"legacy": 15 + 10 + 7 + 1.0, "new": 3 + 1.0}
    assert float(lines[-2].split("=")[1]) == pytest.approx(files["legacy"] / files["new"], abs=0.01)
    for layout in ("legacy", "new"):
        assert re.search(rf"^{layout}\s*: dvc add [\d.]+ s, no-op status [\d.]+ s, push [\d.]+ s, "
                         r"pull [\d.]+ s for 3 images", out, re.M), out
        assert re.search(rf"^{layout}\s*: read one image .* ms, one view .* ms", out, re.M), out
    assert any(l.startswith("computed for VOC train_aug + val (12,031 images") for l in lines)
    assert any(l.startswith("computed for COCO 2014 train + val (123,287 images") for l in lines)
    # the pulled stores are complete: each layout's project holds its 3 images again
    for layout, suffix in (("legacy", ""), ("new", ".zip")):
        store = tmp_path / "work" / layout / "stores" / "sam_masks.zarr"
        assert sorted(p.name for p in store.iterdir() if p.name != "zarr.json") == \
            [f"img_{i:06d}{suffix}" for i in range(3)]
