"""The parent-death watch: a stage ends when the ``dvc repro`` (or shell) that started it dies.

``dvc repro`` runs each stage as a child; if DVC is SIGKILLed, an orphaned stage would go on
computing into the same store as the rerun. :func:`die_with_parent` makes the stage follow its
parent (and, under DVC, DVC itself through the ``sh -c`` that DVC may put in between).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("wsss")


_WATCHING_PARENT = False


_SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "ash", "fish"}


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process from /proc, None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ..., starttime (field 22 of stat)
    return None if fields[0] in "ZX" else (int(fields[1]), fields[19])


def _is_shell_wrapper(pid: int) -> bool:
    """Whether ``pid`` is a shell running one command line (``sh -c CMD``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return os.path.basename(argv[0].decode(errors="replace")) in _SHELLS and b"-c" in argv[1:]


def _dvc_ancestors(parent: int) -> list[tuple[int, str]]:
    """Under ``dvc repro`` (which sets DVC_STAGE), the shells between this process and DVC and DVC
    itself, as (pid, start time). DVC runs a stage as ``$SHELL -c CMD`` (``/bin/sh`` when SHELL is
    unset, as under cron, SLURM batch scripts and many containers); dash does not exec the command,
    so the stage's parent is a shell that outlives a killed DVC. Linux only (reads /proc)."""
    if "DVC_STAGE" not in os.environ or not Path("/proc/self/stat").exists():
        return []
    chain, pid = [], parent
    for _ in range(8):
        if not _is_shell_wrapper(pid):
            break
        stat = _proc_stat(pid)
        if stat is None or stat[0] <= 1:
            break
        pid = stat[0]
        above = _proc_stat(pid)
        if above is None:
            break
        chain.append((pid, above[1]))
    return chain


def die_with_parent(poll_seconds: float = 0.5) -> None:
    """End this process (SIGTERM, which exits through Python's cleanup) when its parent dies.

    ``dvc repro`` runs each stage as a child; if DVC is SIGKILLed, an orphaned stage would go on
    computing into the same store as the rerun. Linux delivers the signal at the parent's death
    (prctl PR_SET_PDEATHSIG); a watchdog thread that notices the re-parenting covers other systems,
    and under DVC it also watches DVC itself through the ``sh -c`` that DVC may put in between.
    """
    import signal

    global _WATCHING_PARENT
    if _WATCHING_PARENT:
        return
    _WATCHING_PARENT = True
    parent = os.getppid()
    ancestors = _dvc_ancestors(parent)

    def _terminate(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def _gone() -> int | None:
        if os.getppid() != parent:
            return parent
        for pid, started in ancestors:
            stat = _proc_stat(pid)
            if stat is None or stat[1] != started:  # gone, or its pid taken by another process
                return pid
        return None

    # A pidfd (Linux 5.3+) turns readable the moment its process exits: the watch then wakes at
    # DVC's death instead of at its next poll, so a fast stage does not write on as an orphan.
    pidfds = []
    for pid, _ in ancestors:
        try:
            pidfds.append(os.pidfd_open(pid))
        except (AttributeError, OSError):
            pass

    def _watch():
        import select
        import time

        while True:
            gone = _gone()
            if gone is not None:
                log.error("the %s (pid %d) is gone: stopping",
                          "parent process" if gone == parent else "dvc process that runs this stage", gone)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if not pidfds:
                time.sleep(poll_seconds)
            elif select.select(pidfds, [], [], poll_seconds)[0]:
                time.sleep(0.01)  # it exited: /proc shows it as a zombie, or not at all, on the next look

    threading.Thread(target=_watch, name="die-with-parent", daemon=True).start()
