"""The `wsss` console script: fast listing, per-stage log files, one-line OS write errors, and a
stage that stops when its parent dies."""
import errno
import importlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages.cli import COMMANDS, main, stage_name

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys; from click.testing import CliRunner; from stages.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); print(r.output); "
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert "TORCH False" in out
    for name in COMMANDS:
        assert f"  {name} " in out


def test_listing_table_is_each_commands_own_short_help():
    for name, (module, help_) in COMMANDS.items():
        command = importlib.import_module(f"stages.{module}").command
        assert command.name == name
        assert command.get_short_help_str(limit=1000) == help_, name


def test_stage_names_follow_dvc():
    assert stage_name(["train-prompts", "--which", "cls", "--params", "p.yaml"]) == "train_prompts@cls"
    assert stage_name(["seeds", "--which=fine"]) == "seeds@fine"
    assert stage_name(["sam-masks"]) == "sam_masks"
    assert stage_name(["nope"]) is None


def _demo_params(tmp_path: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"]["demo"].update(n_train=2, n_val=1)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_a_stage_run_is_logged_to_its_file(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_LOG_DIR", str(tmp_path / "logs"))
    res = CliRunner().invoke(main, ["prepare", "--params", str(_demo_params(tmp_path)),
                                    "--out", str(tmp_path / "index")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "logs" / "prepare.log").read_text()
    assert "run: wsss prepare --params" in text and "split train: 2 images" in text


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_is_one_line_naming_the_path(tmp_path, monkeypatch, code):
    import pipeline.demo.dataset

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "index.partial" / "train.json"))

    monkeypatch.setattr(pipeline.demo.dataset, "generate_demo", full)
    res = CliRunner().invoke(main, ["prepare", "--params", str(_demo_params(tmp_path)),
                                    "--out", str(tmp_path / "index")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "train.json" in lines[0]
    assert os.strerror(code) in lines[0]


def _state(pid: int) -> str | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stage_stops_when_its_parent_is_killed():
    child = ("from stages.watch import die_with_parent; die_with_parent(0.2); "
             "import time; time.sleep(120)")
    parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "print(p.pid, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True)
    pid = int(proc.stdout.readline())
    time.sleep(1.5)  # the child is running and has armed its watch
    assert _state(pid) not in (None, "Z")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _state(pid) not in (None, "Z"):
        time.sleep(0.1)
    assert _state(pid) in (None, "Z"), "the orphaned stage kept running"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("under_dvc", [True, False])
def test_a_stage_behind_a_shell_stops_when_dvc_is_killed(under_dvc):
    """DVC runs a stage as ``$SHELL -c CMD``, /bin/sh when SHELL is unset; a shell that does not exec
    (dash, or any shell given two commands) outlives a killed DVC, and the stage's parent with it.
    Under DVC (DVC_STAGE set) the stage watches DVC itself; elsewhere (``nohup sh -c``) only its
    parent, so a detached run goes on."""
    if under_dvc and not hasattr(os, "pidfd_open"):
        pytest.skip("waking at DVC's death needs os.pidfd_open (Linux 5.3+, Python 3.9+)")
    # A 60 s poll: under DVC the stage must wake at DVC's death (a pidfd), not at its next poll.
    child = ("from stages.watch import die_with_parent; die_with_parent(60); "
             "import time; time.sleep(120)")
    shell_cmd = f"{sys.executable} -c {shlex.quote(child)}; true"  # '; true': no shell execs this
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    if under_dvc:
        env["DVC_STAGE"] = "sam_masks"
    parent = (f"import subprocess, time; p = subprocess.Popen(['/bin/sh', '-c', {shell_cmd!r}]); "
              "print(p.pid, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True, env=env)
    shell = int(proc.stdout.readline())
    deadline = time.time() + 10
    stage = None
    while time.time() < deadline and stage is None:
        kids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                and (Path("/proc") / p.name / "stat").exists()
                and _ppid(int(p.name)) == shell]
        stage = kids[0] if kids else None
        time.sleep(0.05)
    assert stage is not None, "the shell started no stage"
    time.sleep(1.5)  # the stage is running and has armed its watch
    assert _state(stage) not in (None, "Z")
    os.kill(proc.pid, signal.SIGKILL)  # dvc is killed; the shell in between lives on
    proc.wait()
    try:
        deadline = time.time() + 3
        while time.time() < deadline and _state(stage) not in (None, "Z"):
            time.sleep(0.1)
        if under_dvc:
            assert _state(stage) in (None, "Z"), "the stage behind the shell kept running after dvc died"
        else:
            assert _state(stage) not in (None, "Z"), "a stage run outside dvc stopped with its grandparent"
    finally:
        for pid in (stage, shell):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def test_a_full_disk_stops_the_stage_in_one_line_and_the_rerun_cleans_up(tmp_path):
    """A real write failure (the file-size limit stands in for a full disk), then a rerun."""
    import resource

    params = _demo_params(tmp_path)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, like ENOSPC

    cmd = [str(Path(sys.executable).parent / "wsss"), "prepare", "--params", str(params),
           "--out", str(tmp_path / "index")]
    env = {**os.environ, "WSSS_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_files, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("demo ", "index "))]
    assert len(lines) == 1 and "cannot write" in lines[0] and "File too large" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "index").exists()  # nothing half-written where readers look
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "index" / "train.json").is_file()
    assert not (tmp_path / "index.partial").exists()
