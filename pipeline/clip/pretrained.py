"""Known CLIP weights, apart from the architectures (as open_clip keeps ``pretrained.py`` apart
from its ``model_configs/``).

An architecture (``pipeline/clip/model_configs``, open_clip's own configs) says how to build a
model; this module says which weight files are known and their SHA-256, so a known file is
verified without ``clip.checkpoint_sha256``. A file is known by its content (its SHA-256 is a
known file's), never by its name: only such a file, or one whose checksum is pinned, may be a
TorchScript archive (code that runs when it loads). OpenAI's file is the core's entry; others register
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
    """The checksum a file named like ``model_name``'s known file must have (None: another name).

    A lookup by name: what a file of that name is expected to be, so a truncated download is
    refused. It never makes a file trusted; that is :func:`known_checksum`, by content."""
    name, sha = known_files().get(model_name, (None, None))
    return sha if Path(checkpoint).name == name else None


def known_checksum(sha256: str | None) -> tuple[str, str] | None:
    """(architecture, file name) of the known file whose SHA-256 is ``sha256``, else None: a file
    is a known official file by its content, whatever its name."""
    for model_name, (name, sha) in known_files().items():
        if sha256 is not None and sha256.lower() == sha.lower():
            return model_name, name
    return None


def named_like_known_file(checkpoint: str | Path) -> str | None:
    """The known file name ``checkpoint`` carries, if any (for messages only)."""
    names = {name for name, _ in known_files().values()}
    return Path(checkpoint).name if Path(checkpoint).name in names else None
