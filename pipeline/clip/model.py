"""Frozen CLIP image encoder split at its last transformer block (algorithms.md §2, §3).

The split lets stages cache the residual-stream input of the last block once per image/view and
run only the last block (forward, and Grad-CAM's double backward) when training prompts or
computing CAMs. The real model is open_clip's ``ViT-B-16`` with OpenAI weights from a local file;
the embedded default is a tiny config registered with open_clip and built by the same
``open_clip.create_model`` call with a fixed seed (random weights, no download).

Attention is computed here from each block's ``in_proj`` weights rather than through
``nn.MultiheadAttention``: it gives the attention maps CAA needs, and plain matmul + softmax is
twice differentiable on every device (the fused SDPA kernels are not), which Grad-CAM with
``create_graph`` needs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

# OpenAI CLIP's image normalisation (algorithms.md §2).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH = 16

TINY_MODEL = "wsss-tiny-ViT-16"
"""Tiny stand-in with ViT-B/16's structure (8 vision layers, so the last-8-block attention mean
is meaningful; the real tokenizer's vocabulary and context; QuickGELU like the OpenAI weights)."""
MODEL_ALIASES = {"tiny": TINY_MODEL}
"""Short names accepted for ``clip.model``."""
MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
"""The project's own open_clip architectures, one JSON model config each (open_clip's format)."""


