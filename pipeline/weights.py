"""Checkpoint resolution: a path from params, verified by SHA-256, with a clear error if missing.

Nothing here downloads: runs are offline, and a missing file is the user's to fetch.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


class CheckpointError(FileNotFoundError):
    """A checkpoint is missing or does not match its expected checksum."""


def sha256sum(path: str | Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_checkpoint(
    path: str | Path | None, sha256: str | None, what: str, source: str, param: str
) -> Path:
    """Return ``path`` if it exists and matches ``sha256`` (when given), else raise.

    ``what`` names the model, ``source`` says where to get the file, ``param`` is the params key
    that holds the path. The error is one paragraph naming all of them.
    """
    if path is None or not Path(path).is_file():
        raise CheckpointError(
            f"{what} checkpoint not found: {path!s} (params key '{param}'). "
            f"Expected SHA-256 {sha256 or 'not pinned'}. Get it from {source} and set '{param}' to "
            "its path; runs never download weights themselves."
        )
    if sha256:
        actual = sha256sum(path)
        if actual != sha256.lower():
            raise CheckpointError(
                f"{what} checkpoint {path} has SHA-256 {actual}, expected {sha256} (params key "
                f"'{param}'). The file is corrupt or a different model; get it again from {source}."
            )
    return Path(path)
