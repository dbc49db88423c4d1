"""The final segmenter (algorithms.md §9): DeepLabV3+ built by name, saved, loaded, and run.

Like open_clip's factory, architectures are named configs (:mod:`pipeline.segmenter.archs`) and
weights are resolved separately: ``deeplabv3plus_r101`` is the paper's model (ResNet-101 encoder,
ImageNet-1k weights read from a local file), ``tiny`` is the embedded default (ResNet-18 encoder,
narrow decoder, random weights). Both go through :func:`build_segmenter`; nothing here downloads.
The encoder's output stride is an argument: §9's ``d3p-r1d8`` runs used 8 (the last two ResNet
stages dilated instead of strided).

Inference (:func:`predict_probs`) is multi-scale + flip: softmax probabilities of every scale and
flip, resized back to the original size and averaged. SAMS post-processing of those probabilities
is :func:`pipeline.seeds.sams.sams_postprocess`. Forward passes run under
:func:`pipeline.precision.autocast`; softmax and everything after it stay fp32.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import tensorfile
from pipeline.precision import autocast
from pipeline.segmenter.archs import (
    ENCODER_WEIGHTS_SOURCE,
    REFERENCE_OUTPUT_STRIDE,
    SegmenterArch,
    get_arch,
)
from pipeline.segmenter.inputs import to_input
from pipeline.weights import CheckpointError, check_digest, load_torch_file, read_checkpoint

#: Label of pixels the loss ignores (VOC boundary band, and the padding of augmented crops).
IGNORE_INDEX = 255

#: Version of the segmenter file layout written by :func:`save_segmenter`. Format 2 added the
#: output stride (format 1 files were all built at 16) and the training ``info``.
CHECKPOINT_FORMAT = 2


def build_segmenter(
    model: str,
    num_classes: int,
    encoder_weights: str | os.PathLike | None = None,
    encoder_weights_sha256: str | None = None,
    seed: int = 0,
    output_stride: int = REFERENCE_OUTPUT_STRIDE,
) -> torch.nn.Module:
    """A DeepLabV3+ network with ``num_classes`` outputs (background + foreground classes).

    Args:
        model: a registered architecture (:func:`pipeline.segmenter.archs.get_arch`).
        num_classes: output channels, K + 1.
        encoder_weights: path of a torchvision-layout ImageNet state dict for the encoder
            (``fc.*`` entries are ignored). Required for models that need it; optional otherwise.
        encoder_weights_sha256: expected checksum of that file (None: not checked).
        seed: seed of the random initialisation, so the tiny model is the same on every machine.
        output_stride: 8 (§9) or 16: input size / encoder output size. Inputs are padded to a
            multiple of it (:func:`input_multiple`). Weights do not depend on it (dilation only).

    Raises:
        pipeline.config.ConfigError: unknown model name (a ValueError).
        ValueError: output stride not supported by the architecture.
        pipeline.weights.CheckpointError: required encoder weights missing, wrong checksum, or a
            state dict that does not fit the encoder.
    """
    arch = get_arch(model)
    _check_output_stride(output_stride, arch)
    if arch.family == "clip_vit" and not encoder_weights_sha256 and encoder_weights is not None:
        from pipeline.clip.pretrained import known_sha256

        # a CLIP file whose checksum is known (the committed demo CLIP) is verified like in clip.*
        encoder_weights_sha256 = known_sha256(arch.encoder_name, encoder_weights)
    state = None
    if encoder_weights is not None or arch.needs_encoder_weights:
        what = "ImageNet encoder" if arch.family == "deeplabv3plus" else "pretrained encoder"
        weights_path, state = _read_encoder_weights(
            encoder_weights, encoder_weights_sha256, arch, f"{arch.encoder_name} {what}")
    net = _network(arch, num_classes, seed, output_stride)
    if state is not None:
        if arch.family == "clip_vit":
            _load_clip_encoder_weights(net.encoder, weights_path, state, arch)
        else:
            _load_encoder_weights(net.encoder, weights_path, state)
    return net


def _read_encoder_weights(path, sha256: str | None, arch: SegmenterArch, what: str) -> tuple[Path, Any]:
    """The encoder's state, from the file's bytes read once and checked (pinned checksum, else
    torchvision's name rule) before they are loaded."""
    param = "segmenter.encoder_weights"
    data, actual = read_checkpoint(path, sha256, what, arch.weights_source, param)
    if not sha256:
        check_digest(path, actual, None, what, arch.weights_source, param)
    load_what = ("ImageNet encoder" if arch.family == "deeplabv3plus"
                 else f"{arch.encoder_name} pretrained encoder")
    source = ENCODER_WEIGHTS_SOURCE if arch.family == "deeplabv3plus" else arch.weights_source
    return Path(path), load_torch_file(path, load_what, source, data=data)


def _check_output_stride(output_stride: int, arch: SegmenterArch) -> None:
    if output_stride not in arch.output_strides:
        raise ValueError(f"segmenter output stride must be one of {arch.output_strides}, got {output_stride!r}")


def _network(arch: SegmenterArch, num_classes: int, seed: int, output_stride: int) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    # fork_rng: a seeded init that leaves the caller's random stream alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch.family == "clip_vit":
            return _clip_vit_network(arch, num_classes)
        return smp.DeepLabV3Plus(
            encoder_name=arch.encoder_name,
            encoder_weights=None,  # never let smp download; weights are loaded separately
            encoder_output_stride=output_stride,
            decoder_channels=arch.decoder_channels,
            classes=num_classes,
        )


def _clip_vit_network(arch: SegmenterArch, num_classes: int) -> torch.nn.Module:
    import json

    from pipeline.clip.model import MODEL_CONFIG_DIR
    from pipeline.segmenter.clip_vit import ClipViTSegmenter

    vision = json.loads((MODEL_CONFIG_DIR / f"{arch.encoder_name}.json").read_text())["vision_cfg"]
    return ClipViTSegmenter(
        num_classes, width=vision["width"], depth=vision["layers"],
        heads=vision["width"] // vision.get("head_width", 64), patch_size=vision["patch_size"],
        image_size=vision["image_size"], channels=arch.decoder_channels,
    )


def _load_clip_encoder_weights(encoder: torch.nn.Module, path: Path, state: Any, arch: SegmenterArch) -> None:
    from pipeline.sam.clip_encoder import load_clip_visual

    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        load_clip_visual(encoder, state)
    except (ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"encoder weights {path} do not fit the {arch.encoder_name} vision tower "
                              f"({exc}); expected {arch.weights_source}") from exc


def _load_encoder_weights(encoder: torch.nn.Module, path: Path, state: Any) -> None:
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
    """``torch.save`` of tensors and plain data to a temporary name, then rename: readers never
    see half a file, and every file reads back with ``weights_only=True``."""
    tensorfile.save_atomic(obj, path)


def save_segmenter(
    path: str | os.PathLike,
    net: torch.nn.Module,
    model: str,
    class_names: Sequence[str],
    info: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a trained segmenter (architecture name, output stride, class names, weights) as one
    file. ``info`` is JSON-able training metadata (which iteration, its val mIoU, why it was
    chosen); ``state_dict`` replaces the weights of ``net`` (e.g. a best state kept aside)."""
    state = net.state_dict() if state_dict is None else state_dict
    save_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "model": model,
            "output_stride": input_multiple(net),
            "class_names": list(class_names),
            "info": dict(info or {}),
            "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        },
        path,
    )


def load_segmenter(path: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """A segmenter written by :func:`save_segmenter`, in eval mode on ``device``, and its metadata
    (``model``, ``output_stride``, ``class_names``, ``info``). Encoder weights come from the file,
    so none are needed here."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no trained segmenter at {path} (run `wsss train-segmenter`)")
    # a file holding anything but tensors and plain data: TensorFileError, one line naming it
    ckpt = tensorfile.load(path, "segmenter checkpoint", "rerun `wsss train-segmenter`")
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path} is not a segmenter checkpoint (format 1 to {CHECKPOINT_FORMAT})")
    # Format 1 did not record the stride; every format-1 file was trained at 16. The weights
    # would load at either stride, so guessing would silently change the predictions.
    output_stride = int(ckpt.get("output_stride", 16))
    net = _network(get_arch(ckpt["model"]), len(ckpt["class_names"]) + 1, 0, output_stride)
    net.load_state_dict(ckpt["state_dict"])
    net.to(device).eval()
    meta = {"model": ckpt["model"], "output_stride": output_stride,
            "class_names": list(ckpt["class_names"]), "info": dict(ckpt.get("info", {}))}
    return net, meta


