"""What every stage shares: params loading, typed sections, errors, per-image execution.

Per-image stages call :func:`run_per_image` with a task function and a :class:`WorkerResource`
(the model). With ``compute.scheduler: local`` the tasks run in this process under a tqdm bar; with
``local-cluster`` a dask LocalCluster of ``compute.workers`` processes is started; with a scheduler
address (``tcp://host:8786``) the tasks go to that existing dask cluster. In every case each
process builds the resource once (keyed by the content of the files it loads) and reuses it for
all of its tasks, one task at a time unless the resource is thread-safe, and drops it when the
stage ends; tasks write their own results (atomically), so the artifacts do not depend on where a
task ran.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
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
    workers: int | None = param(None, ge=1)
    """Worker processes for ``local-cluster``; None: one per visible GPU when ``device`` is CUDA,
    else 2."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""
    precision: str = "fp32"
    """``fp32`` (reference) or ``bf16`` (autocast of the network forward passes and of prompt
    training; meant for CUDA, refused on a CUDA device without bfloat16 support; no GradScaler).
    The reference's fp16 AMP of prompt training is ``prompts.<which>.amp`` (with fp32 here).
    Unlike the rest of ``compute``, it changes results, so it is a DVC param of the stages that
    run networks and part of their fingerprints."""

    def __post_init__(self):
        from pipeline.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise StageError(f"params.yaml: compute.precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")


def torch_device(name: str, precision: str | None = None):
    """``compute.device`` as a torch device; with ``precision`` (``compute.precision``), bf16 on a
    CUDA device without bfloat16 support is refused here, in one line."""
    import torch

    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise StageError(f"compute.device is {name!r} but no CUDA device is available")
    if precision is not None:
        from pipeline.precision import check_bf16

        try:
            check_bf16(dev, precision)
        except ValueError as exc:
            raise StageError(str(exc)) from None
    return dev


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (configs, checksums, versions)."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def worker_path(path: str | os.PathLike | None) -> str | None:
    """``path`` made absolute (None stays None). Per-image tasks and worker resources get their
    paths through this: on a cluster (``compute.scheduler: tcp://...``) the workers may have
    been started in another directory than the stage, and a relative path would read or write
    there. The workers must see the project at the same path (one machine, or a shared
    filesystem)."""
    return None if path is None else os.path.abspath(path)


def image_inputs(record) -> str:
    """Digest of what a per-image artifact of index ``record`` is computed from when that is the
    image alone (SAM masks, inference features): its content digest, recorded by prepare.
    Stores keep it per image (``pipeline.store.INPUTS_KEY``); a resume keeps an image only when
    it matches (``ImageStore.todo``)."""
    return fingerprint("image", record.digest)


def labelled_inputs(record) -> str:
    """As :func:`image_inputs`, for artifacts that also depend on the image-level labels (train
    views, CAMs)."""
    return fingerprint("image+labels", record.digest, sorted(record.labels))


