"""The prompt learner reproduces the authors' prompts on every prompt_*.npz vector.

Tokens, EOS index and the per-position layout (which positions hold which token or context
vector) exactly; text features (raw and L2-normalised) to 1e-5 relative, through the project's
CLIP loading (golden_clip) and the learner rebuilt from a prompts checkpoint the way ``cams``
rebuilds it (``stages.train_prompts.load_learner``).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import golden_params
from golden_clip import assert_close_rel, golden_clip_files, golden_context, golden_prompt_spec
from pipeline.clip.model import create_clip
from pipeline.prompts.learner import PromptLearner
from stages.train_prompts import load_learner


@pytest.mark.parametrize("path", golden_params("prompt"))
def test_golden_prompt(path, tmp_path):
    data = np.load(path)
    name, checkpoint = golden_clip_files(data, tmp_path)
    clip = create_clip(name, checkpoint=checkpoint)
    prompts = tmp_path / "prompts.pt"
    torch.save({"spec": golden_prompt_spec(data), "ctx": golden_context(data)}, prompts)
    learner, _ = load_learner(clip, prompts)

    np.testing.assert_array_equal(learner.tokens.numpy(), data["tokens"])
    np.testing.assert_array_equal(learner.eos.numpy(), data["eos_index"])
    np.testing.assert_array_equal(learner.layout.numpy(), data["embed_token_ids"])
    with torch.no_grad():
        raw = learner.text_features(clip.model)
    assert_close_rel(raw, data["text_features_raw"], "text_features_raw")
    assert_close_rel(F.normalize(raw, dim=-1), data["text_features"], "text_features")


@pytest.mark.parametrize("path", golden_params("prompt"))
def test_golden_prompt_truncated_training_encoder(path, tmp_path):
    """The training-speed option (``prompts.*.truncate_text``) stays within the same tolerance
    on these prompts: only rounding differs."""
    data = np.load(path)
    name, checkpoint = golden_clip_files(data, tmp_path)
    clip = create_clip(name, checkpoint=checkpoint)
    spec = golden_prompt_spec(data)
    learner = PromptLearner(clip.model, spec["names"], spec["n_fg"], spec["n_ctx"],
                            spec["shared_context"], spec["class_position"], truncate=True)
    with torch.no_grad():
        learner.ctx.copy_(golden_context(data))
        raw = learner.text_features(clip.model)
    assert learner.layout.shape[1] == int(data["eos_index"].max()) + 1 < 77
    assert_close_rel(raw, data["text_features_raw"], "text_features_raw (truncated)")
