"""pipeline.tensorfile: torch files of cache/ are read as data, never as code (issue 24)."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pipeline import tensorfile
from tests.conftest import write_code_pickle


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "state.pt", tmp_path / "ran"
    write_code_pickle(path, marker, ctx=torch.zeros(2))
    with pytest.raises(tensorfile.TensorFileError) as err:
        tensorfile.load(path, "prompts checkpoint", "rerun it")
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"prompts checkpoint {path} holds objects other")
    assert message.endswith("rerun it")


def test_truncated_and_foreign_files_are_one_line(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"ctx": torch.ones(3)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:100])
    text = tmp_path / "text.pt"
    text.write_text("not a torch file\n")
    for path in (cut, text):
        with pytest.raises(tensorfile.TensorFileError, match=f"cannot read resume state {path}") as err:
            tensorfile.load(path, "resume state", "delete it")
        assert "\n" not in str(err.value)
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(tensorfile.TensorFileError, match="holds a Tensor, not a dict"):
        tensorfile.load_dict(tmp_path / "tensor.pt", "resume state", "delete it", ("ctx",))
    with pytest.raises(tensorfile.TensorFileError, match="lacks 'spec'"):
        tensorfile.load_dict(good, "prompts checkpoint", "rerun", ("ctx", "spec"))


def test_training_states_round_trip(tmp_path):
    """Optimizer, scheduler, GradScaler and RNG states, numpy's generator state (128-bit ints)
    and int-keyed dicts are all plain data: they save and load back with weights_only=True."""
    ctx = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.SGD([ctx], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5)
    ctx.sum().backward()
    opt.step()
    sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict(),
             "torch_rng": torch.get_rng_state(), "rng": np.random.default_rng(3).bit_generator.state,
             "contexts": {7: ctx.detach().clone()}, "rows": [(1, 0.5, 1e-3)], "untrained": None}
    tensorfile.save_atomic(state, tmp_path / "state.pt")
    back = tensorfile.load(tmp_path / "state.pt", "state", "")
    assert back["rng"] == state["rng"] and back["rows"] == state["rows"]
    assert torch.equal(back["contexts"][7], state["contexts"][7])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    # equal states give equal bytes whatever the file's name (DVC hashes them)
    tensorfile.save_atomic(state, tmp_path / "other.pt")
    assert (tmp_path / "other.pt").read_bytes() == (tmp_path / "state.pt").read_bytes()


@dataclass
class _Config:
    lr: float = 0.1


@pytest.mark.parametrize("bad, where", [
    ({"config": _Config()}, "['config']"), ({"x": [np.zeros(2)]}, "['x'][0]"),
    ({"names": {"a"}}, "['names']"), ({"loss": np.float64(1.0)}, "['loss']"),
])
def test_writers_refuse_what_readers_would_refuse(tmp_path, bad, where):
    with pytest.raises(TypeError, match=f"saved state {where.replace('[', '.').replace(']', '.')}"):
        tensorfile.save_atomic(bad, tmp_path / "state.pt")
    assert list(tmp_path.iterdir()) == []


def test_demo_trainer_resume_state_holding_code_is_refused(tmp_path):
    from pipeline.demo.training.clip import load_resume_state

    path, marker = tmp_path / "clip_training_state.pt", tmp_path / "ran"
    write_code_pickle(path, marker, config={})
    with pytest.raises(tensorfile.TensorFileError, match=f"rm {path}"):
        load_resume_state(path, {})
    assert not marker.exists()
