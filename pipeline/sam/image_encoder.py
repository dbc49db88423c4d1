"""SAM's image encoder over several crops of one image at once (issue 32, item 2).

The automatic generator encodes the whole image and then each crop of its crop layers (the
paper's one layer: four crops); stock ``SamPredictor.set_image`` encodes them one by one. Every
crop is resized to the encoder's long side and padded to its square input, so the crops of an
image stack into one batch: :func:`encode_crops` runs them through the encoder together, as many
per pass as a memory budget allows (:func:`crops_per_pass`, the generator's
``max_batch_memory_mb``), and :func:`set_features` hands each crop's embedding to the predictor
as ``set_image`` would have left it.

The results are the bits ``set_image`` gives, one crop at a time (tests/test_sam_encoder_batch.py):
the trunk (patch embedding, blocks) gives each image the same bits in a batch as alone (checked on
CPU for ViT-B, the tiny SAM and the CLIP-shaped demo encoder), but the neck's convolutions need
not (oneDNN picks its algorithm by batch and memory layout: the tiny SAM's 3x3 convolution ends up
to 1.7e-6 apart over a batch), so the neck runs image by image, on each image's tokens laid out
as a pass over that image alone would lay them out: one small convolution per crop.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT

from pipeline.sam.clip_encoder import ClipViTEncoder

#: Attention-score tensors (heads x tokens x tokens floats) alive at once in a global-attention
#: block: the scores, the relative-position sum and the softmax.
ATTENTION_SCORE_TENSORS = 3
#: Token tensors (tokens x width floats) alive at once in a block (its input, residual, norm,
#: q/k/v and the MLP's hidden layer at 4x width).
TOKEN_TENSORS = 12


def _encoder_shape(encoder: torch.nn.Module) -> tuple[int, int, int]:
    """(tokens, width, heads) of a SAM image encoder, read off its modules."""
    side = encoder.img_size
    patch = getattr(encoder, "patch_size", None)
    if patch is None:  # ImageEncoderViT keeps it in its patch embedding's convolution
        patch = encoder.patch_embed.proj.kernel_size[0]
    width = encoder.neck[0].in_channels
    heads = max((getattr(m, "num_heads", 0) for m in encoder.modules()), default=1) or 1
    return (side // patch) ** 2, width, heads


def encoder_image_bytes(sam) -> int:
    """Estimated peak working memory of one image through ``sam.image_encoder``, in bytes
    (float32; the largest block, a global attention's scores, dominates: ViT-H at 1024 px about
    3.2 GiB, ViT-B 2.4 GiB)."""
    tokens, width, heads = _encoder_shape(sam.image_encoder)
    return 4 * (ATTENTION_SCORE_TENSORS * heads * tokens * tokens + TOKEN_TENSORS * tokens * width)


def crops_per_pass(budget_bytes: int, sam, n_crops: int) -> int:
    """How many crops go through the encoder together: as many as fit ``budget_bytes`` (at least
    one, at most ``n_crops``)."""
    return max(1, min(int(n_crops), int(budget_bytes) // encoder_image_bytes(sam)))


def _input(predictor, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """``set_image``'s model input (1, 3, S, S) of ``image`` and its resized size."""
    if image.shape[-1] == 3 and predictor.model.image_format != "RGB":
        image = image[..., ::-1]
    resized = predictor.transform.apply_image(image)
    tensor = torch.as_tensor(resized, device=predictor.device).permute(2, 0, 1).contiguous()[None]
    return predictor.model.preprocess(tensor), tuple(tensor.shape[-2:])


def _trunk(encoder: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor] | None:
    """Each image's tokens before the encoder's neck, (1, width, h, w) in the memory layout of a
    pass over that image alone (the neck's convolutions choose their algorithm by strides); None
    for an encoder of unknown layout (it then runs image by image)."""
    if isinstance(encoder, ImageEncoderViT):
        x = encoder.patch_embed(x)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks:
            x = block(x)
        return [x[i:i + 1].permute(0, 3, 1, 2) for i in range(len(x))]
    if isinstance(encoder, ClipViTEncoder):
        grid = (x.shape[-2] // encoder.patch_size, x.shape[-1] // encoder.patch_size)
        x = encoder.sequence(x)
        return [encoder.token_grid(x[i:i + 1], grid) for i in range(len(x))]
    return None


@torch.no_grad()
def encode_crops(predictor, crops: Sequence[np.ndarray]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """The image embedding (1, C, h, w) and input size of each of ``crops`` (H, W, 3) uint8 RGB
    arrays of any sizes, from one encoder pass over all of them: what ``predictor.set_image(crop)``
    leaves in ``predictor.features`` and ``predictor.input_size``."""
    inputs, sizes = zip(*(_input(predictor, crop) for crop in crops))
    encoder = predictor.model.image_encoder
    tokens = _trunk(encoder, torch.cat(inputs)) if len(inputs) > 1 else None
    if tokens is None:
        return [(encoder(x), size) for x, size in zip(inputs, sizes)]
    return [(encoder.neck(t), size) for t, size in zip(tokens, sizes)]


def set_features(predictor, features: torch.Tensor, original_size: tuple[int, int],
                 input_size: tuple[int, int]) -> None:
    """Leave ``predictor`` as ``set_image`` of an ``original_size`` image would: its embedding
    ``features`` (from :func:`encode_crops`) and the sizes the decoder maps masks back with."""
    predictor.reset_image()
    predictor.original_size = tuple(original_size)
    predictor.input_size = tuple(input_size)
    predictor.features = features
    predictor.is_image_set = True
