"""The per-process model cache of the per-image stages: :class:`WorkerResource`.

Each process (this one, or each dask worker) builds a stage's model once, keyed by the factory,
its kwargs and the content of the files it loads, reuses it for all of its tasks and drops it
when the stage ends (:func:`release_resources`), so a long-lived worker neither serves a stale
model nor keeps SAM, CLIP and the segmenter resident between stages.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from pipeline.device import DeviceError, torch_device
from pipeline.errors import PipelineError
from pipeline.params import ComputeConfig


class ResourceError(PipelineError):
    """A worker cannot build its model: a file changed under the stage, or its device is unusable."""


_RESOURCES: dict[Any, tuple[Any, threading.Lock]] = {}
_RESOURCE_LOCK = threading.Lock()
_CHECKED_DEVICES: dict[str, Any] = {}


@dataclass(frozen=True)
class WorkerResource:
    """An expensive object (a model) that each process builds once and reuses.

    ``factory`` must be a module-level function and ``kwargs`` plain data, so the resource can
    travel to dask workers. The built object is cached per process, keyed by the factory, its
    kwargs and ``digests``: the SHA-256 of every file the factory loads (the kwargs named in
    ``files``), computed once by :meth:`of` in the stage's process. A long-lived worker thus
    rebuilds the model when a file was replaced at the same path (retrained prompts or segmenter),
    and one that sees other bytes at the path than the stage did refuses to build.

    ``thread_safe=False`` (the default) serialises the tasks of one process on the resource: a
    dask worker with several threads runs one task at a time on it (SAM's predictor and the world
    oracle keep per-image state between ``set_image`` and ``reset_image``). Only a resource whose
    object is never mutated by a task (a forward pass under ``no_grad``, read-only stores) says
    ``thread_safe=True``.

    A kwarg named ``device`` is the torch device the factory puts the model on; it is checked in
    the process that builds the resource (on a dask worker, not on the machine that runs DVC).
    """

    factory: Callable[..., Any]
    kwargs: tuple[tuple[str, Any], ...] = ()
    digests: tuple[tuple[str, str | None], ...] = ()
    thread_safe: bool = False

    @classmethod
    def of(cls, factory: Callable[..., Any], *, files: Iterable[str] = (), thread_safe: bool = False,
           **kwargs: Any) -> "WorkerResource":
        """``files``: the kwargs that hold file paths (``"sam.checkpoint"`` reaches into a dict
        kwarg); ``None`` or a missing file gets the digest ``None`` (the factory reports it)."""
        digests = tuple(sorted((name, _file_digest(_lookup(kwargs, name))) for name in files))
        return cls(factory, tuple(sorted(kwargs.items())), digests, thread_safe)

    def key(self) -> tuple:
        return (self.factory.__module__, self.factory.__qualname__, _freeze(self.kwargs), self.digests)

    def acquire(self) -> tuple[Any, threading.Lock]:
        """The process's object (built on first use) and the lock its tasks hold when not
        ``thread_safe``.

        A file the factory loads through :func:`pipeline.weights.read_checkpoint` is checked on the
        bytes it loads (read and hashed once here, none loaded unverified); any other file of
        ``files`` is hashed (once per process and file version) after the build, and before the
        factory's own error when it fails."""
        key = self.key()
        with _RESOURCE_LOCK:
            if key not in _RESOURCES:
                kwargs = dict(self.kwargs)
                if "device" in kwargs:
                    check_device(kwargs["device"])
                from pipeline.weights import expected_files

                paths = {name: _lookup(kwargs, name) for name, _ in self.digests}
                expected = {str(paths[name]): digest for name, digest in self.digests if paths[name] is not None}
                with expected_files(expected, _changed) as checked:
                    try:
                        built = self.factory(**kwargs)
                    except ResourceError:
                        raise
                    except PipelineError:
                        self._check_files(paths, checked)  # a replaced file explains the failure
                        raise
                self._check_files(paths, checked)
                _RESOURCES[key] = (built, threading.Lock())
            return _RESOURCES[key]

    def _check_files(self, paths: Mapping[str, Any], checked: set[str]) -> None:
        for name, expected in self.digests:
            path = paths[name]
            if path is None or str(path) not in checked:
                actual = _file_digest(path)
                if actual != expected:
                    raise _changed(path, actual, expected)

    def get(self) -> Any:
        return self.acquire()[0]


def _lookup(kwargs: Mapping[str, Any], dotted: str) -> Any:
    node: Any = kwargs
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _file_digest(path: Any) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    from pipeline.weights import sha256sum

    return sha256sum(path)


def _changed(path: Any, actual: str | None, expected: str | None) -> ResourceError:
    return ResourceError(
        f"{path}{_where()} is not the file the stage started with (SHA-256 {_short(actual)}, "
        f"expected {_short(expected)}): replaced while the stage ran, or another file at that path "
        "where this process runs")


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "none (no file)"


def _freeze(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(v) for v in obj)
    if isinstance(obj, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in obj.items()))
    return obj


def _where() -> str:
    """`` on dask worker <address>`` inside a dask worker, else empty."""
    try:
        from distributed import get_worker

        return f" on dask worker {get_worker().address}"
    except (ImportError, ValueError):
        return ""


def check_device(name: str):
    """:func:`torch_device` of this process, checked once; errors say which dask worker."""
    if name not in _CHECKED_DEVICES:
        try:
            _CHECKED_DEVICES[name] = torch_device(name)
        except DeviceError as exc:
            raise DeviceError(f"{exc}{_where()}") from None
    return _CHECKED_DEVICES[name]


def check_stage_device(compute: ComputeConfig) -> None:
    """Fail early on an unusable ``compute.device`` where the models will run: in this process
    for ``local``; otherwise each worker checks it before building its model (the machine that runs
    DVC, a SLURM login node say, need not have a GPU)."""
    if compute.scheduler == "local":
        torch_device(compute.device, compute.precision)


def release_resources() -> None:
    """Drop this process's cached models (and CUDA's cached blocks): run at the end of a stage, on
    every worker of the cluster, so a long-lived worker does not keep SAM, CLIP and the segmenter
    resident between stages."""
    import gc

    with _RESOURCE_LOCK:
        _RESOURCES.clear()
        _CHECKED_DEVICES.clear()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
