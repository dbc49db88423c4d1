"""Numeric precision of the network forward passes (``compute.precision``) and of prompt training.

``fp32`` is the reference (the authors ran SAM and CLIP in fp32). ``bf16`` runs the forward passes
of SAM, CLIP, the segmenter and prompt training under ``torch.autocast`` with bfloat16: about
twice the speed and half the activation memory on GPUs with bf16 tensor cores; on CPUs it runs
too (so it can be tested) but is rarely faster. bfloat16 has float32's range, so its gradients
need no loss scaling. Post-processing (thresholds, NMS, SAMS, CAA) stays fp32, and so does the
Grad-CAM (``pipeline.prompts.training.batched_gradcam``).

Prompt training has a third mode, ``fp16-amp``: the reference's mixed precision (fp16 autocast
with a ``GradScaler``), which ``prompts.<which>.amp`` asks for on CUDA (:func:`training_precision`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16")


class PrecisionError(PipelineError, ValueError):
    """A precision this device cannot run."""


def autocast(device: torch.device | str, precision: str):
    """A context in which eligible ops run in ``precision`` on ``device`` (fp32: no change)."""
    import torch  # here, not at import: the params schema imports this module

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


TRAINING_PRECISIONS = ("fp32", "bf16", "fp16-amp")
"""Precisions of prompt training: those of ``compute.precision`` and the reference's fp16 AMP."""


def training_precision(precision: str, amp: bool, device: torch.device | str) -> str:
    """The precision prompt training runs in: ``fp16-amp`` when ``amp`` is asked on CUDA (fp16
    autocast, whose gradients underflow without a GradScaler, is a CUDA recipe); else
    ``precision`` (``compute.precision``). ``amp`` with a ``precision`` other than fp32 is two
    precisions at once: ValueError."""
    import torch  # here, not at import: the params schema imports this module

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if amp and precision != "fp32":
        raise ValueError(f"amp (fp16 autocast + GradScaler) and precision {precision!r} ask for two "
                         "precisions at once")
    return "fp16-amp" if amp and torch.device(device).type == "cuda" else precision


def training_autocast(device: torch.device | str, precision: str):
    """The autocast of a training step in ``precision`` (one of :data:`TRAINING_PRECISIONS`)."""
    import torch  # here, not at import: the params schema imports this module

    if precision not in TRAINING_PRECISIONS:
        raise ValueError(f"precision must be one of {TRAINING_PRECISIONS}, got {precision!r}")
    dtype = torch.float16 if precision == "fp16-amp" else torch.bfloat16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=precision != "fp32")


def grad_scaler(device: torch.device | str, precision: str) -> "torch.amp.GradScaler":
    """The loss scaler of a training step in ``precision``: enabled for ``fp16-amp`` only."""
    import torch  # here, not at import: the params schema imports this module

    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16-amp")


def check_bf16(device: torch.device | str, precision: str) -> None:
    """PrecisionError (a ValueError, one line) when bf16 is asked on a CUDA device without bfloat16
    support."""
    import torch  # here, not at import: the params schema imports this module

    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise PrecisionError(f"compute.precision is bf16 but {device} ({name}) does not support bfloat16 "
                         "(it needs compute capability 8.0 or later, e.g. A100, H100, RTX 30xx); "
                         "set compute.precision: fp32")
