"""Per-image execution where users run it: models keyed by the content of their files and
dropped after each stage, stateful models never shared by two threads, the device checked where
the models run, one GPU per ``local-cluster`` worker, and ``cams`` against an external
``dask scheduler`` whose workers outlive a retraining of the prompts."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages import execution, resources
from pipeline.params import ComputeConfig
from pipeline.errors import PipelineError
from stages.execution import run_per_image
from stages.resources import WorkerResource
from test_sam_masks_stage import make_params, run

REPO = Path(__file__).resolve().parents[1]


# -- the model cache follows the content of the files it loads -----------------------------------


def _read_model(path: str) -> str:
    return Path(path).read_text()


def _echo_model(model, item):
    return model


def test_a_file_replaced_at_the_same_path_is_a_new_model(tmp_path):
    """A worker that still holds the old model (no release in between) builds the new one."""
    f = tmp_path / "cls.pt"
    f.write_text("old prompts")
    assert WorkerResource.of(_read_model, files=("path",), path=str(f)).get() == "old prompts"
    f.write_text("new prompts")
    assert WorkerResource.of(_read_model, files=("path",), path=str(f)).get() == "new prompts"


def test_a_file_that_changes_under_a_running_stage_is_refused(tmp_path):
    f = tmp_path / "best.pt"
    f.write_text("what the stage hashed")
    resource = WorkerResource.of(_read_model, files=("path",), path=str(f))
    f.write_text("what the worker would load")
    with pytest.raises(PipelineError, match=f"{f} is not the file the stage started with"):
        resource.get()


def test_file_kwargs_reach_into_a_dict_and_allow_no_file(tmp_path):
    f = tmp_path / "sam.pth"
    f.write_text("a")
    one = WorkerResource.of(_read_model, files=("sam.checkpoint", "none", "missing"),
                            sam={"checkpoint": str(f)}, none=None, missing=str(tmp_path / "nope"))
    digests = dict(one.digests)
    assert digests["none"] is None and digests["missing"] is None
    f.write_text("b")
    two = WorkerResource.of(_read_model, files=("sam.checkpoint", "none", "missing"),
                            sam={"checkpoint": str(f)}, none=None, missing=str(tmp_path / "nope"))
    assert digests["sam.checkpoint"] != dict(two.digests)["sam.checkpoint"]
    assert one.key() != two.key()


def test_a_local_stage_leaves_no_model_cached(tmp_path):
    f = tmp_path / "cls.pt"
    f.write_text("prompts")
    resource = WorkerResource.of(_read_model, files=("path",), path=str(f))
    assert run_per_image(_echo_model, [1, 2], ComputeConfig(), resource) == ["prompts"] * 2
    assert resources._RESOURCES == {}


# -- stateful models on a worker with several threads ------------------------------------------


class _StatefulModel:
    """SamPredictor's shape of state: ``set_image`` keeps the image until ``reset_image``."""

    def __init__(self):
        self.image = None

    def set_image(self, image):
        self.image = image

    def reset_image(self):
        self.image = None


def _build_stateful() -> _StatefulModel:
    return _StatefulModel()


def _decode(model: _StatefulModel, item: int):
    model.set_image(item)
    time.sleep(0.3)  # the decode: another thread sharing the model would replace the image here
    decoded = model.image
    model.reset_image()
    return decoded


