"""benchmarks/gpu_check.py fails where a broken product would pass: a numeric defect on the CUDA
device only (here the simulated one), and a device-discipline run that does not import, collects
nothing or fails. Each case runs the script as its own process, after a few lines that put the
defect in (the script itself has no hook for it)."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# CAMs shifted by two patches to the right, on a CUDA device only (``clip.visual.proj.device``
# is the simulated device's logical one): what a wrong stride or layout in a CUDA kernel does.
CAMS_SHIFTED_ON_CUDA = """
import numpy as np
import pipeline.cams.inference as inference

_image_cams = inference.image_cams

def image_cams_shifted_on_cuda(clip, *args, **kwargs):
    cam, fg_cls = _image_cams(clip, *args, **kwargs)
    if clip.visual.proj.device.type == "cuda":
        cam = np.roll(cam, 2, axis=-1)
    return cam, fg_cls

inference.image_cams = image_cams_shifted_on_cuda
"""


def run_gpu_check(defect: str, args: list[str]) -> subprocess.CompletedProcess:
    """``gpu_check.main(args)`` in a new process, after the lines ``defect``."""
    launcher = "\n".join([
        "import sys",
        f"sys.path[:0] = [{str(REPO / 'benchmarks')!r}, {str(REPO)!r}]",
        "import gpu_check",
        textwrap.dedent(defect),
        "sys.exit(gpu_check.main(sys.argv[1:]))",
    ])
    return subprocess.run([sys.executable, "-c", launcher, *args], capture_output=True, text=True,
                          timeout=1500, cwd=REPO, check=False)


def summary(proc: subprocess.CompletedProcess) -> dict[str, int]:
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"GPU_CHECK device=(\w+) checks=(\d+) failed=(\d+) skipped=(\d+)", last)
    assert match, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"device": match[1], **{k: int(v) for k, v in zip(("checks", "failed", "skipped"), match.groups()[1:])}}


@pytest.mark.slow
def test_cams_shifted_on_cuda_only_fail_the_simulated_check(tmp_path):
    proc = run_gpu_check(CAMS_SHIFTED_ON_CUDA, ["--simulate", "--quick", "--skip-real",
                                                "--out", str(tmp_path)])
    result = summary(proc)
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if line.startswith("[FAILED]")]
    assert proc.returncode == 1 and result["failed"] >= 1, proc.stdout[-3000:]
    # the CPU reference is untouched; both CUDA variants' CAMs are outside their tolerances
    assert any(line.startswith("[ok] tiny graph on cpu") for line in lines)
    for variant in ("cuda_fp32", "cuda_bf16"):
        for which in ("cls", "seg"):
            line = next(line for line in failed if line.startswith(f"[FAILED] {variant} vs cpu: {which} CAMs"))
            assert "cam correlation" in line and "OUTSIDE" in line, line
    assert result["failed"] == len(failed)
    # --skip-real and --simulate leave out the real-size steps and the cluster: named, counted
    skipped = next(line for line in lines if line.startswith("skipped: "))
    for step in ("SAM generator", "CLIP features", "segmenter training step", "local-cluster"):
        assert step in skipped, skipped
    assert result["skipped"] == 4


DISCIPLINE_FILES = {
    "unimportable": ("import a_module_that_does_not_exist\n\ndef test_never_runs():\n    pass\n", 1),
    "collects nothing": ("HELPER = 1\n", 1),
    "one test fails": ("def test_passes():\n    pass\n\ndef test_fails():\n    assert False\n", 2),
    "passes": (("import pytest\n\ndef test_passes():\n    pass\n\n"
                "def test_skipped():\n    pytest.skip('not here')\n"), 0),
}


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=() if case == "unimportable" else pytest.mark.slow)  # ~5 s each
    for case in DISCIPLINE_FILES])
def test_the_run_without_cuda_fails_unless_its_pytest_run_passes(tmp_path, case):
    source, failures = DISCIPLINE_FILES[case]
    tests = tmp_path / "test_discipline_case.py"
    tests.write_text(source)
    proc = run_gpu_check(f"""
        import torch
        from pathlib import Path
        torch.cuda.is_available = lambda: False
        gpu_check.DEVICE_DISCIPLINE_TESTS = Path({str(tests)!r})
        """, ["--out", str(tmp_path / "out")])
    result = summary(proc)
    assert result["device"] == "none"
    assert result["failed"] == failures, proc.stdout[-3000:]
    assert proc.returncode == (1 if failures else 0)
    run_line = next(line for line in proc.stdout.splitlines() if "device-discipline pytest run" in line)
    assert run_line.startswith("[ok]" if not failures else "[FAILED]"), run_line
    if case == "passes":
        assert (result["checks"], result["skipped"]) == (2, 1)
        skipped = next(line for line in proc.stdout.splitlines() if line.startswith("skipped: "))
        assert "test_discipline_case.py::test_skipped" in skipped and "not here" in skipped, skipped
