"""What the benchmarks share: paths, device sync, peak memory, interleaved timing, ``RATIO``
lines, and the git + DVC project set-up that the end-to-end tests use.

A benchmark script imports it first (its own folder, benchmarks/, is on ``sys.path`` when it runs
as ``python benchmarks/<name>.py``)::

    from harness import REPO, print_ratio, time_interleaved

Importing it puts ``REPO`` (this checkout: ``pipeline``, ``stages``, ``tests.*``) and ``TESTS``
(``dvc_project``, ``real_checkpoints``, ...) at the front of ``sys.path`` where they are missing:
:func:`add_repo_paths`. It imports nothing heavy (no torch, no numpy), so a script may still set
thread variables before it imports them; the torch calls are made lazily, on a CUDA device only.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
TESTS = REPO / "tests"


def add_repo_paths() -> None:
    """Put ``REPO`` and ``TESTS`` at the front of ``sys.path`` (each only where it is missing, so
    an order set by pytest or a caller is kept). Called once at import."""
    missing = [str(p) for p in (REPO, TESTS) if str(p) not in sys.path]
    sys.path[:0] = missing


add_repo_paths()

# The git + DVC project set-up the end-to-end tests use (tests/dvc_project.py), for the
# benchmarks that run the graph under DVC. After add_repo_paths: tests/ is on sys.path.
from dvc_project import dvc_env, make_project, ran_stages, sh  # noqa: E402,F401  (re-exported)


# -- device sync ----------------------------------------------------------------------------------

def _is_cuda(device) -> bool:
    kind = device if isinstance(device, str) else getattr(device, "type", "")
    return kind.split(":")[0] == "cuda"


def sync(device) -> None:
    """Wait for the work queued on ``device`` (a ``torch.device`` or its name):
    ``torch.cuda.synchronize`` on a CUDA device, nothing otherwise. As the ``sync`` of
    :func:`time_interleaved`: ``sync=lambda: sync(device)``."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


# -- peak memory ----------------------------------------------------------------------------------

def peak_rss_mib(usage: resource.struct_rusage | None = None) -> float:
    """Peak resident set size in MiB: ``ru_maxrss`` of ``usage`` (e.g. ``os.wait4``'s, for a child
    and its waited-for descendants), by default of this process. It cannot be reset; for a peak
    since a point in time see :class:`PeakMemory`."""
    if usage is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
    kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss  # macOS: bytes
    return kib / 1024


def status_kib(field: str) -> int:
    """A memory field of ``/proc/self/status`` in KiB (Linux): ``VmRSS`` now, ``VmHWM`` its peak
    since start or since :func:`reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux,
    ``/proc/self/clear_refs`` 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def reset_cuda_peak(device) -> None:
    """Restart the CUDA peak of allocated tensor memory on ``device`` (after its queued work);
    nothing on another device."""
    if _is_cuda(device):
        import torch

        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_gib(device) -> float:
    """GiB: the peak of ``torch.cuda.max_memory_allocated`` on ``device`` since the start or
    :func:`reset_cuda_peak`."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30


class PeakMemory:
    """Peak RSS (CPU) or peak allocated tensor memory (CUDA) from ``reset()`` to ``read()``.

    ``kind`` after ``reset()``: ``CUDA``, ``RSS``, or ``RSS*`` where the RSS peak cannot be reset
    (then ``read()`` gives the process's lifetime peak)."""

    def __init__(self, device):
        self.device = device
        self.kind = ""

    def reset(self) -> None:
        if _is_cuda(self.device):
            reset_cuda_peak(self.device)
            self.kind = "CUDA"
        else:
            self.kind = "RSS" if reset_peak_rss() else "RSS*"

    def read(self) -> float:
        """GiB."""
        if _is_cuda(self.device):
            return cuda_peak_gib(self.device)
        try:
            return status_kib("VmHWM") / 2**20
        except (OSError, RuntimeError):
            return peak_rss_mib() / 1024


# -- timing ---------------------------------------------------------------------------------------

def interleaved_times(fns, steps: int, warmup: int = 1, sync=lambda: None) -> list[list[float]]:
    """Seconds of every timed call of each fn: ``warmup`` untimed rounds, then ``steps`` rounds
    of one call of each fn in turn, so that load changes on a shared machine hit every variant
    alike. ``sync`` waits for the device before and after each timed call."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - start)
    return times


def time_interleaved(fns, steps: int, warmup: int = 1, sync=lambda: None) -> list[float]:
    """Median seconds per call of each fn, calls interleaved (:func:`interleaved_times`).
    ``sync`` waits for the device (e.g. ``lambda: sync(device)``)."""
    return [statistics.median(t) for t in interleaved_times(fns, steps, warmup, sync)]


# -- RATIO lines ----------------------------------------------------------------------------------

def ratio_line(name: str, value: float, digits: int = 2) -> str:
    """``RATIO <name>=<value>``, the value with ``digits`` decimals: the line each benchmark
    prints last (README/docs figures and tests parse it)."""
    return f"RATIO {name}={value:.{digits}f}"


def print_ratio(name: str, value: float, digits: int = 2) -> None:
    print(ratio_line(name, value, digits))
