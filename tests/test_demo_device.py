"""``wsss demo-models --device cuda`` on the simulated CUDA device (tests/simulated_cuda.py).

Each run goes once on the CPU (under the pass-through mode, so both take the same kernels) and
once with ``--device cuda`` under :func:`simulated_cuda`: no op may meet tensors of two devices
and no CUDA tensor may reach numpy, the networks must run on the device (every layer norm's input
is on it), and the weights, held-out reports and curves must equal the CPU run's: the arithmetic
is the CPU's, so any difference is a device-dependent branch or random stream taken wrongly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from stages.cli import main
from tests.simulated_cuda import PassThroughMode, logical_device, simulated_cuda

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["demo-models", "--params", str(REPO / "params.yaml"), "--clip-steps", "1", "--sam-steps", "2",
         "--n-images", "4", "--eval-images", "1", "--sam-evaluate-every", "1", "--threads", "1"]


def _invoke(args, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


@pytest.fixture
def layer_norm_devices(monkeypatch) -> set:
    """The devices of every ``F.layer_norm`` input (open_clip's and SAM's transformers)."""
    seen: set = set()
    layer_norm = F.layer_norm

    def spy(x, *args, **kwargs):
        seen.add(logical_device(x))
        return layer_norm(x, *args, **kwargs)

    monkeypatch.setattr(F, "layer_norm", spy)
    return seen


def _report(out: Path) -> dict:
    """demo_models.json without what depends on the clock or names the device."""
    report = json.loads((out / "demo_models.json").read_text())
    for model in ("clip", "sam"):
        if model in report:
            report[model].pop("seconds")
            for entry in report[model]["curve"]:
                entry.pop("train_minutes", None)
    return report


@pytest.mark.parametrize("only", ["clip", "sam"])
def test_demo_models_train_on_the_device_to_the_cpu_runs_weights(tmp_path, only, layer_norm_devices):
    cpu, cuda = tmp_path / "cpu", tmp_path / "cuda"
    with PassThroughMode():
        _invoke([*TRAIN, "--only", only, "--out", cpu])
    assert layer_norm_devices == {torch.device("cpu")}
    layer_norm_devices.clear()
    with simulated_cuda() as mode:
        _invoke([*TRAIN, "--only", only, "--out", cuda, "--device", "cuda"])
    assert mode.checked_ops > 0 and layer_norm_devices == {torch.device("cuda", 0)}

    expected, got = _report(cpu), _report(cuda)
    assert expected["command"]["device"] == "cpu" and got["command"]["device"] == "cuda"
    expected.pop("command"), got.pop("command")
    assert got == expected and got[only]["held_out"] and got[only]["curve"]
    weights = {"clip": "clip_demo.pt", "sam": "sam_demo.pth"}[only]
    assert (cuda / weights).read_bytes() == (cpu / weights).read_bytes()


@pytest.mark.parametrize("model", ["clip", "sam"])
def test_a_cpu_runs_resume_state_continues_on_the_device(tmp_path, model):
    """Killed after 3 steps on the CPU, resumed with ``device="cuda"``: the state loads on the
    CPU and moves (model, optimizer moments, learnable extras), ending with the weights of an
    uninterrupted CPU run."""
    from pipeline.demo.training import clip as clip_training
    from pipeline.demo.training import sam as sam_training

    torch.set_num_threads(1)
    if model == "clip":
        cfg = clip_training.ClipTrainingConfig(n_images=4, batch_size=2, crop_sizes=(64,), cam_views=2)
        cfg = cfg.with_phase_steps(4)
        data, train, extra = clip_training.training_images(cfg), clip_training.train_clip, {}
    else:
        cfg = sam_training.SamTrainingConfig(n_images=2, steps=5, batch_size=2, points_per_image=2, warmup_steps=2)
        data, train = sam_training.training_items(cfg), sam_training.train_sam
        extra = {"clip_state": clip_training.create_demo_clip(0).state_dict()}

    class Killed(Exception):
        pass

    def kill(step, stats):
        if step + 1 == 3:
            raise Killed

    with PassThroughMode():
        whole = train(cfg, data=data, **extra).state_dict()
        with pytest.raises(Killed):
            train(cfg, data=data, progress=kill, state_dir=tmp_path, checkpoint_every=1, **extra)
    with simulated_cuda():
        resumed = train(cfg, data=data, state_dir=tmp_path, checkpoint_every=1, device="cuda", **extra)
        assert {logical_device(p) for p in resumed.parameters()} == {torch.device("cuda", 0)}
        resumed = {k: v.cpu() for k, v in resumed.state_dict().items()}
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_demo_models_evaluate_on_the_device_equals_the_cpu(tmp_path, layer_norm_devices):
    sam_file = tmp_path / "sam_demo.pth"
    with PassThroughMode():
        _invoke([*TRAIN, "--only", "sam", "--sam-steps", "1", "--eval-images", "0", "--out", tmp_path])
    args = ["demo-models", "--evaluate", "--n", "1", "--world-seed", "1", "--threads", "1", "--sam", sam_file]
    with PassThroughMode():
        expected = json.loads(_invoke(args).stdout)
    layer_norm_devices.clear()
    with simulated_cuda():
        got = json.loads(_invoke([*args, "--device", "cuda"]).stdout)
    assert layer_norm_devices == {torch.device("cuda", 0)}
    assert set(got) == {"world_seed", "n_images", "clip", "sam"} and got == expected


def test_demo_models_refuses_a_missing_cuda_device_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["demo-models", "--evaluate", "--n", "1", "--device", "cuda"])
    assert result.exit_code != 0
    assert "--device is 'cuda' but no CUDA device is available" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["demo-models", "--evaluate", "--n", "1", "--device", "gpu"])
    assert result.exit_code != 0 and "--device must be cpu, cuda, cuda:N or auto" in result.output


def test_demo_models_bf16_trains_under_autocast(tmp_path):
    """``--precision bf16`` (here on the CPU, where autocast runs too): the forward passes in bf16
    change the weights, which stay finite, and the held-out report is written."""
    args = [*TRAIN, "--only", "clip", "--eval-images", "1"]
    _invoke([*args, "--out", tmp_path / "fp32"])
    _invoke([*args, "--out", tmp_path / "bf16", "--precision", "bf16"])
    fp32 = torch.load(tmp_path / "fp32" / "clip_demo.pt", weights_only=True)
    bf16 = torch.load(tmp_path / "bf16" / "clip_demo.pt", weights_only=True)
    assert not torch.equal(fp32["visual.proj"], bf16["visual.proj"])
    assert all(v.dtype == torch.float16 and bool(torch.isfinite(v).all()) for v in bf16.values())
    report = json.loads((tmp_path / "bf16" / "demo_models.json").read_text())
    assert report["command"]["precision"] == "bf16" and report["clip"]["held_out"]["cam_miou"] >= 0
