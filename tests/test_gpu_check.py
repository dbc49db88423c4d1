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
        "train_prompts@seg", "cams@seg", "seeds@fine", "train_segmenter", "predict"])
    before = [("prepare", "sam_masks"), ("clip_features", "train_prompts@cls"),
              ("train_prompts@cls", "cams@cls"), ("cams@cls", "seeds@coarse"),
              ("seeds@coarse", "train_prompts@seg"), ("cams@seg", "seeds@fine"),
              ("seeds@fine", "train_segmenter"), ("train_segmenter", "predict"),
              ("sam_masks", "seeds@coarse")]
    for a, b in before:
        assert order.index(a) < order.index(b), (a, b)
    argv = dict(stage_commands(REPO / "dvc.yaml"))["cams@seg"]
    assert argv[:4] == ["wsss", "cams", "--which", "seg"] and "cache/cams/seg.zarr" in argv


def test_every_rendered_stage_command_is_single_spaced():
    """An empty ``${item...}`` leaves a double space in a command; dvc.lock folds long commands
    at spaces, and a fold at a double space reads back as another command ("changed command")."""
    stages = rendered_stages(REPO / "dvc.yaml")
    assert len(stages) == 11
    for name, spec in stages.items():
        assert "  " not in spec["cmd"] and spec["cmd"] == spec["cmd"].strip(), (name, spec["cmd"])
    assert "--features cache/clip_features --out" in stages["train_prompts@cls"]["cmd"]


@pytest.mark.slow
def test_gpu_check_runs_its_cuda_steps_on_a_simulated_device(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--simulate",
                           "--quick", "--skip-real", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1500, cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "GPU_CHECK device=simulated checks=3 failed=0", proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0
    agreement = [line for line in lines if line.startswith("[ok] tiny graph on cuda_")]
    assert len(agreement) == 2 and all("fine seed agreement 100.00%" in line for line in agreement)
