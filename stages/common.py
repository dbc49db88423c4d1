"""What every stage shares: params loading, typed sections, errors, per-image execution.

Per-image stages call :func:`run_per_image` with a task function and a :class:`WorkerResource`
(the model). With ``compute.scheduler: local`` the tasks run in this process under a tqdm bar; with
``local-cluster`` a dask LocalCluster of ``compute.workers`` processes is started; with a scheduler
address (``tcp://host:8786``) the tasks go to that existing dask cluster. In every case each
process builds the resource once and reuses it for all of its tasks, and tasks write their own
results (atomically), so the artifacts do not depend on where a task ran.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import click
import yaml
from tqdm.auto import tqdm

from pipeline.config import ConfigError, from_mapping, param, to_dict

T = TypeVar("T")
log = logging.getLogger("wsss")

PARAMS_OPTION = click.option(
    "--params", "params_path", default="params.yaml", show_default=True,
    type=click.Path(dir_okay=False), help="Parameter file (DVC's params.yaml).",
)

INDEX_OPTION = click.option(
    "--index", "index_dir", default="cache/index", show_default=True,
    type=click.Path(file_okay=False), help="Dataset index written by `wsss prepare`.",
)


SECTIONS = ("dataset", "compute", "sam", "clip", "clip_features", "prompts", "cams", "seeds",
            "segmenter", "predict")
"""The top-level sections of params.yaml; anything else is a typo and stops every stage."""


class StageError(click.ClickException):
    """A user-facing failure: one clear line, non-zero exit."""

    def format_message(self) -> str:
        return self.message


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"parameter file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StageError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(params, dict):
        raise StageError(f"{path} must hold a mapping of sections")
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise StageError(f"{path}: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    return params


def section(params: Mapping[str, Any], key: str, cls: type[T]) -> T:
    """The typed config of dotted section ``key`` (e.g. ``seeds.fine``); errors name the key."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise StageError(f"missing parameter section {key!r} in params.yaml")
        node = node[part]
    try:
        return from_mapping(cls, node, key)
    except ConfigError as exc:
        raise StageError(f"params.yaml: {exc}") from exc


@dataclass(frozen=True)
class ComputeConfig:
    scheduler: str = "local"
    """``local`` (this process), ``local-cluster`` (dask LocalCluster), or a scheduler address."""
    workers: int = param(2, ge=1)
    """Worker processes for ``local-cluster``."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""
    precision: str = "fp32"
    """``fp32`` (reference) or ``bf16`` (autocast of the network forward passes; meant for CUDA).
    Unlike the rest of ``compute``, it changes results, so it is a DVC param of the stages that
    run networks and part of their fingerprints."""

    def __post_init__(self):
        from pipeline.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise StageError(f"params.yaml: compute.precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")


def torch_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StageError(f"compute.device is {name!r} but no CUDA device is available")
    return dev


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (configs, checksums, versions)."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text artifact (metrics JSON, curve CSV) via a temporary file and a rename."""
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def code_digest(*modules: str) -> str:
    """SHA-256 (16 hex) of the source of the named modules.

    Part of a resumable store's fingerprint: when the code that computes an artifact changes, DVC
    reruns the stage, and without this the store would "resume" and keep stale images.
    """
    import importlib.util

    digest = hashlib.sha256()
    for name in modules:
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.hexdigest()[:16]


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("wsss-pipeline")
    except Exception:  # running from a source tree that is not installed
        return "0+source"


# -- per-image execution ------------------------------------------------------------------------

_RESOURCES: dict[Any, Any] = {}
_RESOURCE_LOCK = threading.Lock()


@dataclass(frozen=True)
class WorkerResource:
    """An expensive object (a model) that each process builds once and reuses.

    ``factory`` must be a module-level function and ``kwargs`` plain data, so the resource can
    travel to dask workers; the built object is cached per process, keyed by both.
    """

    factory: Callable[..., Any]
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, factory: Callable[..., Any], **kwargs: Any) -> "WorkerResource":
        return cls(factory, tuple(sorted(kwargs.items())))

    def get(self) -> Any:
        key = (self.factory.__module__, self.factory.__qualname__, _freeze(self.kwargs))
        with _RESOURCE_LOCK:
            if key not in _RESOURCES:
                _RESOURCES[key] = self.factory(**dict(self.kwargs))
            return _RESOURCES[key]


