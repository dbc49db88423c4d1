"""The final segmenter (algorithms.md §9): DeepLabV3+ built by name, saved, loaded, and run.

Like open_clip's factory, architectures are named configs and weights are resolved separately:
``deeplabv3plus_r101`` is the paper's model (ResNet-101 encoder, ImageNet-1k weights read from a
local file), ``tiny`` is the embedded default (ResNet-18 encoder, narrow decoder, random weights).
Both go through :func:`build_segmenter`; nothing here downloads.

Inference (:func:`predict_probs`) is multi-scale + flip: softmax probabilities of every scale and
flip, resized back to the original size and averaged. SAMS post-processing of those probabilities
is :func:`pipeline.seeds.sams.sams_postprocess`.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.weights import CheckpointError, resolve_checkpoint

#: Normalisation of the ImageNet-pretrained encoders (torchvision's statistics, RGB 0-1 scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Label of pixels the loss ignores (VOC boundary band, and the padding of augmented crops).
IGNORE_INDEX = 255

#: Version of the ``model.pt`` layout written by :func:`save_segmenter`.
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class SegmenterArch:
    """A named DeepLabV3+ configuration (segmentation_models_pytorch)."""

    encoder_name: str
    """smp encoder name (torchvision ResNet layout, so ImageNet state dicts load directly)."""
    decoder_channels: int
    """Channels of the ASPP/decoder convolutions (DeepLabV3+: 256)."""
    encoder_output_stride: int
    """Output stride of the encoder; inputs are padded to a multiple of it."""
    needs_encoder_weights: bool
    """True when the model is meaningless without its ImageNet encoder weights (paper runs)."""


ARCHS: dict[str, SegmenterArch] = {
    # Paper: DeepLabV3+ ResNet-101 (ImageNet-1k). Output stride 16 is DeepLabV3+'s training default.
    "deeplabv3plus_r101": SegmenterArch("resnet101", 256, 16, True),
    # Embedded default: the same network family, small enough to train on two CPU cores.
    "tiny": SegmenterArch("resnet18", 32, 16, False),
}

ENCODER_WEIGHTS_SOURCE = (
    "torchvision's ImageNet-1k ResNet-101 weights (https://download.pytorch.org/models/"
    "resnet101-63fe2227.pth) or any torchvision-layout ResNet-101 state dict"
)


def build_segmenter(
    model: str,
    num_classes: int,
    encoder_weights: str | os.PathLike | None = None,
    encoder_weights_sha256: str | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """A DeepLabV3+ network with ``num_classes`` outputs (background + foreground classes).

    Args:
        model: a key of :data:`ARCHS`.
        num_classes: output channels, K + 1.
        encoder_weights: path of a torchvision-layout ImageNet state dict for the encoder
            (``fc.*`` entries are ignored). Required for models that need it; optional otherwise.
        encoder_weights_sha256: expected checksum of that file (None: not checked).
        seed: seed of the random initialisation, so the tiny model is the same on every machine.

    Raises:
        ValueError: unknown model name.
        pipeline.weights.CheckpointError: required encoder weights missing, wrong checksum, or a
            state dict that does not fit the encoder.
    """
    arch = _arch(model)
    weights_path = None
    if encoder_weights is not None or arch.needs_encoder_weights:
        weights_path = resolve_checkpoint(
            encoder_weights, encoder_weights_sha256, f"{arch.encoder_name} ImageNet encoder",
            ENCODER_WEIGHTS_SOURCE, "segmenter.encoder_weights",
        )
    net = _network(arch, num_classes, seed)
    if weights_path is not None:
        _load_encoder_weights(net.encoder, weights_path)
    return net


def _arch(model: str) -> SegmenterArch:
    if model not in ARCHS:
        raise ValueError(f"unknown segmenter model {model!r} (known: {', '.join(sorted(ARCHS))})")
    return ARCHS[model]


def _network(arch: SegmenterArch, num_classes: int, seed: int) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    # fork_rng: a seeded init that leaves the caller's random stream alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return smp.DeepLabV3Plus(
            encoder_name=arch.encoder_name,
            encoder_weights=None,  # never let smp download; weights are loaded separately
            encoder_output_stride=arch.encoder_output_stride,
            decoder_channels=arch.decoder_channels,
            classes=num_classes,
        )


def _load_encoder_weights(encoder: torch.nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise CheckpointError(f"cannot read encoder weights {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        # nn.Module's own method: smp's encoder override drops the missing/unexpected report.
        missing, unexpected = torch.nn.Module.load_state_dict(encoder, state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(
            f"encoder weights {path} do not fit the encoder ({str(exc).splitlines()[-1].strip()}); "
            f"expected {ENCODER_WEIGHTS_SOURCE}"
        ) from exc
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise CheckpointError(
            f"encoder weights {path} do not fit the encoder ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {bad!r}); expected {ENCODER_WEIGHTS_SOURCE}"
        )


# -- checkpoints --------------------------------------------------------------------------------


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_segmenter(
    path: str | os.PathLike, net: torch.nn.Module, model: str, class_names: Sequence[str]
) -> None:
    """Write a trained segmenter (architecture name, class names, weights) as one file."""
    save_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "model": model,
            "class_names": list(class_names),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        },
        path,
    )


def load_segmenter(path: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """A segmenter written by :func:`save_segmenter`, in eval mode on ``device``, and its metadata
    (``model``, ``class_names``). Encoder weights come from the file, so none are needed here."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no trained segmenter at {path} (run `wsss train-segmenter`)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a segmenter checkpoint of format {CHECKPOINT_FORMAT}")
    # The file holds every weight, so the ImageNet encoder file is not needed again.
    net = _network(_arch(ckpt["model"]), len(ckpt["class_names"]) + 1, seed=0)
    net.load_state_dict(ckpt["state_dict"])
    net.to(device).eval()
    return net, {"model": ckpt["model"], "class_names": list(ckpt["class_names"])}


