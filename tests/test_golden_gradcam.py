"""CAM inference reproduces the authors' Softmax-GradCAMs on every gradcam_*.npz vector.

The path is the one ``wsss clip-features`` + ``wsss cams`` run: the per-process resource of the
cams stage (``stages.cams._build``: CLIP from a checkpoint file through ``create_clip``, prompts
from a checkpoint, text features over all 77 positions), the inference cache of
``stages.clip_features.inference_features`` (bicubic resize up to multiples of 16, positional
embedding resize, ``encode_with_attention``) and ``stages.cams.image_cams`` (last-block tail,
masked softmax, batched Softmax-GradCAM). Every output and intermediate is checked to 1e-5
relative to the reference's largest value (integers exactly) so a divergence is located.
"""
import numpy as np
import pytest
import torch

from conftest import golden_params
from golden_clip import assert_close_rel, golden_clip_files, golden_context, golden_prompt_spec
from pipeline.cams.gradcam import masked_softmax
from pipeline.clip.model import block_forward, inference_resize, resize_pos_embed, to_model_input
from pipeline.prompts.learner import clip_logits
from pipeline.prompts.training import batched_gradcam
from stages.cams import _build, image_cams
from stages.clip_features import inference_features


@pytest.mark.parametrize("path", golden_params("gradcam"))
def test_golden_gradcam(path, tmp_path):
    data = np.load(path)
    name, checkpoint = golden_clip_files(data, tmp_path)
    prompts = tmp_path / "prompts.pt"
    torch.save({"spec": golden_prompt_spec(data), "ctx": golden_context(data)}, prompts)
    resource = _build(prompts=str(prompts), model=name, checkpoint=str(checkpoint),
                      pretrained_tag=None, seed=0, device="cpu")
    clip, text, n_fg = resource.clip, resource.text_features, resource.n_fg
    image, blocks = data["image"], int(data["attention_blocks"])

    # inference input: each side up to a multiple of 16, PIL bicubic (no cap: the reference size)
    resized = inference_resize(image, max_side=None)
    np.testing.assert_array_equal(resized, data["resized_image"])
    x, att, grid, input_hw = inference_features(clip, image, blocks, max_side=None)
    np.testing.assert_array_equal(grid, data["grid_hw"])
    assert tuple(input_hw) == data["resized_image"].shape[:2]
    v = clip.visual
    pos = resize_pos_embed(v.positional_embedding, v.grid_size, grid)
    assert_close_rel(pos[:, :16], data["pos_embed_head"], "pos_embed_head")

    # per-layer head-averaged attention, row 1 (first patch token), through the block code
    with torch.no_grad():
        h, rows = clip.embed(to_model_input(resized[None])), []
        for block in v.transformer.resblocks:
            h, a = block_forward(block, h)
            rows.append(a[0, 1])
    assert_close_rel(torch.stack(rows), data["att_layers_row1"], "att_layers_row1")
    assert_close_rel(x, data["x_last_in"], "x_last_in")
    assert_close_rel(att, data["att"], "att")

    assert_close_rel(text, data["text_features_raw"], "text_features_raw")
    with torch.no_grad():
        _, feats = clip.last_block_tail(x[None])
        logits = clip_logits(feats, text, clip.logit_scale)
    assert_close_rel(feats[0], data["image_features"], "image_features")
    assert_close_rel(logits[0], data["logits"], "logits")
    fg_cls = data["fg_cls"]
    hot = torch.zeros(1, n_fg)
    hot[0, torch.from_numpy(fg_cls)] = 1.0
    mask = torch.cat([hot, torch.ones(1, text.shape[0] - n_fg)], dim=1)
    assert_close_rel(masked_softmax(logits, mask)[0], data["probs"], "probs")
    _, weights = batched_gradcam(clip, text, x[None], hot, n_fg, grid, create_graph=False,
                                 with_weights=True)
    assert_close_rel(weights, data["cam_weights"], "cam_weights")

    cam, cls = image_cams(clip, text, n_fg, x.numpy(), fg_cls.tolist(), grid)
    np.testing.assert_array_equal(cls, fg_cls)
    assert cam.dtype == np.float32
    assert_close_rel(cam, data["cam"], "cam")