def check_inputs(store, image_id: str, expected: str, rerun: str) -> None:
    """Stop when image ``image_id`` of upstream ``store`` was computed from other inputs than
    the index says (an image replaced since): never compute from a stale upstream artifact.
    An image that records no inputs (written by other tools: ``import-cams``, your own code) is
    taken as it is; the stages themselves always record them."""
    recorded = store.recorded_inputs(image_id)
    if recorded is not None and recorded != expected:
        raise StageError(f"image {image_id} in {store.path} was computed from another version of "
                         f"the image or its labels than the index holds (rerun `{rerun}`)")


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
        ``thread_safe``."""
        key = self.key()
        with _RESOURCE_LOCK:
            if key not in _RESOURCES:
                kwargs = dict(self.kwargs)
                if "device" in kwargs:
                    check_device(kwargs["device"])
                for name, expected in self.digests:
                    actual = _file_digest(_lookup(kwargs, name))
                    if actual != expected:
                        raise StageError(
                            f"{_lookup(kwargs, name)}{_where()} is not the file the stage started with "
                            f"(SHA-256 {_short(actual)}, expected {_short(expected)}): replaced while "
                            "the stage ran, or another file at that path where this process runs")
                _RESOURCES[key] = (self.factory(**kwargs), threading.Lock())
            return _RESOURCES[key]

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
        except StageError as exc:
            raise StageError(f"{exc.message}{_where()}") from None
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


def _run_task(task: Callable[[Any, Any], Any], resource: WorkerResource | None, item: Any) -> Any:
    if resource is None:
        return task(None, item)
    obj, lock = resource.acquire()
    if resource.thread_safe:
        return task(obj, item)
    with lock:
        return task(obj, item)


def run_per_image(
    task: Callable[[Any, Any], Any],
    items: Iterable[Any],
    compute: ComputeConfig,
    resource: WorkerResource | None = None,
    desc: str = "images",
    collect: Callable[[Any], None] | None = None,
) -> list[Any]:
    """Run ``task(resource_object, item)`` for every item; returns the results in item order.

    With ``collect``, each result is handed to it as it arrives (in item order when serial, in
    completion order on dask) and not kept (the return value is then empty): a stage whose
    per-image results are only summed (confusion matrices) then holds its running totals, not
    one result per image of the dataset.

    Tasks must be idempotent and write their own artifacts atomically. An exception in a task
    stops the stage with that exception (the artifacts written so far stay, complete). When the
    tasks are done (or failed), every process that ran them drops its cached models.
    """
    items = list(items)
    if not items:
        return []
    if compute.scheduler == "local":
        results = []
        try:
            obj = resource.get() if resource is not None else None
            start = time.perf_counter()
            # A context manager closes the bar when a task fails, so the error gets its own line.
            with tqdm(items, desc=desc, unit="img", dynamic_ncols=True) as bar:
                for item in bar:
                    result = task(obj, item)
                    if collect is None:
                        results.append(result)
                    else:
                        collect(result)
        finally:
            obj = None
            release_resources()
    else:
        start = time.perf_counter()  # the workers build their models inside this loop
        results = _run_dask(task, items, compute, resource, desc, collect)
    # The per-image loop alone (process start, model loading in this process and the work before
    # and after excluded): benchmarks/scale.py reads it from the stage's log.
    elapsed = time.perf_counter() - start
    log.info("%s: %d images in %.3f s (%.4f s per image)", desc, len(items), elapsed,
             elapsed / len(items))
    return results


def _cuda_devices(device: str) -> list[str] | None:
    """The GPUs that ``local-cluster`` workers share out for ``device`` (entries of
    ``CUDA_VISIBLE_DEVICES``, or indices), or None when the workers do not run on CUDA or the
    device names one GPU (``cuda:N``)."""
    if device not in ("cuda", "auto"):
        return None
    import torch

    count = torch.cuda.device_count()
    if count == 0 or (device == "auto" and not torch.cuda.is_available()):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        listed = [v.strip() for v in visible.split(",") if v.strip()]
        if len(listed) >= count:
            return listed[:count]
    return [str(i) for i in range(count)]


def local_cluster_workers(compute: ComputeConfig) -> list[dict[str, str]]:
    """The environment of each ``local-cluster`` worker: with CUDA, worker i sees only GPU
    i (mod the number of GPUs) as its ``cuda``; ``compute.workers`` defaults to one per GPU
    (2 without CUDA)."""
    gpus = _cuda_devices(compute.device)
    n = compute.workers or (len(gpus) if gpus else 2)
    if not gpus:
        return [{} for _ in range(n)]
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]


def _local_cluster(compute: ComputeConfig):
    from distributed import LocalCluster

    envs = local_cluster_workers(compute)
    cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    try:
        # One spec per worker, so each gets its own environment (LocalCluster gives them one).
        for name, env in enumerate(envs):
            spec = dict(cluster.new_spec)
            spec["options"] = {**spec["options"], "env": {**spec["options"].get("env", {}), **env}}
            cluster.worker_spec[name] = spec
        cluster.scale(len(envs))
    except BaseException:
        cluster.close()
        raise
    return cluster


def _run_dask(task, items, compute: ComputeConfig, resource, desc, collect=None) -> list[Any]:
    from distributed import Client, as_completed

    cluster = None
    if compute.scheduler == "local-cluster":
        cluster = _local_cluster(compute)
        client = Client(cluster)
    else:
        try:
            client = Client(compute.scheduler, timeout="30s")
        except OSError as exc:
            raise StageError(f"cannot reach dask scheduler {compute.scheduler!r}: {exc}") from exc
    futures: list[Any] = []
    try:
        futures = [
            client.submit(_run_task, task, resource, item, pure=False, retries=0) for item in items
        ]
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(items) if collect is None else []
        with tqdm(total=len(items), desc=desc, unit="img", dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                i = index[future.key]
                if collect is None:
                    results[i] = future.result()
                else:
                    collect(future.result())
                futures[i] = None  # the cluster may forget the result once it is taken
                bar.update(1)
        return results
    finally:
        if cluster is None:
            _release_on_workers(client, futures)
        client.close()
        if cluster is not None:
            cluster.close()


def _release_on_workers(client, futures: list) -> None:
    """Empty the model cache of every worker of an external cluster, a failed stage's included
    (its tasks not yet started are cancelled first, so none rebuilds a model afterwards)."""
    try:
        client.cancel([f for f in futures if f is not None and not f.done()])
        client.run(release_resources)
    except Exception as exc:  # the stage's own result or error matters more than this clean-up
        log.warning("could not release the models cached on the dask workers: %s", exc)


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
