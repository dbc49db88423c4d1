import numpy as np
import pytest
import torch

from pipeline.clip.model import (
    CLIP_MEAN, CLIP_STD, FrozenClip, attention_probs, create_clip, inference_resize,
    resize_pos_embed, to_model_input,
)


@pytest.fixture(scope="module")
def clip() -> FrozenClip:
    return create_clip("tiny", seed=0)


def _full_path_features(clip, images):
    """open_clip's own modules end to end: embeddings, every block, ln_post, patch mean, proj."""
    v = clip.visual
    out = v.transformer(v._embeds(images))
    return v.ln_post(out)[:, 1:].mean(dim=1) @ v.proj, out


def test_tiny_model_is_frozen_deterministic_and_built_by_open_clip(clip):
    other = create_clip("tiny", seed=0)
    assert all(not p.requires_grad for p in clip.parameters())
    assert clip.untrained and clip.n_blocks == 8 and clip.width == 64
    assert clip.visual.transformer.resblocks[0].attn.num_heads == 2
    for a, b in zip(clip.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    different = create_clip("tiny", seed=1)
    assert not torch.equal(different.visual.proj, clip.visual.proj)


def test_cached_path_equals_full_path(clip):
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = _full_path_features(clip, images)
        x = clip.encode_to_last_block(images)
        a, f = clip.last_block_tail(x)
        # open_clip's own pooled output (class token) agrees with our block output too.
        pooled = clip.visual(images)
    assert x.shape == (2, 197, 64)
    torch.testing.assert_close(f, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, clip.visual.transformer.resblocks[-1].ln_1(x))
    torch.testing.assert_close(clip.visual.ln_post(out)[:, 0] @ clip.visual.proj, pooled)
    x_att, _ = clip.encode_with_attention(images, 8)
    torch.testing.assert_close(x_att, x, rtol=1e-5, atol=1e-5)


def test_tail_activation_copies_carry_gradient(clip):
    x = torch.randn(3, 197, 64, generator=torch.Generator().manual_seed(1))
    a, f = clip.last_block_tail(x, requires_grad=True)
    assert a.is_leaf and a.requires_grad
    (g,) = torch.autograd.grad(f.sum(), a, create_graph=True)
    assert g.shape == a.shape and g.requires_grad and float(g.detach().abs().sum()) > 0
    # twice differentiable (Grad-CAM with create_graph needs it)
    (gg,) = torch.autograd.grad((g * torch.randn_like(g)).sum(), a)
    assert float(gg.abs().sum()) > 0


def test_pos_embed_resize_keeps_class_token_and_is_identity_at_native_size():
    pos = torch.randn(1 + 14 * 14, 8)
    out = resize_pos_embed(pos, (14, 14), (24, 32))
    assert out.shape == (1 + 24 * 32, 8)
    torch.testing.assert_close(out[0], pos[0])
    assert resize_pos_embed(pos, (14, 14), (14, 14)) is pos
    # a constant embedding stays constant under bilinear resizing
    const = torch.ones(1 + 14 * 14, 8)
    torch.testing.assert_close(resize_pos_embed(const, (14, 14), (5, 7)), torch.ones(36, 8))


def test_attention_rows_sum_to_one_minus_class_column(clip):
    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    blocks = clip.visual.transformer.resblocks
    with torch.no_grad():
        x, att = clip.encode_with_attention(images, 8)
        # recompute the full (class token included) attention mean to get the class column mass
        h = clip.embed(images)
        full = []
        for block in blocks:
            full.append(attention_probs(block, block.ln_1(h)).mean(dim=1))
            h = block(h)
        mean = torch.stack(full).mean(dim=0)
    assert att.shape == (1, 48, 48)
    torch.testing.assert_close(att.sum(-1), 1.0 - mean[:, 1:, 0], rtol=1e-5, atol=1e-5)
    assert bool((att.sum(-1) < 1).all())


def test_attention_matches_torch_multihead_weights(clip):
    block = clip.visual.transformer.resblocks[-1]
    a = block.ln_1(torch.randn(2, 197, 64, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        _, ref = block.attn(a, a, a, need_weights=True, average_attn_weights=True)
        ours = attention_probs(block, a).mean(dim=1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_inference_resize_and_normalisation():
    img = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    out = inference_resize(img)
    assert out.shape == (384, 512, 3) and out.dtype == np.uint8
    same = img[:32, :48]
    assert inference_resize(same) is same
    x = to_model_input(np.full((1, 2, 2, 3), 255, np.uint8))
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[0, :, 0, 0], expected)


def test_weights_load_from_a_local_file_through_open_clip(tmp_path):
    trained = create_clip("tiny", seed=5)
    path = tmp_path / "weights.pt"
    torch.save(trained.model.state_dict(), path)
    loaded = create_clip("tiny", checkpoint=path, seed=0)
    assert not loaded.untrained
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_clip_checkpoint_is_one_clear_error(tmp_path):
    from pipeline.params import ClipConfig
    from pipeline.clip.factory import verify_clip
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="clip.checkpoint is null"):
        ClipConfig(model="ViT-B-16")
    cfg = ClipConfig(model="ViT-B-16", checkpoint=str(tmp_path / "missing.bin"), checkpoint_sha256="ab" * 32)
    with pytest.raises(PipelineError, match=r"missing\.bin.*'clip\.checkpoint'.*abab"):
        verify_clip(cfg)