@pytest.fixture
def two_thread_worker():
    """A scheduler and one worker with two threads, in this process."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None, worker_dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_a_stateful_model_is_not_shared_by_two_threads_at_once(two_thread_worker):
    compute = ComputeConfig(scheduler=two_thread_worker)
    items = list(range(4))
    assert run_per_image(_decode, items, compute, WorkerResource.of(_build_stateful)) == items


# -- where the device is checked --------------------------------------------------------------


def _cuda_query_is_a_bug(*args, **kwargs):
    raise AssertionError("the stage's own process asked about CUDA")


def test_local_checks_the_device_in_process(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = make_params(tmp_path / "params.yaml", sam={"model": "world-oracle"},
                         compute={"device": "cuda"})
    run("prepare", "--params", params, "--out", tmp_path / "index")
    result = run("sam-masks", "--params", params, "--index", tmp_path / "index",
                 "--out", tmp_path / "m.zarr", expect=1)
    assert result.output.strip() == "Error: compute.device is 'cuda' but no CUDA device is available"


@pytest.mark.slow
def test_a_cluster_checks_the_device_on_its_workers(tmp_path, monkeypatch):
    """The DVC process (a login node) has no GPU and must not care; a worker without one stops
    the stage with the same one line, naming the worker."""
    params = make_params(tmp_path / "params.yaml", sam={"model": "world-oracle"},
                         compute={"device": "cuda", "scheduler": "local-cluster", "workers": 1})
    run("prepare", "--params", params, "--out", tmp_path / "index")
    monkeypatch.setattr(torch.cuda, "is_available", _cuda_query_is_a_bug)
    result = run("sam-masks", "--params", params, "--index", tmp_path / "index",
                 "--out", tmp_path / "m.zarr", expect=1)
    errors = [line for line in result.output.splitlines() if "rror" in line]  # not the tqdm bar
    assert len(errors) == 1, result.output
    assert errors[0].startswith("Error: compute.device is 'cuda' but no CUDA device is available "
                               "on dask worker tcp://127.0.0.1:"), errors[0]


# -- one GPU per local-cluster worker ----------------------------------------------------------


def _gpus(monkeypatch, count: int, visible: str | None = None):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def _visible(compute: ComputeConfig):
    return [env.get("CUDA_VISIBLE_DEVICES") for env in execution.local_cluster_workers(compute)]


def test_local_cluster_workers_get_one_gpu_each(monkeypatch):
    cluster = {"scheduler": "local-cluster"}
    _gpus(monkeypatch, 4)
    assert _visible(ComputeConfig(**cluster, device="cuda")) == ["0", "1", "2", "3"]
    assert _visible(ComputeConfig(**cluster, device="auto")) == ["0", "1", "2", "3"]
    assert _visible(ComputeConfig(**cluster, device="cuda", workers=6)) == [
        "0", "1", "2", "3", "0", "1"]
    # a pinned GPU is every worker's; the CPU spreads nothing
    assert _visible(ComputeConfig(**cluster, device="cuda:1")) == [None] * 2
    assert _visible(ComputeConfig(**cluster, device="cpu")) == [None] * 2
    _gpus(monkeypatch, 2, visible="GPU-aa,GPU-bb")
    assert _visible(ComputeConfig(**cluster, device="cuda")) == ["GPU-aa", "GPU-bb"]
    _gpus(monkeypatch, 0)
    assert _visible(ComputeConfig(**cluster, device="cuda", workers=3)) == [None] * 3


@pytest.mark.slow
def test_local_cluster_worker_processes_see_their_own_gpu(monkeypatch):
    from distributed import Client

    _gpus(monkeypatch, 3, visible="4,6,7")
    cluster = execution._local_cluster(ComputeConfig(scheduler="local-cluster", device="cuda"))
    try:
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=120)
            seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
            names = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}
            assert {names[addr]: gpu for addr, gpu in seen.items()} == {0: "4", 1: "6", 2: "7"}
            assert all(w["nthreads"] == 1 for w in client.scheduler_info()["workers"].values())
    finally:
        cluster.close()


# -- a stage against an external scheduler, across a retraining of the prompts -----------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def external_scheduler(tmp_path):
    """``dask scheduler`` and two ``dask worker --nthreads 1`` processes on 127.0.0.1, importing
    this checkout; every process group is killed at the end, whatever happened."""
    from distributed import Client

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    address = f"tcp://127.0.0.1:{_free_port()}"
    dask = [sys.executable, "-m", "dask"]
    commands = [[*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                 "--no-dashboard"]]
    commands += [[*dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                  "--no-dashboard", "--name", f"w{i}"] for i in range(2)]
    procs = []
    try:
        for cmd in commands:
            procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True,
                                          stdout=subprocess.DEVNULL,
                                          stderr=open(tmp_path / f"dask{len(procs)}.log", "w")))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _cams(params, work, prompts, out):
    run("cams", "--which", "cls", "--params", params, "--index", work / "index",
        "--features", work / "features", "--prompts", prompts, "--out", out)
    from pipeline.store import ImageStore

    store = ImageStore(out)
    return {i: store.read(i) for i in store.ids()}


def _tiny_cams_project(root: Path, scheduler: str, prompt_seed: int) -> Path:
    from tests.tiny_params import use_tiny_clip

    params = use_tiny_clip(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["dataset"]["demo"] = {"n_train": 3, "n_val": 1, "seed": 0}
    params["compute"] = {"scheduler": scheduler, "device": "cpu"}
    params["clip_features"]["n_views"] = 1
    params["prompts"]["cls"].update(iterations=2, warmup_iterations=1, batch_size=3,
                                    checkpoint_every=2, seed=prompt_seed)
    path = root / f"params_{scheduler.split(':')[0]}_{prompt_seed}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.slow
def test_cams_on_long_lived_workers_use_the_retrained_prompts(tmp_path, external_scheduler):
    from distributed import Client

    work = tmp_path
    first = _tiny_cams_project(work, external_scheduler, prompt_seed=0)
    run("prepare", "--params", first, "--out", work / "index")
    run("clip-features", "--params", first, "--index", work / "index", "--out", work / "features")
    prompts, out = work / "prompts" / "cls.pt", work / "cams" / "cls.zarr"

    def train(params):
        run("train-prompts", "--which", "cls", "--params", params, "--index", work / "index",
            "--features", work / "features", "--out", prompts, "--metrics", work / "curve.csv")

    train(first)
    old = _cams(first, work, prompts, out)
    # retrained at the same path, as `dvc exp run -S prompts.cls.seed=1` does
    second = _tiny_cams_project(work, external_scheduler, prompt_seed=1)
    train(second)
    new = _cams(second, work, prompts, out)
    # dask workers run torch on one intra-op thread; so does the reference (same rounding)
    torch.set_num_threads(1)
    reference = _cams(_tiny_cams_project(work, "local", prompt_seed=1), work, prompts,
                      work / "cams" / "local.zarr")
    assert new.keys() == reference.keys() == old.keys()
    for image_id in reference:
        assert new[image_id].keys() == reference[image_id].keys()
        for name in reference[image_id]:
            np.testing.assert_array_equal(new[image_id][name], reference[image_id][name])
    changed = [np.abs(old[i]["cam"] - new[i]["cam"]).max() / np.abs(new[i]["cam"]).max() for i in new]
    assert min(changed) > 1e-3, changed  # the old prompts' CAMs are not the new ones
    with Client(external_scheduler) as client:  # and the workers keep no model between stages
        assert set(client.run(lambda: len(resources._RESOURCES)).values()) == {0}
