"""``wsss demo-models``: deterministic (reduced) training of the demo CLIP and SAM, whose files load
through the same code paths as real checkpoints, plus the pieces of the training recipes."""
import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from pipeline.demo.clip_training import (
    DEMO_CLIP_MODEL, N_CLASSES, OTHER, ClipTrainingConfig, caption, group_unique, patch_histograms,
    sample_regions,
)
from pipeline.sam.models import SPECS, build_sam_predictor, sam_provenance
from pipeline.weights import sha256sum
from stages.cli import main
from stages.clip_features import ClipConfig, build_clip, clip_provenance, verify_clip

REPO = Path(__file__).resolve().parents[1]


def test_captions_name_exactly_the_given_classes_and_kinds():
    rng = np.random.default_rng(0)
    text = caption((0, 4), (2,), rng)
    assert "car" in text and "fish" in text and "grass" in text
    assert not any(n in text for n in ("boat", "person", "flower", "plane", "sky", "water"))


def test_regions_and_groups():
    cfg = ClipTrainingConfig()
    con = np.full((64, 64), N_CLASSES, np.uint8)  # sky everywhere ...
    con[16:48, 16:48] = 0                          # ... a car in the middle 2x2 patches
    con[:, 48:] = OTHER                            # a distractor strip
    hist = patch_histograms(con)
    assert hist.shape == (4, 4, OTHER + 1) and hist[1, 1, 0] == 256 and hist[0, 3, OTHER] == 256
    regions = sample_regions(hist, 40, cfg, np.random.default_rng(0))
    (box, key), rest = regions[0], regions[1:]
    assert box == (0, 0, 4, 4) and key == ((0,), (0,))  # the whole view names both
    for (y0, x0, y1, x1), (cls, kinds) in rest:
        if (y0, x0, y1, x1) == (1, 1, 2, 2):
            assert (cls, kinds) == ((0,), ())
    keys = [k for _, k in regions]
    groups = group_unique(keys, np.random.default_rng(0), max_groups=3)
    assert len(groups) <= 3
    for g in groups:
        assert len({keys[i] for i in g}) == len(g)  # no duplicate caption content in a group


def test_demo_models_regenerates_deterministically_and_loads_like_real_checkpoints(tmp_path, monkeypatch):
    """Two reduced runs (same seed and threads) give byte-identical weights, which the pipeline
    loads through ``clip.checkpoint`` / ``sam.checkpoint`` like real ones (trained: not untrained)."""
    args = ["demo-models", "--params", str(REPO / "params.yaml"), "--clip-steps", "2", "--sam-steps", "2",
            "--n-images", "8", "--eval-images", "0", "--threads", "1"]
    shas = []
    for run in ("a", "b"):
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / run)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / run / "demo_models.json").read_text())
        assert report["clip"]["config"]["steps"] == 2 and report["sam"]["config"]["n_images"] == 8
        assert sha256sum(tmp_path / run / "clip_demo.pt") == report["clip"]["sha256"]
        assert sha256sum(tmp_path / run / "sam_demo.pth") == report["sam"]["sha256"]
        shas.append((report["clip"]["sha256"], report["sam"]["sha256"]))
    assert shas[0] == shas[1]

    clip_file, sam_file = tmp_path / "a" / "clip_demo.pt", tmp_path / "a" / "sam_demo.pth"
    cfg = ClipConfig(model=DEMO_CLIP_MODEL, checkpoint=str(clip_file), checkpoint_sha256=shas[0][0])
    assert verify_clip(cfg) == shas[0][0]
    assert clip_provenance(cfg, shas[0][0])["untrained"] is False
    clip = build_clip(cfg.model, cfg.checkpoint, None, 0, "cpu")
    state = torch.load(clip_file, map_location="cpu", weights_only=True)
    assert clip.untrained is False and torch.equal(clip.model.visual.proj, state["visual.proj"].float())
    # the pipeline's image feature is open_clip's own (avg pool of the patch tokens, then proj)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(clip.image_features(x), clip.model.encode_image(x), rtol=1e-4, atol=1e-5)

    predictor = build_sam_predictor("demo", sam_file, None)
    state = torch.load(sam_file, map_location="cpu", weights_only=True)
    assert torch.equal(predictor.model.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])
    assert predictor.model.image_encoder.img_size == SPECS["demo"].image_size
    assert sam_provenance("demo", sam_file, None)["untrained"] is False


def test_evaluate_sam_counts_an_image_without_any_mask_as_zero():
    """Thresholds nothing passes: every image keeps no quasi-superpixel, and the held-out report
    says so instead of failing on the empty mask stack."""
    from pipeline.demo.sam_training import build_demo_sam, evaluate_sam
    from pipeline.demo.world import render

    report = evaluate_sam(build_demo_sam(0), [render(0, 0)], points_per_side=4, crop_n_layers=0,
                          pred_iou_thresh=2.0, stability_score_thresh=0.0)
    assert report["masks_per_image"] == 0.0
    assert report["three_level_percent"] == 0.0
    assert report["object_recall_at_0.5_percent"] == 0.0
