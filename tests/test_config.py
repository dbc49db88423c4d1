from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.config import ConfigError, from_mapping, to_dict


@dataclass(frozen=True)
class Inner:
    alpha: float = 0.6
    levels: tuple[float, float, float] = (0.0, 0.0, 0.1)


@dataclass(frozen=True)
class Outer:
    name: str
    n: int = 3
    mode: Literal["score", "cam"] = "score"
    path: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_builds_nested_and_coerces():
    cfg = from_mapping(Outer, {"name": "x", "n": 5, "inner": {"alpha": 1, "levels": [0, 0, 1]}}, "sec")
    assert cfg == Outer("x", 5, "score", None, Inner(1.0, (0.0, 0.0, 1.0)))
    assert isinstance(cfg.inner.alpha, float)
    assert to_dict(cfg)["inner"] == {"alpha": 1.0, "levels": [0.0, 0.0, 1.0]}


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"name": "x", "nn": 1}, "unknown parameter 'sec.nn'"),
        ({}, "missing parameter 'sec.name'"),
        ({"name": "x", "n": 1.5}, "'sec.n' must be an integer"),
        ({"name": "x", "n": True}, "'sec.n' must be an integer"),
        ({"name": "x", "mode": "both"}, "'sec.mode' must be one of"),
        ({"name": "x", "inner": {"alpa": 1}}, "unknown parameter 'sec.inner.alpa'"),
        ({"name": "x", "inner": {"levels": [0, 1]}}, "'sec.inner.levels' must have 3 entries"),
        ({"name": "x", "inner": {"alpha": "high"}}, "'sec.inner.alpha' must be a number"),
        ({"name": 3}, "'sec.name' must be a string"),
    ],
)
def test_errors_name_the_key(mapping, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_mapping(Outer, mapping, "sec")


def test_compute_precision_selects_the_autocast_dtype():
    import torch

    from pipeline.precision import autocast
    from pipeline.params import ComputeConfig, section
    from pipeline.errors import PipelineError

    assert section({"compute": {}}, "compute", ComputeConfig).precision == "fp32"
    with pytest.raises(PipelineError, match="compute.precision"):
        section({"compute": {"precision": "fp16"}}, "compute", ComputeConfig)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32


def test_training_precision_modes():
    import torch

    from pipeline.precision import grad_scaler, training_autocast, training_precision

    assert training_precision("fp32", False, "cuda") == "fp32"
    assert training_precision("bf16", False, "cuda") == "bf16"
    assert training_precision("fp32", True, "cuda") == "fp16-amp"   # the reference's AMP
    assert training_precision("fp32", True, "cpu") == "fp32"        # CUDA only
    with pytest.raises(ValueError, match="two precisions"):
        training_precision("bf16", True, "cuda")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16-amp", torch.float16)):
        with training_autocast("cpu", precision):
            assert (a @ b).dtype == dtype
        assert grad_scaler("cpu", precision).is_enabled() == (precision == "fp16-amp")  # bf16: no scaler


def test_bf16_on_a_cuda_device_without_it_is_one_line(monkeypatch):
    import torch

    from pipeline.errors import PipelineError
    from pipeline.device import torch_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    assert torch_device("cuda:0", "fp32") == torch.device("cuda:0")
    with pytest.raises(PipelineError) as err:
        torch_device("cuda:0", "bf16")
    message = str(err.value)
    assert "\n" not in message and "cuda:0 (Tesla V100-SXM2-16GB) does not support bfloat16" in message
    assert message.endswith("set compute.precision: fp32")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert torch_device("cuda:0", "bf16") == torch.device("cuda:0")


def test_ranges_are_checked_with_the_key_named():
    from pipeline.config import param

    @dataclass(frozen=True)
    class Ranged:
        alpha: float = param(0.6, gt=0)
        thresh: float = param(0.5, ge=0, le=1)
        powers: tuple[float, ...] = param((1.0, 2.0), gt=0)

    assert from_mapping(Ranged, {"alpha": 2, "thresh": 1, "powers": [0.5]}, "s") == Ranged(2.0, 1.0, (0.5,))
    with pytest.raises(ConfigError, match=r"'s.alpha' must be > 0, got -1"):
        from_mapping(Ranged, {"alpha": -1}, "s")
    with pytest.raises(ConfigError, match=r"'s.thresh' must be >= 0 and <= 1, got 1.5"):
        from_mapping(Ranged, {"thresh": 1.5}, "s")
    with pytest.raises(ConfigError, match=r"'s.powers\[1\]' must be > 0"):
        from_mapping(Ranged, {"powers": [1, 0]}, "s")


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(sedes={"fine": {"alpha": 0.7}}), "unknown section 'sedes'"),
    (lambda p: p["seeds"]["fine"].update(alpha=-1), "'seeds.fine.alpha' must be > 0, got -1"),
    (lambda p: p["seeds"].update(fallback_thresh=2), "'seeds.fallback_thresh' must be >= 0 and <= 1"),
    (lambda p: p["compute"].update(workers=0), "'compute.workers' must be >= 1"),
])
def test_stages_stop_on_bad_params_with_the_key_named(tmp_path, edit, message):
    from pathlib import Path

    import yaml
    from click.testing import CliRunner

    from stages.cli import main

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(main, ["seeds", "--which", "fine", "--params", str(tmp_path / "params.yaml"),
                                    "--cams", "c", "--out", "o", "--metrics", "m", "--plots", "p"])
    assert res.exit_code == 1
    assert len(res.output.strip().splitlines()) == 1 and message in res.output, res.output


