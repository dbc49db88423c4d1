"""Provenance: what an artifact was computed from, as short stable digests.

- :func:`fingerprint`: a hash of configs, checksums and versions; a resumable store or checkpoint
  records it, and a run with another fingerprint starts over instead of resuming.
- :func:`code_digest`: the source of the modules that compute an artifact (part of fingerprints,
  so a code change recomputes instead of resuming stale results).
- :func:`image_inputs` / :func:`labelled_inputs`: per-image input digests, recorded with every
  per-image artifact; :func:`check_inputs` refuses an upstream artifact of another version of
  the image.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.config import to_dict


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (configs, checksums, versions)."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    from pipeline.store import StoreError

    recorded = store.recorded_inputs(image_id)
    if recorded is not None and recorded != expected:
        raise StoreError(f"image {image_id} in {store.path} was computed from another version of "
                         f"the image or its labels than the index holds (rerun `{rerun}`)")