# -- tensors ------------------------------------------------------------------------------------


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) or (H, W, 3) uint8 RGB -> (B, 3, H, W) float32, ImageNet-normalised."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def forward_padded(net: torch.nn.Module, x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Logits (B, K+1, H, W) of normalised input (B, 3, H, W) of any size.

    DeepLabV3+ needs sides divisible by the encoder's output stride; the input is zero-padded
    (zero = the mean colour after normalisation) at the bottom/right and the logits cropped back.
    """
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return net(x)[..., :H, :W]


@torch.no_grad()
def predict_probs(
    net: torch.nn.Module,
    image: np.ndarray,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    multiple: int = 16,
) -> torch.Tensor:
    """Multi-scale (+ flip) softmax probabilities (K+1, H, W) float32 on the CPU.

    Args:
        net: a segmenter in eval mode (its device is used).
        image: (H, W, 3) uint8 RGB.
        scales: the image is resized (bilinear) by each factor; §9 uses multi-scale inference
            (the common DeepLabV3+ set is 0.5, 0.75, 1.0, 1.25, 1.5).
        flip: also run each scale horizontally flipped (and flip the result back).
        multiple: inputs are padded to a multiple of this (the encoder's output stride).

    Softmax probabilities (not logits) of every view are resized back to H x W (bilinear,
    align_corners=False) and averaged, so the result sums to 1 over classes at every pixel.
    """
    device = next(net.parameters()).device
    H, W = image.shape[:2]
    x = to_input(image).to(device)
    total = None
    n_views = 0
    for s in scales:
        size = (max(1, round(H * s)), max(1, round(W * s)))
        xs = x if size == (H, W) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flip:
            xs = torch.cat([xs, xs.flip(-1)], 0)
        probs = forward_padded(net, xs, multiple).softmax(dim=1)
        if flip:
            probs = torch.stack([probs[0], probs[1].flip(-1)])
        if size != (H, W):
            probs = F.interpolate(probs, size=(H, W), mode="bilinear", align_corners=False)
        total = probs.sum(0) if total is None else total + probs.sum(0)
        n_views += probs.shape[0]
    return (total / n_views).float().cpu()
