"""Logging of the ``wsss`` commands: our own INFO lines on stderr, libraries from WARNING up, and
every stage's records also appended to ``cache/logs/<stage>.log`` (with times)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("wsss")


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
