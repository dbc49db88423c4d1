"""Known CLIP weights, apart from the architectures (as open_clip keeps ``pretrained.py`` apart
from its ``model_configs/``).

An architecture (``pipeline/clip/model_configs``, open_clip's own configs) says how to build a
model; this module says which weight files are known and their SHA-256, so a known file is
verified without ``clip.checkpoint_sha256``. OpenAI's file is the core's entry; others register
with :func:`register_known_file` (the demo's CLIP does, from ``pipeline/demo/registry.py``).
Plain data only: ``pipeline.params`` imports :data:`CLIP_SOURCE` from here.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.registry import Registry

CLIP_SOURCE = (
    "https://huggingface.co/timm/vit_base_patch16_clip_224.openai (open_clip_pytorch_model.bin, "
    "open_clip's conversion of OpenAI's ViT-B/16)"
)
"""Where the paper's CLIP weights come from (named in the error of a missing checkpoint)."""

OPENAI_FILES = {
    # OpenAI's own download of ViT-B/16 (a TorchScript archive): its URL carries the file's SHA-256
    # (openaipublic.azureedge.net/clip/models/<sha256>/ViT-B-16.pt), which OpenAI's loader checks.
    "ViT-B-16": ("ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
}
"""Architecture -> (OpenAI's file name, its published SHA-256)."""

KNOWN_FILES: Registry[tuple[str, str]] = Registry("CLIP weights file", dict(OPENAI_FILES))
"""Architecture -> (file name, SHA-256) of every known weights file."""


def register_known_file(model_name: str, file_name: str, sha256: str) -> None:
    """Make ``file_name`` a known weights file of architecture ``model_name`` with checksum
    ``sha256`` (a file whose checksum can be established, e.g. one committed to the repository)."""
    KNOWN_FILES.register(model_name, (file_name, sha256))


def known_files() -> dict[str, tuple[str, str]]:
    """Architecture -> (file name, SHA-256) of every known file, registered ones included."""
    return dict(KNOWN_FILES.all())


def known_sha256(model_name: str, checkpoint: str | Path) -> str | None:
    """The published checksum of ``checkpoint`` if it is a known official file, else None (the
    Hugging Face conversions' checksums are not published; callers record the file's own)."""
    name, sha = known_files().get(model_name, (None, None))
    return sha if Path(checkpoint).name == name else None
