"""Atomic file writes: a temporary file beside the target, renamed over it when complete.

Every artifact writer goes through :func:`atomic_path`, so a killed or failed write leaves the
old file (or none), never half a file, and readers on other processes never see a partial one.
Files are replaced, never edited: under DVC's hardlink/symlink cache the old file is the cache's
copy.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; rename it over ``path`` when the block ends normally,
    remove it when the block raises (disk full, killed, an error of the writer).

    ``tmp`` chooses the temporary name (default ``.<name>.<random>.tmp`` beside ``path``); its
    folder and ``path``'s are created when missing.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, tmp: str | os.PathLike | None = None) -> None:
    with atomic_path(path, tmp) as part:
        part.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """A small text artifact (metrics JSON, curve CSV), atomically."""
    with atomic_path(path) as part:
        part.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
