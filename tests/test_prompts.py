import pytest
import torch

from pipeline.prompts.class_names import (
    COCO_BACKGROUND_NAMES, COCO_PROMPT_NAMES, VOC_BACKGROUND_NAMES, VOC_PROMPT_NAMES,
    background_names, prompt_names,
)
from pipeline.clip.model import create_clip
from pipeline.prompts.learner import PromptLearner, clip_logits, prompt_strings, tokenize_prompts

SOS, EOS, X, DOT = 49406, 49407, 343, 269


@pytest.fixture(scope="module")
def clip():
    return create_clip("tiny", seed=0)


def test_class_names_of_the_paper():
    assert len(VOC_PROMPT_NAMES) == 20 and len(COCO_PROMPT_NAMES) == 80
    assert len(VOC_BACKGROUND_NAMES) == 25 and len(COCO_BACKGROUND_NAMES) == 23
    assert "keyboard" not in COCO_BACKGROUND_NAMES and "sign" not in COCO_BACKGROUND_NAMES
    assert prompt_names(["bird", "person", "cat"], "voc") == (
        "bird avian", "person with clothes,people,human", "cat")
    assert prompt_names(["baseball glove", "tv", "couch"], "coco") == ("glove", "tvmonitor screen", "sofa")
    assert prompt_names(["ball", "box"], "demo") == ("ball", "box")
    assert background_names("coco") == COCO_BACKGROUND_NAMES
    assert background_names("demo") == VOC_BACKGROUND_NAMES


def test_coco_prompt_names_are_the_references():
    """The golden COCO vector carries the reference's 80 prompt names, snowboard spelled
    ``sknowboard``; the dataset's (display) class name stays ``snowboard``."""
    import numpy as np

    from conftest import golden_files
    from pipeline.data.datasets import COCO_CLASSES

    coco = next(p for p in golden_files("prompt") if str(np.load(p)["style"]).startswith("coco"))
    assert list(COCO_PROMPT_NAMES) == [str(n) for n in np.load(coco)["fg_names"]]
    assert prompt_names(["snowboard", "skis"], "coco") == ("sknowboard", "skis")
    assert "snowboard" in COCO_CLASSES and "sknowboard" not in COCO_CLASSES
    assert [str(n) for n in np.load(coco)["bg_names"]] == list(COCO_BACKGROUND_NAMES)


def test_token_layout_class_at_end():
    tokens, layout = tokenize_prompts(["bird avian", "cat", "sky"], 4, "end")
    assert prompt_strings(["cat"], 4) == ["X X X X cat."]
    assert tokens[1, :8].tolist() == [SOS, X, X, X, X, 2368, DOT, EOS]
    assert tokens[0, 5:9].tolist() == [3329, 24115, DOT, EOS]
    assert layout[1, :8].tolist() == [SOS, -1, -2, -3, -4, 2368, DOT, EOS]
    assert torch.equal(layout[:, 5:], tokens[:, 5:])


def test_token_layout_class_in_front_and_empty_background():
    """The reference tokenises the class-at-the-end string for both layouts and moves the
    name's embeddings in front of the context; the tokens (and EOS index) stay those of
    "X X X name."."""
    tokens, layout = tokenize_prompts(["bird avian", "cat", ""], 3, "front")
    assert prompt_strings(["cat", ""], 3) == ["X X X cat.", "X X X ."]
    assert tokens[0, :8].tolist() == [SOS, X, X, X, 3329, 24115, DOT, EOS]
    assert layout[0, :8].tolist() == [SOS, 3329, 24115, -1, -2, -3, DOT, EOS]
    assert layout[1, :7].tolist() == [SOS, 2368, -1, -2, -3, DOT, EOS]
    assert tokens[2, :6].tolist() == layout[2, :6].tolist()[:1] + [X] * 3 + [DOT, EOS]
    assert layout[2, :6].tolist() == [SOS, -1, -2, -3, DOT, EOS]
    assert tokens.argmax(1).tolist() == [7, 6, 5]


def test_underscores_become_spaces_in_prompts():
    """Custom class names like ``traffic_light`` are prompted as "traffic light" (reference)."""
    tokens, layout = tokenize_prompts(["traffic_light"], 2, "front")
    ref_tokens, ref_layout = tokenize_prompts(["traffic light"], 2, "front")
    assert torch.equal(tokens, ref_tokens) and torch.equal(layout, ref_layout)
    assert prompt_strings(["traffic_light"], 2) == ["X X traffic light."]


