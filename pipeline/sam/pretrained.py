"""Known SAM weights, apart from the architectures (as open_clip keeps ``pretrained.py`` apart
from its model configs).

An architecture (:mod:`pipeline.sam.specs`) says how to build a SAM; this module says which
checkpoint file a named model loads and its published SHA-256. A model with no entry here has no
checkpoint: it is randomly initialised (``tiny``). The official files are the core's entries; the
demo registers its own from ``pipeline/demo/registry.py``. Plain data only.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.registry import Registry


@dataclass(frozen=True)
class SamWeights:
    """The checkpoint of one SAM model."""

    file_name: str
    """File name of the official checkpoint."""
    sha256: str | None = None
    """Published SHA-256 of the official checkpoint (None: none pinned; ``sam.checkpoint_sha256``
    can pin one)."""


PRETRAINED: Registry[SamWeights] = Registry("SAM checkpoint", {
    "vit_h": SamWeights("sam_vit_h_4b8939.pth",
                        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": SamWeights("sam_vit_l_0b3195.pth",
                        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": SamWeights("sam_vit_b_01ec64.pth",
                        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
})


def register_pretrained(model: str, weights: SamWeights) -> None:
    """Give SAM model ``model`` a checkpoint: it then loads ``sam.checkpoint`` instead of random
    weights, verified against ``weights.sha256`` (or ``sam.checkpoint_sha256``)."""
    PRETRAINED.register(model, weights)


def pretrained_weights(model: str) -> SamWeights | None:
    """The checkpoint of ``model``; None: it has none (random initialisation)."""
    return PRETRAINED.get(model)
