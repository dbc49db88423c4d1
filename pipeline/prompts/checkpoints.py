"""Prompt learners and their checkpoints: a fresh learner for a dataset's classes, a trained one
rebuilt from a final checkpoint (``train-prompts``' ``cache/prompts/<which>.pt``), and the warm
start of segmentation prompts from classification prompts (``prompts.seg.init: cls``).

A checkpoint is read as data (tensors and plain containers, :mod:`pipeline.tensorfile`), never
as code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline import tensorfile
from pipeline.errors import PipelineError
from pipeline.params import PromptsConfig
from pipeline.prompts.class_names import background_names, prompt_names
from pipeline.prompts.learner import PromptLearner, phrase_context, warm_start_context

PROMPTS_KEYS = ("spec", "ctx")
"""Keys every final prompts checkpoint holds."""


def build_learner(clip, class_names, dataset: str, cfg: PromptsConfig) -> PromptLearner:
    """A fresh learner (context initialised from ``cfg.seed``) for the foreground prompts of
    ``class_names`` and the background prompts of ``dataset``, on the CLIP's device."""
    fg = prompt_names(class_names, dataset)
    bg = background_names(dataset)
    if cfg.background == "empty":
        bg = ("",) * len(bg)
    return PromptLearner(
        clip.model, list(fg) + list(bg), n_fg=len(fg), n_ctx=cfg.n_ctx,
        shared_context=cfg.shared_context, class_position=cfg.class_position,
        init_std=cfg.init_std, seed=cfg.seed, truncate=cfg.truncate_text,
    ).to(clip.visual.proj.device)


def load_learner(clip, path: str | os.PathLike, iteration: int | None = None) -> tuple[PromptLearner, dict]:
    """Rebuild trained prompts from a final checkpoint written by ``train-prompts``.

    ``iteration``: the context kept after that iteration (``prompts.<which>.cam_iteration``);
    None: the final one. The text encoder runs over all 77 positions (the reference's inference).
    """
    state = read_prompts(path)
    spec = state["spec"]
    if iteration is None:
        ctx = state["ctx"]
    elif iteration in state.get("contexts", {}):
        ctx = state["contexts"][iteration]
    else:
        raise PipelineError(f"prompts checkpoint {path} holds no context of iteration {iteration} "
                         f"(it has {sorted(state.get('contexts', {}))}); rerun train-prompts with "
                         "this cam_iteration")
    learner = PromptLearner(clip.model, spec["names"], spec["n_fg"], spec["n_ctx"],
                            spec["shared_context"], spec["class_position"], truncate=False)
    if learner.ctx.shape != ctx.shape:
        raise PipelineError(f"prompts checkpoint {path} does not fit the CLIP model (context "
                         f"{tuple(ctx.shape)} vs {tuple(learner.ctx.shape)})")
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    return learner.to(clip.visual.proj.device), state


def read_prompts(path: str | os.PathLike) -> dict:
    """A final prompts checkpoint as data (tensors and plain containers only, never code): a file
    holding anything else, or not written by ``train-prompts``, stops with one line naming it
    (``pipeline.tensorfile.TensorFileError``)."""
    return tensorfile.load_dict(path, "prompts checkpoint", "rerun train-prompts (`dvc repro`) "
                                "to rewrite it", PROMPTS_KEYS)


def warm_start(learner: PromptLearner, clip, path: Path) -> None:
    """Copy the trained classification context at ``path`` into ``learner`` (``init: cls``)."""
    if not path.is_file():
        raise PipelineError(f"prompts.seg.init is cls but there are no classification prompts at {path} "
                         "(run train-prompts --which cls)")
    try:
        ctx = warm_start_context(learner, load_learner(clip, path)[0])
    except tensorfile.TensorFileError:
        raise  # (a ValueError too, but its own message says what is wrong with the file)
    except ValueError as exc:
        raise PipelineError(f"prompts.seg.init is cls but the seg prompts differ from {path} in "
                         f"{exc} (a warm start needs the same prompt layout)") from exc
    with torch.no_grad():
        learner.ctx.copy_(ctx)


def phrase_start(learner: PromptLearner, clip, phrase: str, key: str) -> None:
    """Start ``learner``'s context from ``phrase`` (``init: "a photo of a"``,
    :func:`pipeline.prompts.learner.phrase_context`); ``key`` names the param in errors."""
    try:
        ctx = phrase_context(learner, clip.model, phrase)
    except ValueError as exc:
        raise PipelineError(f"params.yaml: {key}: {exc}") from exc
    with torch.no_grad():
        learner.ctx.copy_(ctx)
