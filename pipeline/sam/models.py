"""SAM predictors: the official ViT-H/L/B checkpoints, or a tiny random model for offline demos.

Architecture and weights are resolved separately (as open_clip does): every model, tiny included,
is assembled from segment-anything's own modeling classes exactly as its ``_build_sam`` does, so
the tiny demo model exercises the same code path as the real one; only the sizes differ. Weights
are never downloaded here: a real model's checkpoint is a path from params, verified by SHA-256.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from segment_anything import SamPredictor
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom

from pipeline.weights import (
    CheckpointError, check_file, load_torch_file, mismatch_message, sha256sum,
)

CHECKPOINT_SOURCE = (
    "the 'Model Checkpoints' section of https://github.com/facebookresearch/segment-anything "
    "(e.g. https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth)"
)
CHECKPOINT_PARAM = "sam.checkpoint"

#: Seed of the tiny model's random initialisation: fixed so every process (dask workers
#: included) builds the same weights and produces the same masks.
TINY_SEED = 0


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM variant (the arguments of segment-anything's ``_build_sam``)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    image_encoder: str = "sam_vit"
    """``sam_vit``: segment-anything's ``ImageEncoderViT`` (SAM's pixel normalisation);
    ``clip_vit``: :class:`pipeline.sam.clip_encoder.ClipViTEncoder`, an open_clip-shaped ViT
    (CLIP's pixel normalisation) that can start from a trained CLIP's vision tower."""
    checkpoint_name: str | None = None
    """File name of the official checkpoint (None: no checkpoint exists, random init)."""
    checkpoint_sha256: str | None = None
    """Published SHA-256 of the official checkpoint."""


SPECS: dict[str, SamSpec] = {
    # The three official variants: sizes as in segment_anything/build_sam.py.
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31), checkpoint_name="sam_vit_h_4b8939.pth",
                     checkpoint_sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23), checkpoint_name="sam_vit_l_0b3195.pth",
                     checkpoint_sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11), checkpoint_name="sam_vit_b_01ec64.pth",
                     checkpoint_sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    # Embedded default: two CPU cores must run the whole demo DAG in minutes, so the encoder sees
    # 256 px (SamPredictor resizes the long side to the encoder's img_size) on a 16x16 token grid
    # with 32-dim features. Random weights: its masks are meaningless but every step runs.
    "tiny": SamSpec(32, 2, 2, (1,), image_size=256, window_size=4, prompt_embed_dim=32,
                    decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32),
    # Trained on the demo world by `wsss demo-models` (no weights committed yet, so no checksum
    # is pinned here; sam.checkpoint_sha256 can pin one): 256 px input on a 16x16 token grid,
    # 64x64 low-res masks (SAM's own 4 input px per low-res px). The image encoder has the demo
    # CLIP's vision tower's shape (6 blocks of width 128, 2 heads, patch 16) so that training
    # starts from it; the decoder runs once per prompt point, so its width (64, the masks read 8
    # channels) is what two CPU cores can afford for hundreds of points per image.
    "demo": SamSpec(128, 6, 2, (), image_size=256, prompt_embed_dim=64,
                    decoder_mlp_dim=256, decoder_num_heads=2, iou_head_hidden_dim=64,
                    image_encoder="clip_vit", checkpoint_name="sam_demo.pth", checkpoint_sha256=None),
}


SAM_PIXEL_MEAN, SAM_PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _image_encoder(spec: SamSpec) -> tuple[torch.nn.Module, list[float], list[float]]:
    """The spec's image encoder and the pixel mean / std ``Sam.preprocess`` normalises with."""
    if spec.image_encoder == "clip_vit":
        from pipeline.clip.model import CLIP_MEAN, CLIP_STD
        from pipeline.sam.clip_encoder import ClipViTEncoder

        encoder = ClipViTEncoder(img_size=spec.image_size, patch_size=spec.patch_size,
                                 width=spec.encoder_embed_dim, depth=spec.encoder_depth,
                                 heads=spec.encoder_num_heads, out_chans=spec.prompt_embed_dim)
        return encoder, [255.0 * m for m in CLIP_MEAN], [255.0 * s for s in CLIP_STD]
    if spec.image_encoder != "sam_vit":
        raise ValueError(f"unknown SAM image encoder {spec.image_encoder!r} (known: sam_vit, clip_vit)")
    return ImageEncoderViT(
        depth=spec.encoder_depth,
        embed_dim=spec.encoder_embed_dim,
        img_size=spec.image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.encoder_num_heads,
        patch_size=spec.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.encoder_global_attn_indexes,
        window_size=spec.window_size,
        out_chans=spec.prompt_embed_dim,
    ), SAM_PIXEL_MEAN, SAM_PIXEL_STD


class Fp32PositionEmbedding(PositionEmbeddingRandom):
    """SAM's random Fourier positional encoding, computed in float32 whatever the autocast.

    ``sin``/``cos`` of ``2π · coords @ G`` (the dense image PE and every point prompt's PE):
    under bfloat16 autocast the matmul would run in bfloat16 (8-bit mantissa), an error of up to
    a few hundredths of a radian in every angle. Outside autocast it is stock's computation,
    bit for bit (float32 coordinates are not copied).
    """

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        with torch.autocast(coords.device.type, enabled=False):
            return super()._pe_encoding(coords.float())


def build_sam(spec: SamSpec) -> Sam:
    """A randomly initialised :class:`Sam` of the given architecture, in eval mode.

    The prompt encoder's positional encoding is :class:`Fp32PositionEmbedding` (the same module
    and buffer, so random weights and checkpoints are unchanged; its class is swapped rather
    than the module rebuilt, which would draw its random matrix again)."""
    embedding_size = spec.image_size // spec.patch_size
    encoder, pixel_mean, pixel_std = _image_encoder(spec)
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
    )
    sam.prompt_encoder.pe_layer.__class__ = Fp32PositionEmbedding
    return sam.eval()


