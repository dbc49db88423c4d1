"""Numeric precision of the network forward passes (``compute.precision``).

``fp32`` is the reference (the authors ran SAM and CLIP in fp32). ``bf16`` runs the forward passes
of SAM, CLIP and the segmenter under ``torch.autocast`` with bfloat16: about twice the speed and
half the activation memory on GPUs with bf16 tensor cores; on CPUs it runs too (so it can be
tested) but is rarely faster. Post-processing (thresholds, NMS, SAMS, CAA) stays fp32.
"""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device | str, precision: str):
    """A context in which eligible ops run in ``precision`` on ``device`` (fp32: no change)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
