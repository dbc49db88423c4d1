"""Checkpoint resolution: a path from params, verified by SHA-256, with a clear error if missing.

Nothing here downloads: runs are offline, and a missing file is the user's to fetch.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.errors import PipelineError


class CheckpointError(PipelineError, FileNotFoundError):
    """A checkpoint is missing or does not match its expected checksum."""


def sha256sum(path: str | Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


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
    if sha256:
        actual = actual or sha256sum(path)
        if actual != sha256.lower():
            raise CheckpointError(mismatch_message(path, actual, sha256, what, source, param))
    elif (prefix := name_hash_prefix(path)) is not None:
        actual = actual or sha256sum(path)
        if not actual.startswith(prefix):
            raise CheckpointError(
                f"{what} checkpoint {path} has SHA-256 {actual}, but its name says it starts with "
                f"{prefix} (torchvision's naming): the file is truncated or corrupt; get it again "
                f"from {source}, or set '{param}_sha256: {actual}' if it is your own file.")
    return Path(path)


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


def load_torch_file(path: str | Path, what: str, source: str):
    """``torch.load`` of a checkpoint (tensors only, on the CPU), with one clear error for a
    truncated or foreign file instead of the unpickler's traceback."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors have many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} checkpoint {path} cannot be read ({reason[:160]}): it is "
                              f"truncated or not a PyTorch weights file; get it again from {source}.") from exc