def _spec(model: str) -> SamSpec:
    if model not in SPECS:
        raise ValueError(f"unknown SAM model {model!r} (known: {', '.join(SPECS)})")
    return SPECS[model]


def expected_sha256(model: str, checkpoint_sha256: str | None) -> str | None:
    """The checksum a checkpoint must have: the one given in params, else the published one."""
    return checkpoint_sha256 or _spec(model).checkpoint_sha256


def verify_checkpoint(
    model: str, checkpoint: str | Path | None, checkpoint_sha256: str | None
) -> Path | None:
    """The verified checkpoint path of a real model (None for ``tiny``); raises CheckpointError.

    Stages call this up front so a missing file fails before any work starts.
    """
    spec = _spec(model)
    if spec.checkpoint_name is None:
        return None
    expected = expected_sha256(model, checkpoint_sha256)
    what = f"SAM {model} ({spec.checkpoint_name})"
    check_file(checkpoint, expected, what, CHECKPOINT_SOURCE, CHECKPOINT_PARAM)
    # Hash once per process and file version: a ViT-H file is 2.5 GB and each worker verifies it.
    stat = os.stat(checkpoint)
    actual = _cached_sha256(str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns)
    if expected and actual != expected.lower():
        raise CheckpointError(mismatch_message(checkpoint, actual, expected, what,
                                               CHECKPOINT_SOURCE, CHECKPOINT_PARAM))
    return Path(checkpoint)


@lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256sum(path)


def build_sam_predictor(
    model: str,
    checkpoint: str | Path | None,
    checkpoint_sha256: str | None,
    device: Any = "cpu",
    mask_threshold: float = 0.0,
) -> SamPredictor:
    """A :class:`SamPredictor` for ``model`` (``vit_h``, ``vit_l``, ``vit_b`` or ``tiny``).

    Real models load ``checkpoint`` after verifying it against ``checkpoint_sha256`` (``None``:
    the published checksum of the official file); a missing or wrong file raises
    :class:`pipeline.weights.CheckpointError` naming the path, the checksum, the params key and
    where to get it. ``tiny`` ignores the checkpoint and is randomly initialised with a fixed seed.

    ``mask_threshold`` is the logit threshold that binarises SAM's masks (SAM's own is 0.0).
    """
    spec = _spec(model)
    if spec.checkpoint_name is None:
        # fork_rng: seed the init without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            sam = build_sam(spec)
    else:
        path = verify_checkpoint(model, checkpoint, checkpoint_sha256)
        sam = build_sam(spec)
        state = load_torch_file(path, f"SAM {model}", CHECKPOINT_SOURCE)
        try:
            sam.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(
                f"SAM checkpoint {path} does not fit the {model} architecture "
                f"({first[1].strip() if len(first) > 1 else first[0][:160]}): is sam.model right?"
            ) from exc
    sam.mask_threshold = float(mask_threshold)
    sam.to(torch.device(device))
    return SamPredictor(sam)


def sam_provenance(model: str, checkpoint: str | Path | None, checkpoint_sha256: str | None) -> dict:
    """What produced the masks: model name, checkpoint path and SHA-256, whether it is trained."""
    spec = _spec(model)
    untrained = spec.checkpoint_name is None
    return {
        "model": model,
        "checkpoint": None if untrained or checkpoint is None else str(checkpoint),
        "sha256": "random-init" if untrained else expected_sha256(model, checkpoint_sha256),
        "untrained": untrained,
    }
