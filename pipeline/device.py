"""Device choice: ``compute.device`` names as torch devices, checked where the models run."""
from __future__ import annotations

from pipeline.errors import PipelineError


class DeviceError(PipelineError):
    """The requested device does not exist here, or cannot run the requested precision."""


def torch_device(name: str, precision: str | None = None):
    """``compute.device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) as a torch device; with
    ``precision`` (``compute.precision``), bf16 on a CUDA device without bfloat16 support is
    refused here, in one line."""
    import torch

    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"compute.device is {name!r} but no CUDA device is available")
    if precision is not None:
        from pipeline.precision import check_bf16

        check_bf16(dev, precision)  # a PrecisionError (a PipelineError), one line
    return dev
