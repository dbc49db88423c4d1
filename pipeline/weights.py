"""Checkpoint resolution: a path from params, verified by SHA-256, with a clear error if missing.

Nothing here downloads: runs are offline, and a missing file is the user's to fetch.

A checkpoint is hashed once per process and file version (:func:`sha256sum`'s cache, keyed by
device, inode, size and mtime: a ViT-H SAM is 2.5 GB), and a loader checks the digest of the very
bytes it loads (:func:`read_checkpoint`), so a file replaced between the check and the load is
refused instead of loaded unverified.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Mapping

from pipeline.errors import PipelineError


class CheckpointError(PipelineError, FileNotFoundError):
    """A checkpoint is missing or does not match its expected checksum."""


_DIGESTS: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_KEPT = 64


def _version(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies one version of a file: a file replaced (new inode) or rewritten (new size or
    mtime) is another version."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _remember(before: os.stat_result, after: os.stat_result, digest: str) -> None:
    """Cache ``digest`` for the file version read, unless it changed while it was read."""
    if _version(before) != _version(after):
        return
    with _DIGESTS_LOCK:
        _DIGESTS[_version(after)] = digest
        _DIGESTS.move_to_end(_version(after))
        while len(_DIGESTS) > _DIGESTS_KEPT:
            _DIGESTS.popitem(last=False)


def sha256sum(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """The file's SHA-256, computed once per process and file version (cached by device, inode,
    size and mtime; a replaced or rewritten file is hashed again)."""
    with _DIGESTS_LOCK:
        cached = _DIGESTS.get(_version(os.stat(path)))
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
        after = os.fstat(f.fileno())
    _remember(before, after, digest.hexdigest())
    return digest.hexdigest()


def forget_digests() -> None:
    """Empty this process's digest cache."""
    with _DIGESTS_LOCK:
        _DIGESTS.clear()


# -- the digests a caller expects of the files a factory loads ------------------------------------

_EXPECTED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("wsss_expected_files", default=None)


@contextlib.contextmanager
def expected_files(
    digests: Mapping[str, str | None], error: Callable[[str, str | None, str | None], Exception],
) -> Iterator[set[str]]:
    """Within the block, a checkpoint read by :func:`read_checkpoint` at one of the paths of
    ``digests`` must have that SHA-256 (None: no file was there), else ``error(path, actual,
    expected)`` is raised. Yields the set of the paths so checked on the bytes loaded; the caller
    checks the others itself (a file its factory reads otherwise)."""
    checked: set[str] = set()
    token = _EXPECTED.set({"digests": {_key(p): (p, d) for p, d in digests.items()},
                           "error": error, "checked": checked})
    try:
        yield checked
    finally:
        _EXPECTED.reset(token)


def _key(path: str | Path) -> str:
    return os.path.abspath(os.fspath(path))


def _check_expected(path: str | Path, actual: str) -> None:
    state = _EXPECTED.get()
    if state is None or _key(path) not in state["digests"]:
        return
    given, expected = state["digests"][_key(path)]
    if actual != expected:
        raise state["error"](given, actual, expected)
    state["checked"].add(given)


def read_checkpoint(path: str | Path | None, sha256: str | None, what: str, source: str,
                    param: str) -> tuple[bytes, str]:
    """The file's bytes, read once, and their SHA-256, checked against ``sha256`` (params; the
    error names ``<param>_sha256``) and against what an enclosing :func:`expected_files` expects of
    this path. Load from these bytes (:func:`load_torch_file`'s ``data``), never the path again: a
    file swapped after the check is then refused, not loaded. Missing or empty: CheckpointError."""
    check_file(path, sha256, what, source, param)
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        data = f.read()
        after = os.fstat(f.fileno())
    actual = hashlib.sha256(data).hexdigest()
    _remember(before, after, actual)
    _check_expected(path, actual)
    if sha256 and actual != sha256.lower():
        raise CheckpointError(mismatch_message(path, actual, sha256, what, source, param))
    return data, actual


def resolve_checkpoint(
    path: str | Path | None, sha256: str | None, what: str, source: str, param: str,
    actual: str | None = None,
) -> Path:
    """Return ``path`` if it exists and matches ``sha256`` (when given), else raise.

    ``what`` names the model, ``source`` says where to get the file, ``param`` is the params key
    that holds the path (its checksum key is ``<param>_sha256``). The error is one paragraph
    naming all of them. ``actual``: the file's checksum when the caller already computed it.
    """
    check_file(path, sha256, what, source, param)
    if sha256 or name_hash_prefix(path) is not None:
        check_digest(path, actual or sha256sum(path), sha256, what, source, param)
    return Path(path)


def check_digest(path: str | Path, actual: str, sha256: str | None, what: str, source: str,
                 param: str) -> None:
    """:func:`resolve_checkpoint`'s rules on a digest already computed: the pinned ``sha256``,
    else the prefix a torchvision-style name carries."""
    if sha256:
        if actual != sha256.lower():
            raise CheckpointError(mismatch_message(path, actual, sha256, what, source, param))
    elif (prefix := name_hash_prefix(path)) is not None and not actual.startswith(prefix):
        raise CheckpointError(
            f"{what} checkpoint {path} has SHA-256 {actual}, but its name says it starts with "
            f"{prefix} (torchvision's naming): the file is truncated or corrupt; get it again "
            f"from {source}, or set '{param}_sha256: {actual}' if it is your own file.")


def name_hash_prefix(path: str | Path) -> str | None:
    """The SHA-256 prefix a torchvision-style file name carries (``resnet101-63fe2227.pth``)."""
    import re

    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", Path(path).name)
    return match.group(1) if match else None


def check_file(path: str | Path | None, sha256: str | None, what: str, source: str, param: str) -> None:
    """Raise a CheckpointError naming the file when it is missing or empty."""
    if path is None or not Path(path).is_file():
        raise CheckpointError(
            f"{what} checkpoint not found: {path!s} (params key '{param}'). "
            f"Expected SHA-256 {sha256 or 'not pinned'}. Get it from {source} and set '{param}' to "
            "its path; runs never download weights themselves."
        )
    if Path(path).stat().st_size == 0:
        raise CheckpointError(f"{what} checkpoint {path} is empty (0 bytes): the download did not "
                              f"finish; get it again from {source}.")


def mismatch_message(path, actual: str, expected: str, what: str, source: str, param: str) -> str:
    return (
        f"{what} checkpoint {path} has SHA-256 {actual}, expected {expected} (params key "
        f"'{param}_sha256'). The file is truncated, corrupt or a different model: get it again "
        f"from {source}; if it is your own checkpoint (fine-tuned, another variant), set "
        f"'{param}_sha256: {actual}'."
    )


def load_torch_file(path: str | Path, what: str, source: str, data: bytes | None = None):
    """``torch.load`` of a checkpoint (tensors only, on the CPU), with one clear error for a
    truncated or foreign file instead of the unpickler's traceback. ``data``: the file's bytes as
    :func:`read_checkpoint` read and checked them (``path`` then only names the file)."""
    import torch

    try:
        return torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors have many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} checkpoint {path} cannot be read ({reason[:160]}): it is "
                              f"truncated or not a PyTorch weights file; get it again from {source}.") from exc
