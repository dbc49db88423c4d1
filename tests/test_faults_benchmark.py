"""benchmarks/faults.py at a small size (the benchmark runs it at 1,000 images): kill -9 of
``dvc repro`` mid ``sam_masks`` and mid ``cams@cls`` and of ``dvc push``, every check passing."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "faults.py"

pytestmark = pytest.mark.slow


def test_faults_benchmark_small_run_passes_every_check(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--images", "10", "--val", "2", "--push-kill-at", "0.02",
                           "--shell", "/bin/sh",
                           "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=1500)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    assert out.strip().splitlines()[-1] == "RATIO faults_ok=1.00"
    assert not re.search(r"^FAIL", out, re.M)
    # the kills landed where they were meant to, and each rerun resumed
    assert "ok   repro in sam_masks: a stage process was running under dvc at the kill" in out
    assert "ok   repro in cams@cls: a stage process was running under dvc at the kill" in out
    assert "ok   repro in sam_masks: the kill landed mid-way" in out
    assert "ok   repro in cams@cls: the kill landed mid-way" in out
    # after each kill the store held what was complete at the kill, plus at most the image in
    # flight (none for push), and nothing more 2 s later
    for what, in_flight in (("repro in sam_masks", 1), ("repro in cams@cls", 1), ("push", 0)):
        m = re.search(rf"^ok   {re.escape(what)}: the store holds no more than the entries complete or in "
                      rf"flight \({in_flight}\) at the kill, and nothing more 2 s later: (\d+) at the kill, "
                      r"(\d+) once its processes were gone, (\d+) 2 s later$", out, re.M)
        assert m and 0 < int(m[1]) <= int(m[2]) <= int(m[1]) + in_flight and m[2] == m[3], (what, out)
    m = re.search(r"ok   sam_masks resumed: .*: (\d+) images computed, (\d+) already", out)
    assert m and int(m[1]) > 0 and int(m[2]) > 0, out
    m = re.search(r"ok   cams@cls resumed: .*: cams@cls: (\d+) images computed, (\d+) resumed", out)
    assert m and int(m[1]) > 0 and int(m[2]) > 0, out
    assert "ok   dvc status is clean in the clone" in out
