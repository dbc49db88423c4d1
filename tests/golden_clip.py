"""The tiny OpenAI-format CLIP of the prompt_/gradcam_ golden vectors, loaded the project's way.

``tiny_openai_clip.py`` (beside the vectors) rebuilds the deterministic state dict and its open_clip
config; here the state dict is saved to a file, the config registered as an open_clip model
config (a JSON file + ``open_clip.add_model_config``, as pipeline/clip/model.py registers the
project's own), and the model built by ``pipeline.clip.model.create_clip(name, checkpoint=file)``
(QuickGELU forced for real weights), the code path of every real run.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import open_clip
import torch

from conftest import GOLDEN_DIR


def tiny_openai_clip():
    spec = importlib.util.spec_from_file_location("tiny_openai_clip", GOLDEN_DIR / "tiny_openai_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def golden_clip_files(data, root: Path) -> tuple[str, Path]:
    """(open_clip model name, checkpoint file) of a vector's tiny CLIP, written under ``root``."""
    toc = tiny_openai_clip()
    arch, seed, sha = str(data["clip_arch"]), int(data["clip_seed"]), str(data["clip_sha256"])
    name = f"golden-tiny-{sha[:12]}"
    config_dir = root / "model_configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{name}.json").write_text(json.dumps(toc.open_clip_config(arch)))
    open_clip.add_model_config(config_dir)
    checkpoint = root / f"{name}.pt"
    if not checkpoint.exists():
        torch.save(toc.state_dict_torch(seed, arch, expect_sha256=sha), checkpoint)
    return name, checkpoint


def golden_prompt_spec(data) -> dict:
    """The prompt-learner spec (as stored in a prompts checkpoint) of a vector."""
    return {
        "names": [str(n) for n in data["fg_names"]] + [str(n) for n in data["bg_names"]],
        "n_fg": int(data["fg_names"].shape[0]), "n_ctx": int(data["n_ctx"]),
        "shared_context": bool(data["shared_context"]), "class_position": str(data["class_position"]),
    }


def golden_context(data) -> torch.Tensor:
    """The learned context (stored as float16) as the float32 tensor the learner holds."""
    return torch.from_numpy(np.asarray(data["ctx"], dtype=np.float32))


def assert_close_rel(ours, ref, name: str, rel: float = 1e-5) -> None:
    """``max|ours − ref| <= rel · max|ref|`` (the golden README's tolerance), shapes equal."""
    ours = np.asarray(ours.detach().cpu() if isinstance(ours, torch.Tensor) else ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs reference {ref.shape}"
    err, scale = float(np.abs(ours - ref).max(initial=0.0)), float(np.abs(ref).max(initial=0.0))
    assert err <= rel * scale, f"{name}: max|ours - ref| = {err:.3g} > {rel:g} * {scale:.3g}"