# -- tensors ------------------------------------------------------------------------------------


def input_multiple(net: torch.nn.Module) -> int:
    """The side multiple ``net`` needs: its encoder's output stride (8 or 16). The stem and
    layer1/layer2 halve the size 3 times (input/8), layer3 and layer4 once more each unless
    dilated; the decoder upsamples the ASPP output to the stride-4 features, which matches only
    when every halving was exact."""
    return int(getattr(net, "output_stride", None) or net.encoder.output_stride)


def forward_padded(net: torch.nn.Module, x: torch.Tensor, multiple: int | None = None) -> torch.Tensor:
    """Logits (B, K+1, H, W) of normalised input (B, 3, H, W) of any size.

    DeepLabV3+ needs sides divisible by the encoder's output stride (``multiple``; default
    :func:`input_multiple`); the input is zero-padded (zero = the mean colour after
    normalisation) at the bottom/right to the next multiple only, and the logits cropped back.
    """
    multiple = input_multiple(net) if multiple is None else multiple
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
    precision: str = "fp32",
) -> torch.Tensor:
    """Multi-scale (+ flip) softmax probabilities (K+1, H, W) float32 on the CPU.

    Args:
        net: a segmenter in eval mode (its device is used).
        image: (H, W, 3) uint8 RGB.
        scales: the image is resized (bilinear) by each factor; §9 uses multi-scale inference
            (the common DeepLabV3+ set is 0.5, 0.75, 1.0, 1.25, 1.5).
        flip: also run each scale horizontally flipped (and flip the result back).
        precision: ``fp32`` or ``bf16``, the network forward pass only (``compute.precision``).

    Every view is padded to the network's :func:`input_multiple`. Softmax probabilities (fp32,
    not logits) of every view are resized back to H x W (bilinear, align_corners=False) and
    averaged, so the result sums to 1 over classes at every pixel.
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
        with autocast(device, precision):
            logits = forward_padded(net, xs)
        probs = logits.float().softmax(dim=1)
        if flip:
            probs = torch.stack([probs[0], probs[1].flip(-1)])
        if size != (H, W):
            probs = F.interpolate(probs, size=(H, W), mode="bilinear", align_corners=False)
        total = probs.sum(0) if total is None else total + probs.sum(0)
        n_views += probs.shape[0]
    return (total / n_views).float().cpu()



@torch.no_grad()
def predict_labels(net: torch.nn.Module, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Single-scale argmax labels (B, H, W) int64 on the CPU of a batch of equal-size images,
    normalised by :func:`to_input` on the CPU (B, 3, H, W): per image the argmax of
    ``predict_probs(net, image, (1.0,), flip=False)``, computed the same way (normalised on the
    CPU, softmax in fp32, then argmax: ties go to the lower class), in one forward pass.

    On the CPU each image's labels equal its batch-1 labels exactly (tested); a GPU library may
    choose another kernel for another batch size, which changes logits at rounding level only.
    A pinned ``x`` is copied to the device without blocking.
    """
    device = next(net.parameters()).device
    x = x.to(device, non_blocking=True)
    with autocast(device, precision):
        logits = forward_padded(net, x)
    return logits.float().softmax(dim=1).argmax(dim=1).cpu()
