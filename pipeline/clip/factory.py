"""The frozen CLIP from a ``clip`` config: checkpoint verification, the model, its provenance.

``build_clip`` owns the device (as open_clip's ``factory.py`` does); its arguments are plain data
(:func:`clip_kwargs`), so it can be a per-process resource of the per-image stages
(``clip_features``, ``cams``) as well as ``train_prompts``' model. Known weights and their
checksums are in :mod:`pipeline.clip.pretrained`.
"""
from __future__ import annotations

import logging

from pipeline.clip.pretrained import CLIP_SOURCE, known_checksum, known_sha256
from pipeline.device import torch_device
from pipeline.params import ClipConfig
from pipeline.weights import resolve_checkpoint, sha256sum

log = logging.getLogger("wsss.clip_features")


def verify_clip(cfg: ClipConfig) -> str | None:
    """Check the checkpoint once in the main process; returns its SHA-256 (None: no file).

    The expected checksum is ``clip.checkpoint_sha256``, else the published one of a file named
    like a known official file (OpenAI's ViT-B-16.pt): a truncated download is refused. The Hugging
    Face conversion's checksum is not published: such a file is not verified, and its SHA-256 goes
    into every store's provenance instead. A TorchScript archive runs code when it loads: it is
    accepted only when pinned or a known official file by content
    (:func:`pipeline.clip.model.check_torchscript`).

    Raises:
        pipeline.weights.CheckpointError: the file is missing, its checksum differs, or it is an
            unpinned, unknown TorchScript archive.
    """
    if cfg.model == "tiny" or cfg.checkpoint is None:
        return None
    from pipeline.clip.model import check_torchscript, is_torchscript

    expected = cfg.checkpoint_sha256 or known_sha256(cfg.model, cfg.checkpoint)
    path = resolve_checkpoint(cfg.checkpoint, expected, f"CLIP {cfg.model}", CLIP_SOURCE,
                              "clip.checkpoint")
    actual = sha256sum(path)  # hashed once per process: resolve_checkpoint's digest, or now
    if is_torchscript(path):
        check_torchscript(path, actual, cfg.checkpoint_sha256)
    if expected or known_checksum(actual) is not None:
        return actual
    log.warning("CLIP checkpoint %s is not verified (no published checksum); its SHA-256 %s is "
                "recorded in the outputs' provenance; pin it with clip.checkpoint_sha256", path, actual)
    return actual


def clip_provenance(cfg: ClipConfig, sha256: str | None) -> dict:
    """What results depend on: architecture, weights checksum (not the file's location), seed."""
    return {
        "model": cfg.model, "checkpoint_sha256": sha256, "pretrained_tag": cfg.pretrained_tag,
        "seed": cfg.seed if sha256 is None and cfg.pretrained_tag is None else None,
        "untrained": cfg.model == "tiny" and cfg.pretrained_tag is None,
    }


def build_clip(model: str, checkpoint: str | None, pretrained_tag: str | None, seed: int, device: str,
               checkpoint_sha256: str | None = None):
    """Per-process CLIP factory (WorkerResource: module-level, plain-data kwargs). The checkpoint
    is checked on the bytes it loads (``checkpoint_sha256``: ``clip.checkpoint_sha256``)."""
    from pipeline.clip.model import create_clip

    clip = create_clip(model, checkpoint=None if model == "tiny" else checkpoint,
                       pretrained_tag=pretrained_tag, seed=seed, checkpoint_sha256=checkpoint_sha256)
    return clip.to(torch_device(device))


def clip_kwargs(cfg: ClipConfig, device: str) -> dict:
    """:func:`build_clip`'s keyword arguments for ``cfg`` on ``device`` (plain data). A caller
    whose workers may run in another directory makes ``checkpoint`` absolute."""
    return dict(model=cfg.model, checkpoint=cfg.checkpoint, pretrained_tag=cfg.pretrained_tag,
                seed=cfg.seed, device=device, checkpoint_sha256=cfg.checkpoint_sha256)