def _freeze(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(v) for v in obj)
    if isinstance(obj, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in obj.items()))
    return obj


def _run_task(task: Callable[[Any, Any], Any], resource: WorkerResource | None, item: Any) -> Any:
    return task(resource.get() if resource is not None else None, item)


def run_per_image(
    task: Callable[[Any, Any], Any],
    items: Iterable[Any],
    compute: ComputeConfig,
    resource: WorkerResource | None = None,
    desc: str = "images",
) -> list[Any]:
    """Run ``task(resource_object, item)`` for every item; returns the results in item order.

    Tasks must be idempotent and write their own artifacts atomically. An exception in a task
    stops the stage with that exception (the artifacts written so far stay, complete).
    """
    items = list(items)
    if not items:
        return []
    if compute.scheduler == "local":
        obj = resource.get() if resource is not None else None
        # A context manager closes the bar when a task fails, so the error gets its own line.
        with tqdm(items, desc=desc, unit="img", dynamic_ncols=True) as bar:
            return [task(obj, item) for item in bar]
    return _run_dask(task, items, compute, resource, desc)


def _run_dask(task, items, compute: ComputeConfig, resource, desc) -> list[Any]:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if compute.scheduler == "local-cluster":
        cluster = LocalCluster(
            n_workers=compute.workers, threads_per_worker=1, processes=True,
            dashboard_address=None, silence_logs=logging.ERROR,
        )
        client = Client(cluster)
    else:
        try:
            client = Client(compute.scheduler, timeout="30s")
        except OSError as exc:
            raise StageError(f"cannot reach dask scheduler {compute.scheduler!r}: {exc}") from exc
    try:
        futures = [
            client.submit(_run_task, task, resource, item, pure=False, retries=0) for item in items
        ]
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(items)
        with tqdm(total=len(items), desc=desc, unit="img", dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                results[index[future.key]] = future.result()
                bar.update(1)
        return results
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class _OpenClipNoise(logging.Filter):
    """open_clip reports through the root logger, and warns "No pretrained weights loaded" for
    every random tiny model: our stores and metrics say ``untrained`` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and "open_clip" in record.pathname
                    and record.levelno < logging.ERROR)


def configure_logging(verbose: bool = False) -> None:
    """Our own INFO messages on stderr; libraries (open_clip's model-config chatter, dask, ...)
    only from WARNING up unless ``verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, _OpenClipNoise) for f in handler.filters):
                handler.addFilter(_OpenClipNoise())
    # torch's LR-scheduler order warning is about its own bookkeeping, not the user's run.
    import warnings

    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")


def log_to_file(log_dir: str | os.PathLike, stage: str, argv: list[str]) -> Path:
    """Also append this run's ``wsss`` log records to ``<log_dir>/<stage>.log`` (with times)."""
    path = Path(log_dir) / f"{stage}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:  # a read-only checkout still runs; it just keeps no log file
        log.warning("cannot write the log file %s: %s", path, exc.strerror or exc)
        return path
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    # One run per process normally; in-process callers (tests, notebooks) replace the last one.
    for old in [h for h in log.handlers if getattr(h, "_wsss_stage_log", False)]:
        log.removeHandler(old)
        old.close()
    handler._wsss_stage_log = True
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    log.info("run: %s (pid %d)", " ".join(argv), os.getpid())
    return path


_WATCHING_PARENT = False


def die_with_parent(poll_seconds: float = 1.0) -> None:
    """End this process (SIGTERM, which exits through Python's cleanup) when its parent dies.

    ``dvc repro`` runs each stage as a child; if DVC is SIGKILLed, an orphaned stage would go on
    computing into the same store as the rerun. Linux delivers the signal at the parent's death
    (prctl PR_SET_PDEATHSIG); a watchdog thread that notices the re-parenting covers other systems.
    """
    import signal

    global _WATCHING_PARENT
    if _WATCHING_PARENT:
        return
    _WATCHING_PARENT = True
    parent = os.getppid()

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

    def _watch():
        import time

        while True:
            if os.getppid() != parent:
                log.error("the parent process (pid %d) is gone: stopping", parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(poll_seconds)

    threading.Thread(target=_watch, name="die-with-parent", daemon=True).start()