@pytest.mark.parametrize("args, edit, message", [
    (["train-segmenter", "--seeds", "s", "--out", "o", "--plots", "p.csv"],
     lambda p: p["segmenter"].update(lr=-0.1), "'segmenter.lr' must be > 0, got -0.1"),
    (["train-segmenter", "--seeds", "s", "--out", "o", "--plots", "p.csv"],
     lambda p: p["segmenter"].update(flip_prob=1.5), "'segmenter.flip_prob' must be >= 0 and <= 1"),
    (["sam-masks", "--out", "o"],
     lambda p: p["sam"].update(stability_score_thresh=1.5), "'sam.stability_score_thresh' must be >= 0 and <= 1"),
    (["sam-masks", "--out", "o"],
     lambda p: p["sam"].update(points_per_side=0), "'sam.points_per_side' must be >= 1"),
    (["cams", "--which", "cls", "--features", "f", "--out", "o"],
     lambda p: p["cams"]["cls"]["caa"].update(t_box=2), "'cams.cls.caa.t_box' must be >= 0 and <= 1"),
])
def test_sam_segmenter_and_cam_params_are_range_checked(tmp_path, args, edit, message):
    from pathlib import Path

    import yaml
    from click.testing import CliRunner

    from stages.cli import main

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(main, [args[0], "--params", str(tmp_path / "params.yaml"), *args[1:]])
    assert res.exit_code == 1
    assert len(res.output.strip().splitlines()) == 1 and message in res.output, res.output


def test_exponent_notation_without_a_dot_is_a_number():
    import yaml

    mapping = yaml.safe_load("name: x\ninner: {alpha: 1e-3, levels: [5E+1, -2e0, .5e1]}\n")
    assert mapping["inner"]["alpha"] == "1e-3"  # PyYAML (YAML 1.1) gives a string
    cfg = from_mapping(Outer, mapping, "sec")
    assert cfg.inner.alpha == 1e-3 and cfg.inner.levels == (50.0, -2.0, 5.0)
    for bad in ("1e", "e-3", "1e-3x"):
        with pytest.raises(ConfigError, match="'sec.inner.alpha' must be a number"):
            from_mapping(Outer, {"name": "x", "inner": {"alpha": bad}}, "sec")
