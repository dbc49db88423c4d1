"""The demo SAM's pieces: the CLIP-shaped encoder and its initialisation from the demo CLIP, the
training targets, a resumable deterministic run, and the held-out evaluation's output."""
import numpy as np
import torch

from pipeline.clip.model import to_model_input, vision_trunk
from pipeline.demo.training.clip import create_demo_clip, evaluation_images
from pipeline.demo.training.sam import (
    STATE_FILE, SamTrainingConfig, build_demo_sam, finest_regions, level_maps, lowres_targets, sample_points, train_sam,
    training_items,
)
from pipeline.demo.world import point_masks, render
from pipeline.sam.clip_encoder import load_clip_visual
from pipeline.sam.models import build_sam_predictor
from pipeline.sam.specs import sam_spec

TINY = SamTrainingConfig(n_images=4, steps=4, batch_size=2, points_per_image=4, warmup_steps=2)


def _clip_state():
    return create_demo_clip(0).state_dict()


def test_encoder_from_clip_computes_clips_own_tokens():
    """With the CLIP's weights, the SAM encoder's trunk is the CLIP vision tower run on the
    256-px input (positional embedding resized as the pipeline does), and ``Sam.preprocess``
    normalises as CLIP does."""
    clip = create_demo_clip(0).eval()
    sam = build_demo_sam(0)
    taken = load_clip_visual(sam.image_encoder, clip.state_dict())
    assert "conv1.weight" in taken and "transformer.resblocks.5.mlp.c_proj.weight" in taken
    image = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    x = sam.preprocess(torch.from_numpy(image[0]).permute(2, 0, 1).float())[None]
    torch.testing.assert_close(x, to_model_input(image), rtol=1e-5, atol=1e-5)
    enc = sam.image_encoder
    with torch.no_grad():
        trunk, _ = vision_trunk(clip.visual, x)
        expected = clip.visual.transformer.resblocks[-1](trunk)[:, 1:]
        tokens = {}
        hook = enc.transformer.register_forward_hook(lambda m, i, o: tokens.setdefault("out", o))
        emb = enc(x)
        hook.remove()
    torch.testing.assert_close(tokens["out"][:, 1:], expected, rtol=1e-4, atol=1e-4)
    assert emb.shape == (1, sam_spec("demo").prompt_embed_dim, 16, 16)


def test_lowres_targets_are_the_masks_under_the_point_at_logit_pixel_centres():
    s = render(0, 3, 1)
    maps = level_maps(s.whole, s.part, s.subpart)
    rng = np.random.default_rng(0)
    pts = sample_points(finest_regions(maps), s.instance_class[s.whole] >= 0, 40, 0.5, 0.25, rng)
    h, w = s.whole.shape
    scale = 256 / max(h, w)
    rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
    target, valid = lowres_targets(maps, pts, (rh, rw), 256, 64)
    assert target.shape == (40, 3, 64, 64) and valid.shape == (64, 64)
    ny, nx = int(((c := (np.arange(64) + 0.5) * 4) < rh).sum()), int((c < rw).sum())
    assert valid[:ny, :nx].all() and valid.sum() == ny * nx
    iy, ix = np.minimum((c * h / rh).astype(int), h - 1), np.minimum((c * w / rw).astype(int), w - 1)
    for j, (y, x) in enumerate(pts):
        truth = point_masks(s, int(y), int(x))[:, iy][:, :, ix]  # (3, 64, 64) nearest at the centres
        assert torch.equal(target[j], torch.from_numpy(truth & valid.numpy().astype(bool)).float())
    # nested: a point's sub-part lies in its part, its part in its whole; some point has all three distinct
    assert bool((target[:, 0] <= target[:, 1]).all() and (target[:, 1] <= target[:, 2]).all())
    assert any(0 < target[j, 0].sum() < target[j, 1].sum() < target[j, 2].sum() for j in range(len(pts)))


def test_training_is_deterministic_and_resumes_to_the_same_weights(tmp_path):
    data = training_items(TINY)
    clip = _clip_state()
    straight = train_sam(TINY, clip_state=clip, data=data).state_dict()
    again = train_sam(TINY, clip_state=clip, data=data).state_dict()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    # interrupted after 2 steps (the state is written every step), then rerun: continues from the state

    def stop(step, stats):
        if step == 1:
            raise KeyboardInterrupt

    try:
        train_sam(TINY, clip_state=clip, data=data, state_dir=tmp_path, checkpoint_every=1, progress=stop)
    except KeyboardInterrupt:
        pass
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["step"] == 2
    resumed = train_sam(TINY, clip_state=clip, data=data, state_dir=tmp_path).state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # the encoder started from the CLIP, the untrained SAM's does not
    assert not torch.equal(build_demo_sam(0).image_encoder.conv1.weight, straight["image_encoder.conv1.weight"])


def test_evaluate_reports_sam_point_iou_and_generator_numbers(tmp_path):
    """--evaluate's sam entry, for given weights loaded through the real-checkpoint path."""
    from pipeline.demo.training.evaluate import evaluate_demo_models
    from pipeline.demo.training.run import save_weights

    sam_file = tmp_path / "sam_demo.pth"
    sha = save_weights(build_demo_sam(0).state_dict(), sam_file)
    assert build_sam_predictor("demo", sam_file, sha).model.image_encoder.img_size == 256
    settings = {"points_per_side": 4, "crop_n_layers": 0, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    out = evaluate_demo_models(0, 1, None, str(sam_file), "sam", settings)
    assert "clip" not in out
    sam = out["sam"]
    assert set(sam["point_iou"]) == {"subpart", "part", "whole"}
    assert all(0 <= v <= 1 for v in sam["point_iou"].values())
    assert sam["masks_per_image"] >= 0 and 0 <= sam["three_level_fraction"] <= 1 and 0 <= sam["object_recall"] <= 1
    assert sam["thresholds"] == {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    assert sam["sha256"] == sha
    assert len(evaluation_images(0, 1)) == 1
