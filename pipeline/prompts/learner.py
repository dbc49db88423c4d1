"""CoOp prompt learners over CLIP's frozen text encoder (algorithms.md §2).

A prompt is the tokenised string ``"X " * n_ctx + name + "."`` (class token at the end,
classification prompts) or ``name + " X" * n_ctx + "."`` (class token in front, VOC segmentation
prompts); the embeddings of the ``X`` tokens are replaced by learned context vectors, everything
else is CLIP's frozen token embedding. Only the context vectors are parameters.

The text encoder runs on the sequence truncated after the last EOS of the prompt set: under the
causal mask no token attends to a later one, so the EOS outputs are exactly those of the full
77-token sequence, at a fraction of the cost.
"""
from __future__ import annotations

from typing import Literal, Sequence

import open_clip
import torch
import torch.nn.functional as F

CTX_TOKEN = "X"


def _tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


def prompt_strings(names: Sequence[str], n_ctx: int, class_position: Literal["end", "front"]) -> list[str]:
    """The strings tokenised for each prompt (placeholders ``X`` mark the context)."""
    ctx = " ".join([CTX_TOKEN] * n_ctx)
    if class_position == "end":
        return [f"{ctx} {name}." for name in names]
    return [f"{name} {ctx}.".lstrip() for name in names]


def context_positions(
    names: Sequence[str], n_ctx: int, class_position: Literal["end", "front"]
) -> torch.Tensor:
    """(G, n_ctx) token positions of the context in each prompt (position 0 is SOS)."""
    tok = _tokenizer()
    if class_position == "end":
        starts = [1] * len(names)
    else:
        starts = [1 + len(tok.encode(name)) for name in names]
    return torch.tensor(starts)[:, None] + torch.arange(n_ctx)[None, :]


def tokenize_prompts(
    names: Sequence[str], n_ctx: int, class_position: Literal["end", "front"], context_length: int = 77
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (G, context_length) int64, context positions (G, n_ctx)).

    Raises ``ValueError`` if a name is too long for the context or the placeholders do not sit
    where expected (a name that itself tokenises into the placeholder would).
    """
    tok = _tokenizer()
    strings = prompt_strings(names, n_ctx, class_position)
    too_long = [s for s in strings if len(tok.encode(s)) + 2 > context_length]
    if too_long:
        raise ValueError(f"prompt {too_long[0]!r} does not fit CLIP's context of {context_length} tokens")
    tokens = tok(strings, context_length=context_length)
    positions = context_positions(names, n_ctx, class_position)
    x_id = tok.encode(CTX_TOKEN)[0]
    eos = tokens.argmax(dim=1)
    if not bool((tokens.gather(1, positions) == x_id).all()) or bool((positions >= eos[:, None]).any()):
        raise ValueError("context placeholders are not where expected in the tokenised prompts")
    return tokens, positions


def encode_prompt_embeddings(clip_model: torch.nn.Module, embeds: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """CLIP's text encoder on prompt embeddings (G, L, W): features (G, embed_dim), unnormalised.

    Positional embedding, causal transformer, ``ln_final``, the EOS token's output
    ``@ text_projection``. ``L`` may be shorter than the context length (see module doc).
    """
    m = clip_model
    length = embeds.shape[1]
    x = embeds + m.positional_embedding[:length].to(embeds.dtype)
    mask = m.attn_mask[:length, :length].to(embeds.dtype) if m.attn_mask is not None else None
    x = m.transformer(x, attn_mask=mask)
    x = m.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eos.to(x.device)]
    proj = m.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


class PromptLearner(torch.nn.Module):
    """Learned context vectors for G = C foreground + B background prompts.

    Args:
        clip_model: the open_clip CLIP model (frozen; only its token embedding is read here).
        names: the G prompt names, foreground first then background ("" for a context-only
            background prompt, as the VOC segmentation prompts use).
        n_fg: how many of ``names`` are foreground classes (C).
        n_ctx: context length (16 in the paper).
        shared_context: one (n_ctx, width) context for every prompt (classification prompts) or
            one per prompt, (G, n_ctx, width) (VOC segmentation prompts).
        class_position: ``"end"`` ``[SOS][ctx][name][.][EOS]`` or ``"front"``
            ``[SOS][name][ctx][.][EOS]``.
        init_std: std of the normal initialisation (0.015 classification, 0.0125 segmentation).
        seed: seed of that initialisation.
        truncate: run the text encoder only up to the last EOS (exact; see module doc).
    """

    def __init__(
        self,
        clip_model: torch.nn.Module,
        names: Sequence[str],
        n_fg: int,
        n_ctx: int = 16,
        shared_context: bool = True,
        class_position: Literal["end", "front"] = "end",
        init_std: float = 0.015,
        seed: int = 0,
        truncate: bool = True,
    ):
        super().__init__()
        if class_position not in ("end", "front"):
            raise ValueError(f"class_position must be 'end' or 'front', got {class_position!r}")
        self.names = list(names)
        self.n_fg = int(n_fg)
        self.n_ctx = int(n_ctx)
        self.shared_context = bool(shared_context)
        self.class_position = class_position
        width = clip_model.token_embedding.weight.shape[1]
        tokens, positions = tokenize_prompts(self.names, n_ctx, class_position, clip_model.context_length)
        eos = tokens.argmax(dim=1)
        if truncate:
            tokens = tokens[:, : int(eos.max()) + 1]
        with torch.no_grad():
            fixed = clip_model.token_embedding(tokens).float()
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("fixed_embeds", fixed, persistent=False)
        self.register_buffer("positions", positions, persistent=False)
        self.register_buffer("eos", eos, persistent=False)
        shape = (n_ctx, width) if shared_context else (len(self.names), n_ctx, width)
        gen = torch.Generator().manual_seed(seed)
        self.ctx = torch.nn.Parameter(torch.randn(shape, generator=gen) * init_std)

    @property
    def n_prompts(self) -> int:
        return len(self.names)

    @property
    def n_bg(self) -> int:
        return self.n_prompts - self.n_fg

    def prompt_embeddings(self) -> torch.Tensor:
        """(G, L, width): the fixed token embeddings with the context written in."""
        g = self.n_prompts
        ctx = self.ctx.expand(g, -1, -1) if self.shared_context else self.ctx
        rows = torch.arange(g, device=ctx.device)[:, None].expand_as(self.positions)
        return self.fixed_embeds.index_put(
            (rows.reshape(-1), self.positions.reshape(-1)), ctx.reshape(-1, ctx.shape[-1]).to(self.fixed_embeds)
        )

    def text_features(self, clip_model: torch.nn.Module) -> torch.Tensor:
        """(G, embed_dim) unnormalised text features of the prompts."""
        return encode_prompt_embeddings(clip_model, self.prompt_embeddings(), self.eos)

    def spec(self) -> dict:
        """Everything besides the context needed to rebuild the learner (stored in checkpoints)."""
        return {
            "names": self.names, "n_fg": self.n_fg, "n_ctx": self.n_ctx,
            "shared_context": self.shared_context, "class_position": self.class_position,
        }


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``Y = exp(logit_scale) · f̂ t̂ᵀ`` with ``logit_scale`` already exponentiated: (B, G)."""
    f = F.normalize(image_features, dim=-1)
    t = F.normalize(text_features, dim=-1)
    return logit_scale * f @ t.T