def register_model_configs() -> None:
    """Make every config of ``MODEL_CONFIG_DIR`` a named open_clip architecture (idempotent)."""
    known = set(open_clip.list_models())
    if any(p.stem not in known for p in MODEL_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def create_clip(
    model_name: str,
    checkpoint: str | Path | None = None,
    pretrained_tag: str | None = None,
    seed: int = 0,
    checkpoint_sha256: str | None = None,
) -> "FrozenClip":
    """Build the frozen CLIP through ``open_clip.create_model``.

    Args:
        model_name: ``"ViT-B-16"`` (the paper's) or ``"tiny"`` (random, for the embedded default).
        checkpoint: local OpenAI-weights file for real models, read once and checked on the bytes
            loaded (:func:`load_weights`).
        pretrained_tag: open_clip tag (e.g. ``"openai"``); open_clip may download it, so only
            when the user allows it.
        seed: torch seed of the random initialisation (tiny / unweighted models are then
            identical in every process, which the per-image workers rely on).
        checkpoint_sha256: ``clip.checkpoint_sha256``, the checksum the file must have (None:
            not pinned; a TorchScript archive then loads only if it is a known official file).
    """
    name = MODEL_ALIASES.get(model_name, model_name)
    register_model_configs()
    pretrained = None if checkpoint is not None else pretrained_tag
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The OpenAI weights were trained with QuickGELU; open_clip's ViT-B-16 config defaults to
        # GELU, so the activation is forced whenever real weights are loaded.
        model = open_clip.create_model(
            name, pretrained=pretrained, force_quick_gelu=checkpoint is not None or pretrained is not None
        )
    if checkpoint is not None:
        load_weights(model, checkpoint, checkpoint_sha256)
    return FrozenClip(model, untrained=checkpoint is None and pretrained is None)


CHECKPOINT_SOURCE = "https://huggingface.co/timm/vit_base_patch16_clip_224.openai or OpenAI's ViT-B-16.pt"


def load_weights(model: torch.nn.Module, checkpoint: str | Path, sha256: str | None = None) -> None:
    """Load an OpenAI-format CLIP state dict into an open_clip model, from either file format:
    a ``torch.save``d state dict (open_clip_pytorch_model.bin) or OpenAI's TorchScript archive
    (ViT-B-16.pt). The file is read once and its SHA-256 checked on those bytes (``sha256``:
    pinned), which are the ones loaded. A TorchScript archive runs code from the file, so it loads
    only when its checksum is pinned or a known official file's (:func:`check_torchscript`). A
    truncated or foreign file raises one CheckpointError naming it."""
    import io

    from pipeline.weights import CheckpointError, load_torch_file, read_checkpoint

    path = Path(checkpoint)
    data, actual = read_checkpoint(path, sha256, "CLIP", CHECKPOINT_SOURCE, "clip.checkpoint")
    if is_torchscript(data):
        check_torchscript(path, actual, sha256)
        try:
            state = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
        except Exception as exc:  # TorchScript errors have many types
            raise CheckpointError(f"CLIP checkpoint {path} is a TorchScript archive that cannot be "
                                  f"loaded ({type(exc).__name__}); get it again from {CHECKPOINT_SOURCE}.") from exc
    else:
        state = load_torch_file(path, "CLIP", CHECKPOINT_SOURCE, data=data)
    del data
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    # OpenAI's archive also holds its hyper-parameters as tensors, and an archive traced from an
    # open_clip model its causal mask: neither is a weight.
    state = {k.removeprefix("module."): v for k, v in state.items()
             if k not in ("input_resolution", "context_length", "vocab_size", "attn_mask")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
        raise CheckpointError(f"CLIP checkpoint {path} does not fit this architecture "
                              f"({lines[1] if len(lines) > 1 else lines[0]})"[:400] + ": is clip.model right?") from exc


def is_torchscript(file: bytes | str | Path) -> bool:
    """Whether ``file`` (its bytes, or its path) is a TorchScript archive: a zip holding
    ``constants.pkl`` (``torch.save``'s zip files have none)."""
    import io
    import zipfile

    handle = io.BytesIO(file) if isinstance(file, (bytes, bytearray)) else file
    try:
        return zipfile.is_zipfile(handle) and any(
            n.endswith("/constants.pkl") for n in zipfile.ZipFile(handle).namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def check_torchscript(path: str | Path, sha256: str, pinned: str | None) -> None:
    """Refuse a TorchScript archive (loading it runs code from the file) whose SHA-256 is neither
    ``pinned`` (``clip.checkpoint_sha256``) nor a known official file's (by content: a file named
    like OpenAI's ViT-B-16.pt with other bytes is not it). One line says how to go on."""
    from pipeline.clip.pretrained import known_checksum, named_like_known_file
    from pipeline.weights import CheckpointError

    if (pinned and sha256 == pinned.lower()) or known_checksum(sha256) is not None:
        return
    name = named_like_known_file(path)
    alike = (f" (it is named {name}, but its content is not that known file's: truncated, corrupt "
             "or another file)") if name else ""
    raise CheckpointError(
        f"CLIP checkpoint {path} is a TorchScript archive (loading it runs code from the file) whose "
        f"SHA-256 {sha256} is neither pinned nor a known official file's{alike}: if you trust this "
        f"file, set 'clip.checkpoint_sha256: {sha256}'; or convert it to a state dict, where you trust "
        f"it (torch.save(torch.jit.load(path).state_dict(), 'clip_state_dict.pt')), and set "
        "clip.checkpoint to that file.")


def inference_size(
    height: int, width: int, max_side: int | None = None, patch: int = PATCH
) -> tuple[int, int]:
    """(h', w') the image is resized to for CAM inference (algorithms.md §3).

    Each side goes UP to a multiple of ``patch`` (500×375 → 512×384). ``max_side`` (a project
    cap, not in the reference, which ran VOC at native size) first scales an image whose long
    side exceeds it down to a long side of ``max_side``, keeping the aspect ratio: the encoder's
    attention grows with the square of the token count (a 12 MP photo at native size would
    need ~100 GB for one attention map), the cap bounds it. None: native size.
    """
    h, w = int(height), int(width)
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
    return -(-h // patch) * patch, -(-w // patch) * patch


def inference_resize(image: np.ndarray, max_side: int | None = None, patch: int = PATCH) -> np.ndarray:
    """An (H, W, 3) uint8 image at :func:`inference_size`, one PIL bicubic resize (the reference's
    interpolation; also used when the cap shrinks the image)."""
    h, w = image.shape[:2]
    th, tw = inference_size(h, w, max_side, patch)
    if (th, tw) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((tw, th), Image.BICUBIC))


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 images -> (B, 3, H, W) float32 normalised with CLIP's mean/std."""
    x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Resize a (1 + gh*gw, D) positional embedding to (1 + h*w, D); class token kept."""
    if tuple(grid) == tuple(hw):
        return pos
    cls, patches = pos[:1], pos[1:]
    d = pos.shape[1]
    patches = patches.reshape(1, grid[0], grid[1], d).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=hw, mode="bilinear", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(hw[0] * hw[1], d)], dim=0)


def attention_probs(block: torch.nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Per-head attention probabilities (B, heads, L, L) of ``block`` for its normalised input."""
    attn = block.attn
    q, k, _ = F.linear(a, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k = _heads(q, attn.num_heads), _heads(k, attn.num_heads)
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)


def block_forward(
    block: torch.nn.Module, x: torch.Tensor, a: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One residual attention block; returns (output, head-averaged attention (B, L, L)).

    ``a`` is ``ln_1(x)``; passing it lets Grad-CAM differentiate with respect to it.
    """
    if a is None:
        a = block.ln_1(x)
    attn = block.attn
    _, _, v = F.linear(a, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    probs = attention_probs(block, a)
    out = probs @ _heads(v, attn.num_heads)  # (B, heads, L, dh)
    out = out.transpose(1, 2).reshape(a.shape)
    x = x + block.ls_1(attn.out_proj(out))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, probs.mean(dim=1)


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    b, l, d = t.shape
    return t.reshape(b, l, n, d // n).transpose(1, 2)


def vision_embed(visual: torch.nn.Module, images: torch.Tensor, cast: bool = True) -> torch.Tensor:
    """Patch + class tokens + positional embedding resized to the images' grid, ``ln_pre``:
    (B, 1 + hw, D) for normalised (B, 3, H, W) images.

    ``visual`` is open_clip's ``VisionTransformer`` or a module with its layout (``conv1``,
    ``class_embedding``, ``positional_embedding`` of a ``grid_size`` grid, ``ln_pre``): the demo
    SAM's CLIP-shaped encoder embeds through here too.

    Args:
        cast: cast the class and positional embeddings to the patch tokens' dtype (the frozen
            encoder and the demo SAM's: under bf16 autocast the tokens stay bf16). The demo CLIP
            trainer adds them in their own dtype (autocast's ``cat`` then promotes the tokens to
            fp32), as its bf16 runs always have; in fp32 both are the same.
    """
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    # the cast after the expand: a trained embedding's gradient is summed over the batch in fp32
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls.to(x.dtype) if cast else cls, x], dim=1)
    pos = resize_pos_embed(visual.positional_embedding, visual.grid_size, (h, w))
    return visual.ln_pre(x + (pos.to(x.dtype) if cast else pos))


def vision_trunk(
    visual: torch.nn.Module, images: torch.Tensor, attention_blocks: int = 0, cast: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CLIP vision trunk up to its last block: (the residual-stream input of the last block
    (B, 1 + hw, D), the attention mean (B, hw, hw) or None) for normalised (B, 3, H, W) images.

    The one implementation of the trunk: the frozen encoder (features, Grad-CAM, CAA) and the
    demo CLIP's trainer run it. With ``attention_blocks`` > 0 the head-averaged attention is
    averaged over that many final blocks (the last one included), class-token row and column
    dropped, rows not renormalised; 0: none computed (every block runs its own forward).
    ``cast``: see :func:`vision_embed`.
    """
    blocks = visual.transformer.resblocks
    first = len(blocks) - attention_blocks
    x = vision_embed(visual, images, cast)
    total = None
    for i, block in enumerate(blocks[:-1]):
        if i < first:
            x = block(x)
        else:
            x, att = block_forward(block, x)
            total = att if total is None else total + att
    if not attention_blocks:
        return x, None
    last_att = attention_probs(blocks[-1], blocks[-1].ln_1(x)).mean(dim=1)
    total = last_att if total is None else total + last_att
    return x, (total / attention_blocks)[:, 1:, 1:]


class FrozenClip(torch.nn.Module):
    """An open_clip CLIP model, frozen, with the image encoder split at its last block."""

    def __init__(self, model: torch.nn.Module, untrained: bool):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.untrained = untrained
        self.visual = model.visual

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    @property
    def patch_size(self) -> int:
        return int(self.visual.conv1.kernel_size[0])

    @property
    def n_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    def train(self, mode: bool = True) -> "FrozenClip":
        # Frozen: dropout-free eval behaviour always (patch dropout stays off).
        return super().train(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class tokens + resized positional embedding, ``ln_pre``: (B, 1 + hw, D)."""
        return vision_embed(self.visual, images)

    def encode_to_last_block(self, images: torch.Tensor) -> torch.Tensor:
        """Residual-stream input of the last block, (B, 1 + hw, D), for normalised (B,3,H,W)."""
        return vision_trunk(self.visual, images)[0]

    def encode_with_attention(
        self, images: torch.Tensor, attention_blocks: int = 8
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last-block input (B, 1+hw, D), attention mean (B, hw, hw)) in one encoder pass.

        Args:
            attention_blocks: how many final blocks (the last one included) the head-averaged
                attention is averaged over (8 in the paper). Class-token row and column are
                dropped and rows are not renormalised.
        """
        blocks = self.visual.transformer.resblocks
        if not 1 <= attention_blocks <= len(blocks):
            raise ValueError(f"attention_blocks must be in [1, {len(blocks)}], got {attention_blocks}")
        return vision_trunk(self.visual, images, attention_blocks)

    def last_block_attention_mean(self, images: torch.Tensor, attention_blocks: int = 8) -> torch.Tensor:
        """Mean over the last ``attention_blocks`` blocks of head-averaged attention, (B, hw, hw)."""
        return self.encode_with_attention(images, attention_blocks)[1]

    def last_block_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Grad-CAM activation A = ``ln_1`` of the last block, all tokens (B, 1 + hw, D)."""
        return self.visual.transformer.resblocks[-1].ln_1(x)

    def features_from_activation(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Image features f (B, embed_dim), unnormalised, from last-block input x and A = ln_1(x).

        f = ``ln_post`` over all tokens of the block output, mean of the patch tokens (class
        token excluded), ``@ proj``.
        """
        v = self.visual
        out, _ = block_forward(v.transformer.resblocks[-1], x, a)
        return v.ln_post(out)[:, 1:].mean(dim=1) @ v.proj

    def last_block_tail(
        self, x: torch.Tensor, requires_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, f) from the cached last-block input ``x``.

        With ``requires_grad`` A is a fresh leaf that requires grad and f is computed from it, so
        ``∂(logits)/∂A`` (Grad-CAM) is available; x itself is treated as a constant.
        """
        x = x.to(self.visual.proj.dtype)
        a = self.last_block_activation(x)
        if requires_grad:
            a = a.detach().requires_grad_(True)
        return a, self.features_from_activation(x, a)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Full-encoder image features (B, embed_dim) for normalised images (exact path)."""
        return self.last_block_tail(self.encode_to_last_block(images))[1]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()
