"""A result computed for a store's old fingerprint is never kept: a dask task cannot be cancelled
once it runs, so a task of an earlier run (its stage killed, its params since changed) may finish
after the store was reset for new parameters. Each image records the store fingerprint its task
computed for; the write refuses a result for another fingerprint, ``ImageStore.todo`` recomputes
an image that records one, and ``stages.execution.fill_store`` recomputes what a late task
replaced while a run went on."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from pipeline.params import ComputeConfig
from pipeline.store import FINGERPRINT_KEY, ImageStore, StaleResultError, finish, write_group
from stages.execution import fill_store

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker runs this file's task


def _late_task(store: str, started: str, go: str, fingerprint: str) -> str:
    """A task of run A: computes (waits for ``go``), then writes its image for fingerprint A."""
    Path(started).touch()
    deadline = time.time() + 60
    while not Path(go).exists():
        assert time.time() < deadline, "never released"
        time.sleep(0.02)
    write_group(store, "x", {"value": np.arange(3)}, {"inputs": "in-x"}, fingerprint=fingerprint)
    return "written"


def test_a_task_started_before_a_reset_writes_nothing_after_it(tmp_path):
    from distributed import Client, LocalCluster

    path = tmp_path / "store.zarr"
    ImageStore.open_for_writing(path, {"fingerprint": "A"})
    started, go = tmp_path / "started", tmp_path / "go"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        future = client.submit(_late_task, str(path), str(started), str(go), "A", pure=False)
        deadline = time.time() + 60
        while not started.exists():
            assert time.time() < deadline and future.status == "pending", future.status
            time.sleep(0.05)
        # The next run: new parameters reset the store while run A's task still computes.
        store = ImageStore.open_for_writing(path, {"fingerprint": "B"})
        go.touch()
        with pytest.raises(StaleResultError, match="computed for store fingerprint A"):
            future.result(timeout=60)
    assert "x" not in store and store.ids() == []
    assert not list(path.parent.glob("store.zarr.partial/*.zip"))
    # The same task for the current fingerprint is written and kept.
    go.touch()
    assert _late_task(str(path), str(started), str(go), "B") == "written"
    assert store.record("x").fingerprint == "B" and store.todo({"x": "in-x"}) == []
    finish(path)


def test_an_image_recording_another_fingerprint_is_recomputed(tmp_path):
    path = tmp_path / "store.zarr"
    store = ImageStore.open_for_writing(path, {"fingerprint": "B"})
    # What a late rename that raced the reset leaves: an image computed for fingerprint A.
    write_group(path, "x", {"value": np.arange(3)}, {"inputs": "in-x", FINGERPRINT_KEY: "A"})
    # An image written before images recorded their fingerprint.
    write_group(path, "y", {"value": np.arange(3)}, {"inputs": "in-y"})
    write_group(path, "z", {"value": np.arange(3)}, {"inputs": "in-z"}, fingerprint="B")
    assert store.todo({"x": "in-x", "y": "in-y", "z": "in-z"}) == ["x", "y"]
    assert store.todo({"z": "other inputs"}) == ["z"]
    finish(path)


def test_fill_store_recomputes_what_a_late_task_replaced_during_the_run(tmp_path, caplog):
    path = tmp_path / "store.zarr"
    store = ImageStore.open_for_writing(path, {"fingerprint": "B"})
    inputs = {i: f"in-{i}" for i in ("a", "b", "c")}
    calls = []

    def task(_, image_id):
        calls.append(image_id)
        write_group(path, image_id, {"value": np.arange(3)}, {"inputs": inputs[image_id]},
                    fingerprint="B")
        if image_id == "c" and calls.count("c") == 1:
            # Meanwhile a task of an earlier run (fingerprint A) lands on "a", already done.
            write_group(path, "a", {"value": -np.arange(3)},
                        {"inputs": inputs["a"], FINGERPRINT_KEY: "A"})
        return image_id

    with caplog.at_level(logging.WARNING, logger="wsss"):
        computed = fill_store(task, lambda: store.todo(inputs), ComputeConfig(), desc="test")
    assert computed == 3 and calls == ["a", "b", "c", "a"]
    assert "1 images were replaced by results of an earlier run" in caplog.text
    assert store.todo(inputs) == []
    assert store.read("a")["value"].tolist() == [0, 1, 2]
    finish(path)


def test_fill_store_stops_when_images_keep_being_replaced(tmp_path):
    from pipeline.errors import PipelineError

    path = tmp_path / "store.zarr"
    store = ImageStore.open_for_writing(path, {"fingerprint": "B"})

    def task(_, image_id):  # every write is another run's
        write_group(path, image_id, {"value": np.arange(3)}, {"inputs": "in", FINGERPRINT_KEY: "A"})

    with pytest.raises(PipelineError, match="keep being replaced"):
        fill_store(task, lambda: store.todo({"a": "in"}), ComputeConfig(), desc="test")
    finish(path)
