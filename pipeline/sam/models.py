"""SAM predictors: the official ViT-H/L/B checkpoints, or a tiny random model for offline demos.

Architecture and weights are resolved separately (as open_clip does: :mod:`pipeline.sam.specs`
and :mod:`pipeline.sam.pretrained`): every model, tiny included, is assembled from
segment-anything's own modeling classes exactly as its ``_build_sam`` does, so the tiny demo
model exercises the same code path as the real one; only the sizes differ. Weights
are never downloaded here: a real model's checkpoint is a path from params, verified by SHA-256.
"""
from __future__ import annotations

from functools import partial
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

from pipeline.sam.pretrained import SamWeights, pretrained_weights
from pipeline.sam.specs import SamSpec, sam_spec
from pipeline.weights import (
    CheckpointError, check_file, load_torch_file, mismatch_message, read_checkpoint, sha256sum,
)

CHECKPOINT_SOURCE = (
    "the 'Model Checkpoints' section of https://github.com/facebookresearch/segment-anything "
    "(e.g. https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth)"
)
CHECKPOINT_PARAM = "sam.checkpoint"

#: Seed of the tiny model's random initialisation: fixed so every process (dask workers
#: included) builds the same weights and produces the same masks.
TINY_SEED = 0


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


def _weights(model: str) -> SamWeights | None:
    """The known checkpoint of ``model`` (None: random init); ValueError for an unknown model."""
    sam_spec(model)
    return pretrained_weights(model)


def expected_sha256(model: str, checkpoint_sha256: str | None) -> str | None:
    """The checksum a checkpoint must have: the one given in params, else the published one."""
    weights = _weights(model)
    return checkpoint_sha256 or (weights.sha256 if weights is not None else None)


def verify_checkpoint(
    model: str, checkpoint: str | Path | None, checkpoint_sha256: str | None
) -> Path | None:
    """The verified checkpoint path of a real model (None for ``tiny``); raises CheckpointError.

    Stages call this up front so a missing file fails before any work starts.
    """
    weights = _weights(model)
    if weights is None:
        return None
    expected = expected_sha256(model, checkpoint_sha256)
    what = f"SAM {model} ({weights.file_name})"
    check_file(checkpoint, expected, what, CHECKPOINT_SOURCE, CHECKPOINT_PARAM)
    actual = sha256sum(checkpoint)  # once per process and file version: a ViT-H file is 2.5 GB
    if expected and actual != expected.lower():
        raise CheckpointError(mismatch_message(checkpoint, actual, expected, what,
                                               CHECKPOINT_SOURCE, CHECKPOINT_PARAM))
    return Path(checkpoint)


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
    spec = sam_spec(model)
    if pretrained_weights(model) is None:
        # fork_rng: seed the init without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            sam = build_sam(spec)
    else:
        # Read once, checked on the bytes loaded: a file swapped after the check is never loaded.
        data, _ = read_checkpoint(checkpoint, expected_sha256(model, checkpoint_sha256),
                                  f"SAM {model} ({pretrained_weights(model).file_name})",
                                  CHECKPOINT_SOURCE, CHECKPOINT_PARAM)
        path = Path(checkpoint)
        state = load_torch_file(path, f"SAM {model}", CHECKPOINT_SOURCE, data=data)
        del data  # the raw bytes go before the network is built (a ViT-H file is 2.5 GB)
        sam = build_sam(spec)
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
    untrained = _weights(model) is None
    return {
        "model": model,
        "checkpoint": None if untrained or checkpoint is None else str(checkpoint),
        "sha256": "random-init" if untrained else expected_sha256(model, checkpoint_sha256),
        "untrained": untrained,
    }