@pytest.mark.parametrize("shared,position", [(True, "end"), (False, "front")])
def test_context_written_at_placeholders_only(clip, shared, position):
    names = ["bird avian", "cat", "", "sky"]
    learner = PromptLearner(clip.model, names, n_fg=2, n_ctx=4, shared_context=shared,
                            class_position=position, init_std=0.02, seed=3)
    emb = learner.prompt_embeddings()
    fixed = clip.model.token_embedding(learner.layout.clamp_min(0))
    ctx = learner.ctx.expand(4, -1, -1) if shared else learner.ctx
    for g in range(4):
        p = learner.positions[g]
        assert learner.layout[g, p].tolist() == [-1, -2, -3, -4]
        torch.testing.assert_close(emb[g, p], ctx[g])
        keep = torch.ones(emb.shape[1], dtype=torch.bool)
        keep[p] = False
        torch.testing.assert_close(emb[g, keep], fixed[g, keep])
    assert learner.ctx.shape == ((4, 64) if shared else (4, 4, 64))


def test_only_context_requires_grad_and_init_std(clip):
    learner = PromptLearner(clip.model, ["a"] * 30, n_fg=10, n_ctx=16, shared_context=False,
                            class_position="front", init_std=0.0125, seed=0)
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    assert abs(float(learner.ctx.detach().std()) - 0.0125) < 0.0005
    assert list(learner.state_dict()) == ["ctx"]
    feats = learner.text_features(clip.model)
    feats.sum().backward()
    assert learner.ctx.grad is not None and float(learner.ctx.grad.abs().sum()) > 0
    assert all(p.grad is None for p in clip.parameters())


@pytest.mark.parametrize("shared,position", [(True, "end"), (False, "front")])
def test_truncation_is_exact_up_to_rounding(clip, shared, position):
    names = ["person with clothes,people,human", "cat", "", "railway"]
    short = PromptLearner(clip.model, names, 2, 16, shared, position, seed=1, truncate=True)
    full = PromptLearner(clip.model, names, 2, 16, shared, position, seed=1)
    assert not full.truncate and short.truncate  # the reference's full length is the default
    assert short.layout.shape[1] < full.layout.shape[1] == 77
    with torch.no_grad():
        torch.testing.assert_close(short.text_features(clip.model), full.text_features(clip.model),
                                   rtol=1e-5, atol=1e-5)


def test_full_length_features_equal_open_clip_encode_text(clip):
    """With the context set to the placeholder's own embedding, the learner is CLIP's encode_text."""
    learner = PromptLearner(clip.model, ["cat", "sky"], 1, 4, True, "end", truncate=False)
    with torch.no_grad():
        learner.ctx.copy_(clip.model.token_embedding.weight[X].expand(4, -1))
        ours = learner.text_features(clip.model)
        ref = clip.model.encode_text(learner.tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_logits_are_scaled_cosines():
    f = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = clip_logits(f, t, torch.tensor(100.0))
    torch.testing.assert_close(y, torch.tensor([[100.0, 70.710678], [0.0, 70.710678]]))


def test_warm_start_context_fits_the_layout_or_names_what_differs(clip):
    from pipeline.prompts.learner import warm_start_context

    names = ["ball", "box", "ground", "sky"]
    cls = PromptLearner(clip.model, names, n_fg=2, n_ctx=4, shared_context=True, class_position="end", seed=1)
    shared = PromptLearner(clip.model, names, n_fg=2, n_ctx=4, shared_context=True, class_position="end", seed=2)
    specific = PromptLearner(clip.model, names, n_fg=2, n_ctx=4, shared_context=False, class_position="end")
    torch.testing.assert_close(warm_start_context(shared, cls), cls.ctx.detach(), rtol=0, atol=0)
    expanded = warm_start_context(specific, cls)
    assert expanded.shape == specific.ctx.shape
    for g in range(len(names)):
        torch.testing.assert_close(expanded[g], cls.ctx.detach(), rtol=0, atol=0)
    front = PromptLearner(clip.model, names, n_fg=2, n_ctx=8, shared_context=True, class_position="front")
    with pytest.raises(ValueError, match="n_ctx, class_position"):
        warm_start_context(front, cls)
    with pytest.raises(ValueError, match="shared_context"):
        warm_start_context(shared, specific)
