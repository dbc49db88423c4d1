"""benchmarks/gpu_check.py: its stage order is dvc.yaml's dependency order, and its CUDA steps run
end to end on the simulated CUDA device (tests/simulated_cuda.py), so the one command that is run
on a real GPU does not first fail there on its own plumbing."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check import rendered_stages, stage_commands  # noqa: E402


def test_stage_commands_follow_the_dependency_order_of_dvc_yaml():
    order = [name for name, _ in stage_commands(REPO / "dvc.yaml")]
    assert sorted(order) == sorted([
        "prepare", "sam_masks", "clip_features", "train_prompts@cls", "cams@cls", "seeds@coarse",
        "train_prompts@seg", "cams@seg", "seeds@fine", "train_segmenter", "predict", "panels"])
    before = [("prepare", "sam_masks"), ("clip_features", "train_prompts@cls"),
              ("train_prompts@cls", "cams@cls"), ("cams@cls", "seeds@coarse"),
              ("seeds@coarse", "train_prompts@seg"), ("cams@seg", "seeds@fine"),
              ("seeds@fine", "train_segmenter"), ("train_segmenter", "predict"),
              ("sam_masks", "seeds@coarse"), ("predict", "panels"), ("seeds@fine", "panels")]
    for a, b in before:
        assert order.index(a) < order.index(b), (a, b)
    argv = dict(stage_commands(REPO / "dvc.yaml"))["cams@seg"]
    assert argv[:4] == ["wsss", "cams", "--which", "seg"] and "cache/cams/seg.zarr" in argv


def test_every_rendered_stage_command_is_single_spaced():
    """An empty ``${item...}`` leaves a double space in a command; dvc.lock folds long commands
    at spaces, and a fold at a double space reads back as another command ("changed command")."""
    stages = rendered_stages(REPO / "dvc.yaml")
    assert len(stages) == 12
    for name, spec in stages.items():
        assert "  " not in spec["cmd"] and spec["cmd"] == spec["cmd"].strip(), (name, spec["cmd"])
    assert "--features cache/clip_features --out" in stages["train_prompts@cls"]["cmd"]


COMPARISONS = ("coarse seeds", "fine seeds", "cls CAMs", "seg CAMs", "cls prompts", "seg prompts",
               "training losses", "predictions of the CPU-trained segmenter")


@pytest.mark.slow
def test_gpu_check_runs_and_compares_its_cuda_steps_on_a_simulated_device(tmp_path):
    """Every step of --simulate --quick runs, and every comparison with the CPU run is made under
    its precision's tolerances. The simulated device computes on the CPU, where CUDA's autocast
    does nothing: its bf16 runs equal the CPU's, so this shows the plumbing, not bf16 numerics
    (a real GPU's to check). That the comparisons fail on wrong numbers is shown by
    tests/test_gpu_check_compare.py and tests/test_gpu_check_defects.py."""
    import json

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--simulate",
                           "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1500, cwd=REPO, check=False)
    lines = proc.stdout.strip().splitlines()
    checks = 2 + 2 * (1 + len(COMPARISONS)) + 3
    assert lines[-1] == f"GPU_CHECK device=simulated checks={checks} failed=0 skipped=1", \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines[-2].startswith("skipped: local-cluster, one worker per GPU (--simulate"), lines[-2]
    assert proc.returncode == 0
    reference = next(line for line in lines if line.startswith("[ok] cpu reference: seeds can differ"))
    assert float(reference.split(") ")[1].split()[0]) >= 3, reference  # quasi-superpixels per image
    for variant, seed_bound in (("cuda_fp32", "(>= 0.99)"), ("cuda_bf16", "(>= 0.9)")):
        for what in COMPARISONS:
            line = next(line for line in lines if line.startswith(f"[ok] {variant} vs cpu: {what}"))
            assert "OUTSIDE" not in line
        seeds = next(line for line in lines if line.startswith(f"[ok] {variant} vs cpu: coarse seeds"))
        assert seed_bound in seeds, seeds  # each precision's own tolerances
    sam = next(line for line in lines if line.startswith("[ok] SAM generator, tiny (--quick)"))
    assert all(f"{name} " in sam for name in ("stock", "ours", "ours, changes off")), sam
    for step in ("CLIP features", "segmenter training step"):
        assert any(line.startswith(f"[ok] {step}, tiny (--quick)") and "finite" in line for line in lines)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(report["checks"]) == checks and [s["step"] for s in report["skipped"]] == [
        "local-cluster, one worker per GPU"]
