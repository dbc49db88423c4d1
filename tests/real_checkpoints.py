"""Random weights at the real architectures' sizes, written in the real files' formats.

What a researcher downloads, minus the training: SAM ``vit_b`` as ``torch.save`` of its state dict
(``sam_vit_b_01ec64.pth``), open_clip ``ViT-B-16`` as ``open_clip_pytorch_model.bin`` (the state
dict of timm/vit_base_patch16_clip_224.openai on the Hugging Face hub), and torchvision's
``resnet101`` state dict named like torchvision's file, ``resnet101-<first 8 hex of its SHA-256>.pth``.
The files are built once per test session (about 1.1 GB) by the same code paths that build the
models, and each comes with its SHA-256 so params can pin it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.weights import sha256sum


@dataclass(frozen=True)
class RealCheckpoint:
    path: Path
    sha256: str


def sam_vit_b(folder: Path) -> RealCheckpoint:
    from pipeline.sam.models import build_sam
    from pipeline.sam.specs import sam_spec

    path = folder / "sam_vit_b_01ec64.pth"
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = build_sam(sam_spec("vit_b")).state_dict()
        _save(state, path)
    return RealCheckpoint(path, sha256sum(path))


def open_clip_vit_b16(folder: Path) -> RealCheckpoint:
    import open_clip

    path = folder / "open_clip_pytorch_model.bin"
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model("ViT-B-16", force_quick_gelu=True)
        _save(model.state_dict(), path)
    return RealCheckpoint(path, sha256sum(path))


def torchvision_resnet101(folder: Path) -> RealCheckpoint:
    import torchvision

    existing = sorted(folder.glob("resnet101-*.pth"))
    if existing:
        return RealCheckpoint(existing[0], sha256sum(existing[0]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = torchvision.models.resnet101().state_dict()
    tmp = folder / "resnet101.tmp"
    _save(state, tmp)
    sha = sha256sum(tmp)
    path = folder / f"resnet101-{sha[:8]}.pth"
    os.replace(tmp, path)
    return RealCheckpoint(path, sha)


def _save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)
