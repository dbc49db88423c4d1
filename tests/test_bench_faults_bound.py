"""benchmarks/faults.py's bound after a kill: the store holds the entries complete at the kill
plus at most those in flight, and nothing more after a wait (synthetic listings); the images in
flight for the projects' scheduler; the stopped-process test it lists the store after."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import faults  # noqa: E402

AT_KILL = {f"demo_{i:04d}.zip" for i in range(5)}


def test_entries_complete_at_the_kill_plus_those_in_flight_hold():
    one_more = AT_KILL | {"demo_0005.zip"}
    assert faults.orphan_writes(AT_KILL, AT_KILL, AT_KILL, in_flight=1) == []
    assert faults.orphan_writes(AT_KILL, one_more, one_more, in_flight=1) == []
    assert faults.orphan_writes(AT_KILL, AT_KILL, AT_KILL, in_flight=0) == []


def test_one_entry_more_than_in_flight_fails():
    two_more = AT_KILL | {"demo_0005.zip", "demo_0006.zip"}
    problems = faults.orphan_writes(AT_KILL, two_more, two_more, in_flight=1)
    assert problems == [("2 entries appeared after the kill, more than the 1 in flight "
                         "(e.g. ['demo_0005.zip', 'demo_0006.zip'])")]
    assert faults.orphan_writes(AT_KILL, AT_KILL | {"x"}, AT_KILL | {"x"}, in_flight=0) != []


def test_entries_written_after_the_wait_fail():
    one_more = AT_KILL | {"demo_0005.zip"}
    problems = faults.orphan_writes(AT_KILL, one_more, one_more | {"demo_0006.zip"}, in_flight=1)
    assert problems == [(f"the listing changed {faults.SETTLE_S:.0f} s after the processes were gone: "
                         "1 new, 0 gone")]
    # the same count, another name: still a write after the wait
    assert faults.orphan_writes(AT_KILL, one_more, AT_KILL | {"demo_0006.zip"}, in_flight=1) != []


def test_an_entry_complete_at_the_kill_that_goes_missing_fails():
    # one gone and one new: the count is within the bound, the listing is not
    swapped = (AT_KILL - {"demo_0000.zip"}) | {"demo_0005.zip"}
    problems = faults.orphan_writes(AT_KILL, swapped, swapped, in_flight=1)
    assert problems == ["1 entries complete at the kill are gone (e.g. ['demo_0000.zip'])"]


def test_in_flight_is_one_image_on_the_local_scheduler(tmp_path):
    (tmp_path / "params.yaml").write_text("compute:\n  scheduler: local\n")
    assert faults.in_flight_tasks(tmp_path) == faults.IN_FLIGHT_LOCAL == 1
    (tmp_path / "params.yaml").write_text("compute:\n  scheduler: local-cluster\n")
    with pytest.raises(SystemExit, match="local scheduler only"):
        faults.in_flight_tasks(tmp_path)


def test_stopped_sees_sigstop_and_a_gone_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        assert not faults.stopped(proc.pid)
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.time() + 5
        while not faults.stopped(proc.pid) and time.time() < deadline:
            time.sleep(0.01)
        assert faults.stopped(proc.pid)
        os.kill(proc.pid, signal.SIGCONT)
        deadline = time.time() + 5
        while faults.stopped(proc.pid) and time.time() < deadline:
            time.sleep(0.01)
        assert not faults.stopped(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert faults.stopped(proc.pid)
