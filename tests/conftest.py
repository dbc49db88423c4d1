import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def golden_files(kind: str) -> list[Path]:
    """Every conformance vector of ``kind`` (an empty directory is an error, not a pass)."""
    files = sorted(GOLDEN_DIR.glob(f"{kind}_[0-9]*.npz"))
    if not files:
        raise FileNotFoundError(f"no {kind}_*.npz golden vectors in {GOLDEN_DIR} (set GOLDEN_DIR)")
    return files


def golden_params(kind: str):
    return [pytest.param(p, id=p.stem) for p in golden_files(kind)]


@pytest.fixture(scope="session", autouse=True)
def stage_logs_in_scratch(tmp_path_factory):
    """In-process CLI runs log to pytest's scratch folder, not the checkout's cache/logs (DVC
    projects built by tests/dvc_project.py drop the variable: their stages log into the project)."""
    if "WSSS_LOG_DIR" not in os.environ:
        os.environ["WSSS_LOG_DIR"] = str(tmp_path_factory.mktemp("stage-logs"))


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """A test that runs a stage in-process may set torch's thread count (``wsss demo-models
    --threads 1``); the next test gets the count this one started with. Some CPU kernels round
    by thread count (tests/test_point_decoder.py compares bits with stock). Test modules import
    torch at collection, so it is normally there before the first test."""
    import sys

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def kill_prompt_training_at(monkeypatch, iteration: int):
    """Make ``train-prompts`` raise ``RuntimeError("killed")`` when it asks for the batch of
    ``iteration`` (a run killed there); returns a function that undoes the patch."""
    from pipeline.prompts.batches import BatchSource

    original = BatchSource.batch

    def dies(self, it):
        if it == iteration:
            raise RuntimeError("killed")
        return original(self, it)

    monkeypatch.setattr(BatchSource, "batch", dies)
    return lambda: monkeypatch.setattr(BatchSource, "batch", original)


class _CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a shared file could
    run (issue 24)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_code_pickle(path, marker, **plain):
    """A torch file at ``path`` holding ``plain`` and an object whose unpickling creates
    ``marker``: a loader that runs code from shared files leaves the marker behind."""
    import torch

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({**plain, "payload": _CreatesFile(marker)}, path)


@pytest.fixture()
def one_torch_thread():
    """Torch on one intra-op thread for the test (two shared CPU cores: more threads only add
    contention for tiny tensors); the count is restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
