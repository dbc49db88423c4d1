"""Per-image execution: every per-image stage runs through :func:`run_per_image`.

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

import logging
import os
import time
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.params import ComputeConfig
from stages.resources import WorkerResource, release_resources

log = logging.getLogger("wsss")


def worker_path(path: str | os.PathLike | None) -> str | None:
    """``path`` made absolute (None stays None). Per-image tasks and worker resources get their
    paths through this: on a cluster (``compute.scheduler: tcp://...``) the workers may have
    been started in another directory than the stage, and a relative path would read or write
    there. The workers must see the project at the same path (one machine, or a shared
    filesystem)."""
    return None if path is None else os.path.abspath(path)


# -- per-image execution ------------------------------------------------------------------------

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


def fill_store(
    task: Callable[[Any, Any], Any],
    plan: Callable[[], list[Any]],
    compute: ComputeConfig,
    resource: WorkerResource | None = None,
    desc: str = "images",
) -> int:
    """Run ``task`` over ``plan()`` (the items a store still lacks: missing, computed from other
    inputs or for another store fingerprint), then ask ``plan()`` again: an image that a task of
    an earlier run replaced meanwhile (a dask task cannot be cancelled once running, and may end
    after its store was reset for new parameters) is computed again, never kept. Returns the
    number of images the store lacked at the start (the rest were resumed)."""
    items = plan()
    run_per_image(task, items, compute, resource, desc=desc)
    if not items:
        return 0
    late = plan()
    if late:
        log.warning("%s: %d images were replaced by results of an earlier run while this one ran "
                    "(computed for other parameters); computing them again", desc, len(late))
        run_per_image(task, late, compute, resource, desc=desc)
        again = plan()
        if again:
            raise PipelineError(f"{desc}: {len(again)} images keep being replaced by results of "
                                "another run (another stage process or dask tasks of a killed "
                                "run still write this store): stop them and rerun")
    return len(items)


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
            raise PipelineError(f"cannot reach dask scheduler {compute.scheduler!r}: {exc}") from exc
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
