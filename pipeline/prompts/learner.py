"""CoOp prompt learners over CLIP's frozen text encoder (algorithms.md §2).

Every prompt is tokenised from the string ``"X " * n_ctx + name + "."`` (the reference tokenises
this class-at-the-end string for both layouts; underscores in names become spaces). The embedding
sequence is then laid out per position (:func:`prompt_layout`): ``[SOS][ctx][name][.][EOS]`` with
the class token at the end (classification prompts) or ``[SOS][name][ctx][.][EOS]`` in front (VOC
segmentation prompts); the context positions get learned vectors, every other position CLIP's
frozen token embedding. Only the context vectors are parameters.

The text encoder runs over all 77 positions by default, as the reference does. ``truncate=True``
runs it only up to the last EOS of the prompt set: under the causal mask no token attends to a
later one, so the EOS outputs are those of the full sequence in exact arithmetic; in float32 the
shorter matrix products round differently (about 1e-6 relative in the text features, amplified to
2e-5 in one golden Grad-CAM), so it is a training-speed option, never used for CAMs.
"""
from __future__ import annotations

from typing import Literal, Sequence

import open_clip
import torch
import torch.nn.functional as F

CTX_TOKEN = "X"


def _tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


def prompt_name(name: str) -> str:
    """The text a class name contributes to its prompt (reference: underscores become spaces)."""
    return name.replace("_", " ")


def prompt_strings(names: Sequence[str], n_ctx: int) -> list[str]:
    """The strings tokenised for the prompts (placeholders ``X`` mark the context), either layout."""
    ctx = " ".join([CTX_TOKEN] * n_ctx)
    return [f"{ctx} {prompt_name(name)}." for name in names]


def tokenize_prompts(
    names: Sequence[str], n_ctx: int, class_position: Literal["end", "front"], context_length: int = 77
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (G, context_length) int64, layout (G, context_length) int64).

    ``tokens`` is the tokenisation of :func:`prompt_strings` (identical for both class positions;
    the EOS index is its argmax). ``layout`` says what sits at each position of the embedding
    sequence: a token id, or ``-1 - j`` for context vector j (:func:`prompt_layout`).

    Raises ``ValueError`` if a name is too long for the context or the placeholders do not sit
    where expected (a name that itself tokenises into the placeholder would).
    """
    if class_position not in ("end", "front"):
        raise ValueError(f"class_position must be 'end' or 'front', got {class_position!r}")
    tok = _tokenizer()
    strings = prompt_strings(names, n_ctx)
    too_long = [s for s in strings if len(tok.encode(s)) + 2 > context_length]
    if too_long:
        raise ValueError(f"prompt {too_long[0]!r} does not fit CLIP's context of {context_length} tokens")
    tokens = tok(strings, context_length=context_length).long()
    x_id = tok.encode(CTX_TOKEN)[0]
    eos = tokens.argmax(dim=1)
    if not bool((tokens[:, 1 : 1 + n_ctx] == x_id).all()) or bool((eos <= n_ctx).any()):
        raise ValueError("context placeholders are not where expected in the tokenised prompts")
    name_lengths = [len(tok.encode(prompt_name(n))) for n in names]
    return tokens, prompt_layout(tokens, n_ctx, class_position, name_lengths)


def prompt_layout(
    tokens: torch.Tensor, n_ctx: int, class_position: Literal["end", "front"], name_lengths: Sequence[int]
) -> torch.Tensor:
    """(G, L) content of each position: token id, or ``-1 - j`` for context vector j.

    ``end``: the tokens with positions 1..n_ctx replaced by the context. ``front``: SOS, the
    name's tokens, the context, then the rest of the tokens ("." EOS and padding), as the
    reference builds it from the same tokenisation.
    """
    layout = tokens.clone()
    ctx_ids = -1 - torch.arange(n_ctx, dtype=layout.dtype)
    if class_position == "end":
        layout[:, 1 : 1 + n_ctx] = ctx_ids
        return layout
    for g, n in enumerate(name_lengths):
        layout[g, 1 : 1 + n] = tokens[g, 1 + n_ctx : 1 + n_ctx + n]
        layout[g, 1 + n : 1 + n + n_ctx] = ctx_ids
    return layout


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
        truncate: run the text encoder only up to the last EOS of the prompt set (exact in
            mathematics, not bit-exact; see module doc). Default False: all context positions,
            the reference behaviour.
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
        truncate: bool = False,
    ):
        super().__init__()
        self.names = list(names)
        self.n_fg = int(n_fg)
        self.n_ctx = int(n_ctx)
        self.shared_context = bool(shared_context)
        self.class_position = class_position
        width = clip_model.token_embedding.weight.shape[1]
        self.truncate = bool(truncate)
        tokens, layout = tokenize_prompts(self.names, n_ctx, class_position, clip_model.context_length)
        eos = tokens.argmax(dim=1)
        if truncate:
            layout = layout[:, : int(eos.max()) + 1]
        # (G, n_ctx) position of context vector j in each prompt (both layouts keep j ascending)
        positions = (layout < 0).nonzero()[:, 1].reshape(len(self.names), n_ctx)
        # The tokenizer's ids are CPU tensors; the embedding lookup runs where CLIP lives.
        with torch.no_grad():
            weight = clip_model.token_embedding.weight
            fixed = clip_model.token_embedding(layout.clamp_min(0).to(weight.device)).float()
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("layout", layout, persistent=False)
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


def warm_start_context(learner: PromptLearner, source: PromptLearner) -> torch.Tensor:
    """``source``'s context shaped for ``learner`` (``prompts.seg.init: cls``, a warm start).

    The prompts must have the same names, context length and class position; a shared source
    context fills every prompt of a class-specific one. Raises ValueError naming what differs.
    """
    mine, theirs = learner.spec(), source.spec()
    differs = [k for k in ("names", "n_fg", "n_ctx", "class_position") if mine[k] != theirs[k]]
    if theirs["shared_context"] and not mine["shared_context"]:
        ctx = source.ctx.expand_as(learner.ctx)  # every prompt starts from the shared context
    elif mine["shared_context"] == theirs["shared_context"]:
        ctx = source.ctx
    else:
        differs.append("shared_context")
    if differs:
        raise ValueError(", ".join(differs))
    return ctx.detach().to(learner.ctx.device)


def phrase_context(learner: PromptLearner, clip_model: torch.nn.Module, phrase: str) -> torch.Tensor:
    """``learner``'s context started from a phrase (``prompts.<which>.init: "a photo of a"``,
    CoOp's initialisation from words): the phrase's k token embeddings fill the k context
    positions next to the class name (the last k when the class is at the end, the first k when
    it is in front) of every prompt, so that the prompts start as the hand-written ones ("... a
    photo of a cat."); the other ``n_ctx - k`` positions keep their random start. Raises
    ValueError when the phrase is empty or has more tokens than the context."""
    ids = _tokenizer().encode(phrase)
    if not ids or len(ids) > learner.n_ctx:
        raise ValueError(f"{phrase!r} is {len(ids)} tokens, the context holds 1 to {learner.n_ctx}")
    with torch.no_grad():
        weight = clip_model.token_embedding.weight
        words = clip_model.token_embedding(torch.tensor(ids, device=weight.device)).float()
        ctx = learner.ctx.detach().clone()
        k = len(ids)
        positions = slice(learner.n_ctx - k, None) if learner.class_position == "end" else slice(0, k)
        ctx[..., positions, :] = words.to(ctx)
    return ctx
