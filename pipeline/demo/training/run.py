"""A ``wsss demo-models`` training run around the trainers: the device it runs on, the weights
written with reproducible bytes, the held-out curves, and each model's entry of the report.

Each ``train_demo_*`` trains into an output folder (resume state, held-out curve, weights file) and
returns the model's entry of ``demo_models.json``; the command writes the report.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import PipelineError

log = logging.getLogger("wsss.demo_models")
CLIP_FILE = "clip_demo.pt"
SAM_FILE = "sam_demo.pth"
SAM_CURVE_FILE = "sam_curve.jsonl"


def cpu_state(state: dict) -> dict:
    """A state dict with its tensors on the CPU (the same object on the CPU: the same bytes
    saved), keeping ``_metadata`` as ``state_dict()`` sets it."""
    if all(v.device.type == "cpu" for v in state.values()):
        return state
    out = type(state)((k, v.cpu()) for k, v in state.items())
    if hasattr(state, "_metadata"):
        out._metadata = state._metadata
    return out


def demo_device(name: str) -> torch.device:
    """``--device`` (cpu, cuda, cuda:N, auto) as a torch device; a bad name or a missing CUDA
    device is a one-line :class:`PipelineError`."""
    from pipeline.device import torch_device

    try:
        dev = torch_device(name)
    except PipelineError:
        raise PipelineError(f"demo-models: --device is {name!r} but no CUDA device is available") from None
    except RuntimeError:
        raise PipelineError(f"demo-models: --device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise PipelineError(f"demo-models: --device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PipelineError(f"demo-models: --device is {name!r} but only {torch.cuda.device_count()} "
                            "CUDA device(s) are visible")
    return dev


def save_weights(obj, path: Path) -> str:
    """Atomic ``torch.save`` with byte-identical output for identical tensors; returns the
    SHA-256 of the bytes written.

    ``torch.save`` names the zip archive inside the file after the file it writes to, so saving
    under a random temporary name (then renaming) would make every run's bytes differ; saving to
    memory names it ``archive`` always.
    """
    import hashlib
    import io
    import os

    from pipeline.atomic import write_bytes_atomic

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    write_bytes_atomic(path, data, tmp=path.with_name(f".{path.name}.tmp{os.getpid()}"))
    return hashlib.sha256(data).hexdigest()


def train_demo_clip(cfg, out_dir: Path, held_out: list, progress: Callable[[int, dict], None] | None = None,
                    device: torch.device | str = "cpu", precision: str = "fp32") -> tuple[dict, dict]:
    """Train the demo CLIP (``ClipTrainingConfig`` ``cfg``) in ``out_dir`` and write ``CLIP_FILE``
    (fp16). Returns the report entry (held-out quality after each phase and of the saved
    weights, on ``held_out``) and the saved weights as a CPU state dict (the SAM starts from it)."""
    from pipeline.demo.training.clip import evaluate_clip, train_clip

    curve = []

    def evaluate_phase(name, model):
        if held_out:
            curve.append({"phase": name, **evaluate_clip(model, held_out, precision=precision)})
            log.info("demo CLIP after %s: %s", name, json.dumps(curve[-1]))

    start = time.perf_counter()
    model = train_clip(cfg, progress=progress, state_dir=out_dir, on_phase_end=evaluate_phase, device=device,
                       precision=precision)
    seconds = time.perf_counter() - start
    sha = save_weights({k: v.cpu().half() for k, v in model.state_dict().items()}, out_dir / CLIP_FILE)
    # evaluated as saved (fp16), which is what the pipeline loads
    model.load_state_dict(torch.load(out_dir / CLIP_FILE, map_location="cpu", weights_only=True))
    clip_state = cpu_state(model.state_dict())
    entry = {"file": CLIP_FILE, "sha256": sha, "config": asdict(cfg), "seconds": round(seconds, 1),
             "curve": curve,
             "held_out": evaluate_clip(model, held_out, precision=precision) if held_out else None}
    log.info("demo CLIP: %s (SHA-256 %s) in %.0f s", out_dir / CLIP_FILE, sha, seconds)
    return entry, clip_state


def train_demo_sam(cfg, out_dir: Path, clip_state: dict | None, init_from: Path | None, held_out: list,
                   generator_settings: dict, progress: Callable[[int, dict], None] | None = None,
                   evaluate_every: int = 500, device: torch.device | str = "cpu",
                   precision: str = "fp32") -> dict:
    """Train the demo SAM (``SamTrainingConfig`` ``cfg``) in ``out_dir`` from ``clip_state``
    (read from ``init_from``, recorded; None: trained in this run) and write ``SAM_FILE``.
    Returns the report entry: the held-out point IoU every ``evaluate_every`` steps (also in
    ``SAM_CURVE_FILE``, which a resumed run appends to) and the generator's numbers with
    ``generator_settings`` on the first 12 ``held_out`` images."""
    from pipeline.demo.training.sam import STATE_FILE, evaluate_sam, point_iou, train_sam
    from pipeline.weights import sha256sum

    # the held-out curve survives interruptions (a resumed run appends to it)
    curve_path = out_dir / SAM_CURVE_FILE
    curve = {}
    if curve_path.is_file() and not (out_dir / STATE_FILE).is_file():
        curve_path.unlink()  # a fresh run
    if curve_path.is_file():
        for line in curve_path.read_text().splitlines():
            entry = json.loads(line)
            curve[entry["step"]] = entry

    def evaluate_step(step, train_seconds, stats, sam):
        if held_out:
            points = point_iou(sam, held_out, precision=precision)
            curve[step] = {"step": step, "train_minutes": round(train_seconds / 60, 2),
                           "train_iou": {k[4:]: round(v, 4) for k, v in stats.items() if k.startswith("iou_")},
                           "point_iou": {k: points[k] for k in ("subpart", "part", "whole")}}
            with curve_path.open("a") as f:
                f.write(json.dumps(curve[step]) + "\n")
            log.info("demo SAM at step %d: %s", step, json.dumps(curve[step]))

    start = time.perf_counter()
    sam = train_sam(cfg, clip_state=clip_state, progress=progress, state_dir=out_dir, evaluate_every=evaluate_every,
                    on_evaluate=evaluate_step, device=device, precision=precision)
    seconds = time.perf_counter() - start
    sha = save_weights(cpu_state(sam.state_dict()), out_dir / SAM_FILE)
    entry = {"file": SAM_FILE, "sha256": sha, "config": asdict(cfg), "seconds": round(seconds, 1),
             "clip_init": None if init_from is None else {"file": str(init_from), "sha256": sha256sum(init_from)},
             "curve": [curve[k] for k in sorted(curve) if k <= cfg.steps],
             "held_out": ({**evaluate_sam(sam, held_out[:12], precision=precision, **generator_settings),
                           "n_images": len(held_out[:12])}
                          if held_out else None)}
    log.info("demo SAM: %s (SHA-256 %s) in %.0f s", out_dir / SAM_FILE, sha, seconds)
    return entry
