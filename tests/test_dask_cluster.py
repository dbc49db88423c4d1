"""A per-image stage on a real dask cluster (``dask scheduler`` + ``dask worker`` processes, as
users start them) whose workers run in another directory than the project: the tasks get
absolute paths (``stages.execution.worker_path``), so the store is the serial run's, byte for byte."""
import filecmp
import os
import signal
import socket
import subprocess
import time

import pytest
import yaml
from dvc_project import dvc_env, make_project, sh, tree_files

pytestmark = pytest.mark.slow

SMALL = {
    "dataset": {"demo": {"n_train": 4, "n_val": 2, "seed": 0}},
    "compute": {"scheduler": "local", "device": "cpu"},
    "sam": {"points_per_side": 8, "points_per_batch": 64, "crop_n_layers": 0},
}


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sam_masks_on_a_scheduler_with_workers_elsewhere_match_the_serial_run(tmp_path):
    env = dvc_env(tmp_path / "home")
    repo = tmp_path / "repo"
    make_project(repo, env, SMALL, stages=("prepare", "sam_masks"))
    sh("dvc", "repro", cwd=repo, env=env)
    elsewhere = tmp_path / "workers"
    elsewhere.mkdir()
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], cwd=elsewhere, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 120
        while not _listening(port):
            assert time.time() < deadline and procs[0].poll() is None, "dask scheduler did not start"
            time.sleep(0.5)
        procs.append(subprocess.Popen(["dask", "worker", address, "--nthreads", "1", "--no-dashboard",
                                       "--local-directory", str(elsewhere / "w")], cwd=elsewhere,
                                      env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["compute"]["scheduler"] = address
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        out = tmp_path / "cluster.zarr"
        log = sh("wsss", "sam-masks", "--params", tmp_path / "params.yaml", "--index", "cache/index",
                 "--out", out, cwd=repo, env=env)
        assert "6 images computed" in log, log
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    assert not list(elsewhere.rglob("*.zip")), "a worker wrote into its own directory"
    serial = repo / "cache" / "sam_masks.zarr"
    files = tree_files(serial)
    assert len([f for f in files if f.endswith(".zip")]) == 6 and files == tree_files(out)
    _, mismatch, errors = filecmp.cmpfiles(serial, out, files, shallow=False)
    assert mismatch == [] and errors == []
