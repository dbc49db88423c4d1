"""A CLIP-shaped ViT image encoder for segment-anything's ``Sam`` (the demo SAM's encoder).

The trunk is open_clip's vision transformer as the demo CLIP has it (``conv1`` patch embedding,
class token, positional embedding, ``ln_pre``, open_clip ``Transformer`` blocks with QuickGELU),
run on SAM's square input (256 px -> 16 x 16 tokens), followed by SAM's own neck (1x1 conv,
LayerNorm2d, 3x3 conv, LayerNorm2d) down to the prompt embedding width. The class token takes
part in attention, as in CLIP, and is dropped at the output. Keeping CLIP's parameter layout lets
:func:`load_clip_visual` initialise the trunk from a trained demo CLIP, as real SAM starts from a
pretrained (MAE) encoder; ``Sam``'s ``PromptEncoder`` and ``MaskDecoder`` are unchanged.

Inputs are normalised by ``Sam.preprocess`` with the pixel mean / std the spec gives the model,
which for this encoder are CLIP's (see :func:`pipeline.sam.models.build_sam`).
"""
from __future__ import annotations

import torch
from open_clip.transformer import QuickGELU, Transformer
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class ClipViTEncoder(nn.Module):
    def __init__(self, img_size: int = 256, patch_size: int = 16, width: int = 128, depth: int = 6,
                 heads: int = 2, out_chans: int = 64):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.grid_size = (self.grid, self.grid)  # open_clip's name: the positional embedding's grid
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + self.grid * self.grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio=4.0, act_layer=QuickGELU)
        self.neck = nn.Sequential(
            nn.Conv2d(width, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.tokens(x))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's patch tokens (B, width, h, w) of a normalised input whose sides are
        multiples of the patch size. The positional embedding is resized to the h x w grid as the
        pipeline resizes CLIP's (SAM's square input is always the encoder's own grid)."""
        return self.token_grid(self.sequence(x), (x.shape[-2] // self.patch_size,
                                                  x.shape[-1] // self.patch_size))

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's output sequence (B, 1 + h*w, width), class token first."""
        from pipeline.clip.model import vision_embed

        return self.transformer(vision_embed(self, x))  # CLIP's patch + class + position, ln_pre

    @staticmethod
    def token_grid(sequence: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The patch tokens of a :meth:`sequence` as (B, width, h, w)."""
        return sequence[:, 1:].transpose(1, 2).reshape(sequence.shape[0], -1, *grid)


def load_clip_visual(encoder: ClipViTEncoder, clip_state: dict) -> list[str]:
    """Copy an open_clip state dict's ``visual.*`` trunk into ``encoder`` (the positional
    embedding resized to the encoder's grid as the pipeline resizes it at inference). Returns the
    names of the encoder parameters it set; the neck keeps its initialisation."""
    from pipeline.clip.model import resize_pos_embed

    visual = {k[len("visual."):]: v.float() for k, v in clip_state.items() if k.startswith("visual.")}
    pos = visual["positional_embedding"]
    side = int(round((pos.shape[0] - 1) ** 0.5))
    visual["positional_embedding"] = resize_pos_embed(pos, (side, side), (encoder.grid, encoder.grid))
    own = encoder.state_dict()
    taken = {k: v for k, v in visual.items() if k in own and not k.startswith("neck.")}
    missing = [k for k in own if not k.startswith("neck.") and k not in taken]
    if missing:
        raise ValueError(f"the CLIP state dict lacks encoder weights: {', '.join(missing[:5])}")
    for k, v in taken.items():
        if v.shape != own[k].shape:
            raise ValueError(f"CLIP weight {k} has shape {tuple(v.shape)}, the encoder {tuple(own[k].shape)}")
    encoder.load_state_dict({**own, **taken})
    return sorted(taken)
