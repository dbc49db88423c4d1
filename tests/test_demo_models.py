"""``wsss demo-models``: deterministic (reduced) training of the demo CLIP and SAM, whose files load
through the same code paths as real checkpoints, plus the pieces of the training recipes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.demo.training.clip import (
    DEMO_CLIP_MODEL, N_CLASSES, OTHER, ClipTrainingConfig, concept_prompts, patch_histograms,
)
from pipeline.sam.models import build_sam_predictor, sam_provenance
from pipeline.sam.specs import sam_spec
from pipeline.weights import sha256sum
from stages.cli import main
from pipeline.params import ClipConfig
from pipeline.clip.factory import build_clip, clip_provenance, verify_clip

REPO = Path(__file__).resolve().parents[1]


def test_patch_histograms_and_soft_patch_targets():
    from pipeline.demo.training.clip import _soft_patch_loss

    con = np.full((64, 64), N_CLASSES, np.uint8)  # sky everywhere ...
    con[16:48, 16:48] = 0                          # ... a car in the middle 2x2 patches
    con[:, 48:] = OTHER                            # a distractor strip
    hist = patch_histograms(con)
    assert hist.shape == (4, 4, OTHER + 1) and hist[1, 1, 0] == 256 and hist[0, 3, OTHER] == 256
    flat = hist.reshape(16, -1)
    # a head that names each patch's concept exactly has a lower loss than one that swaps car and sky
    right = torch.full((16, OTHER), -20.0)
    dominant = flat.argmax(1)
    right[np.arange(16), np.where(dominant == OTHER, N_CLASSES, dominant)] = 0.0  # distractors: any kind
    swapped = right[:, [N_CLASSES] + list(range(1, N_CLASSES)) + [0] + list(range(N_CLASSES + 1, OTHER))]
    good = _soft_patch_loss(torch.log_softmax(right, 1), flat, 0.5)
    bad = _soft_patch_loss(torch.log_softmax(swapped, 1), flat, 0.5)
    assert float(good) < 0.5 < float(bad)


def test_clip_recipe_phases_and_prompts():
    cfg = ClipTrainingConfig()
    assert [p.name for p in cfg.phases] == ["features", "cam", "cam-fine"]
    assert cfg.phases[0].prototypes and not cfg.phases[0].cam_weight
    assert all(p.cam_weight > 0 and not p.prototypes and not p.affinity_weight for p in cfg.phases[1:])
    assert cfg.steps == sum(p.steps for p in cfg.phases)
    short = cfg.with_phase_steps(3)
    assert short.steps == 9 and all(p.warmup <= 3 for p in short.phases)
    prompts = concept_prompts(np.random.default_rng(0), canonical=1.0)
    assert prompts[:2] == ["a photo of a car.", "a photo of a boat."] and prompts[N_CLASSES] == "a photo of the sky."


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
        assert [p["steps"] for p in report["clip"]["config"]["phases"]] == [2, 2, 2]
        assert report["sam"]["config"]["n_images"] == 8
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
    assert predictor.model.image_encoder.img_size == sam_spec("demo").image_size
    assert sam_provenance("demo", sam_file, None)["untrained"] is False


def test_evaluate_sam_counts_an_image_without_any_mask_as_zero():
    """Thresholds nothing passes: every image keeps no quasi-superpixel, and the held-out report
    says so instead of failing on the empty mask stack."""
    from pipeline.demo.training.sam import build_demo_sam, evaluate_sam
    from pipeline.demo.world import render

    report = evaluate_sam(build_demo_sam(0), [render(0, 0)], points_per_side=4, crop_n_layers=0,
                          pred_iou_thresh=2.0, stability_score_thresh=0.0)
    assert report["masks_per_image"] == 0.0
    assert report["three_level_percent"] == 0.0
    assert report["object_recall_at_0.5_percent"] == 0.0


def test_committed_demo_clip_loads_through_the_checkpoint_path_with_its_pinned_checksum():
    from pipeline.demo.training.clip import DEMO_CLIP_FILE, DEMO_CLIP_SHA256

    assert DEMO_CLIP_FILE.is_file() and DEMO_CLIP_FILE.stat().st_size <= 15 * 2**20
    assert sha256sum(DEMO_CLIP_FILE) == DEMO_CLIP_SHA256
    cfg = ClipConfig(model=DEMO_CLIP_MODEL, checkpoint=str(DEMO_CLIP_FILE), checkpoint_sha256=DEMO_CLIP_SHA256)
    assert verify_clip(cfg) == DEMO_CLIP_SHA256
    clip = build_clip(cfg.model, cfg.checkpoint, None, 0, "cpu")
    state = torch.load(DEMO_CLIP_FILE, map_location="cpu", weights_only=True)
    assert clip.untrained is False and torch.equal(clip.model.visual.proj, state["visual.proj"].float())


def test_evaluate_refuses_missing_weights_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["demo-models", "--evaluate", "--n", "1", "--clip", str(tmp_path / "none.pt")])
    assert result.exit_code != 0
    assert "not found" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluate_committed_clip_localises_on_held_out_images_of_another_world():
    """`--evaluate` prints one JSON object; on a world it was not trained on, the committed CLIP's
    CAMs beat the all-background score by a wide margin and it classifies well above chance."""
    result = CliRunner().invoke(
        main, ["demo-models", "--evaluate", "--world-seed", "3", "--n", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    clip = report["clip"]
    assert report["world_seed"] == 3 and report["n_images"] == 8
    assert clip["cam_miou"] >= clip["all_background_miou"] + 15
    assert clip["map"] >= 60


@pytest.mark.parametrize("killed_after", [3, 4])
def test_clip_training_resumes_from_its_state_file_to_the_same_weights(tmp_path, killed_after):
    """A run killed after 3 of 8 steps (mid-way through the second phase) or after 4 (at the start
    of the third) and restarted with the same config ends with exactly the weights of an
    uninterrupted run; another config's state is refused."""
    from pipeline.demo.training.clip import STATE_FILE, train_clip, training_images

    torch.set_num_threads(1)
    from pipeline.demo.training.clip import AFFINITY_PHASE, DEFAULT_PHASES

    cfg = ClipTrainingConfig(n_images=6, batch_size=4, crop_sizes=(64,), cam_views=2,
                             phases=DEFAULT_PHASES + (AFFINITY_PHASE,)).with_phase_steps(2)
    data = training_images(cfg)
    whole = train_clip(cfg, data=data).state_dict()

    class Killed(Exception):
        pass

    def kill(step, stats):
        if step + 1 == killed_after:
            raise Killed

    try:
        train_clip(cfg, data=data, progress=kill, state_dir=tmp_path, checkpoint_every=1)
    except Killed:
        pass
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert (state["phase_index"], state["step"]) == divmod(killed_after, 2)
    resumed = train_clip(cfg, data=data, state_dir=tmp_path, checkpoint_every=1).state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    other = ClipTrainingConfig(n_images=6, batch_size=4, crop_sizes=(64,), seed=1).with_phase_steps(2)
    with pytest.raises(ValueError, match="another configuration"):
        train_clip(other, data=data, state_dir=tmp_path)


def test_affinity_term_prefers_attention_within_a_concept():
    from pipeline.demo.training.clip import _affinity_loss

    con = np.full((32, 64), N_CLASSES, np.uint8)  # sky ...
    con[:, 32:] = 0                               # ... beside a car: 2 x 4 patches, 2 of each
    hist = patch_histograms(con).reshape(1, 8, -1)
    concept = hist[0].argmax(1)
    same = torch.from_numpy(concept[:, None] == concept[None, :]).float()[None]
    uniform = torch.full((1, 8, 8), 1 / 8)
    assert float(_affinity_loss(same / same.sum(2, keepdim=True), hist, 0.5)) < 1e-3
    assert float(_affinity_loss(uniform, hist, 0.5)) > 0.6
    assert float(_affinity_loss((1 - same) / (1 - same).sum(2, keepdim=True), hist, 0.5)) > 5


def test_the_demo_trainer_runs_the_pipelines_clip_trunk():
    """One CLIP vision trunk (``pipeline.clip.model.vision_trunk``): in fp32 the demo trainer's
    last-block inputs and attention mean are the frozen encoder's, bit for bit. Under bf16
    autocast the trainer adds the class and positional embeddings uncast (the tokens come out
    fp32, as its bf16 runs always did) where the frozen encoder casts them (bf16 tokens)."""
    from pipeline.clip.model import FrozenClip, vision_trunk
    from pipeline.demo.training.clip import create_demo_clip

    model = create_demo_clip(0).eval()
    clip = FrozenClip(model, untrained=False)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens, attention = vision_trunk(model.visual, x, 3, cast=False)
        expected_tokens, expected_attention = clip.encode_with_attention(x, 3)
        assert torch.equal(tokens, expected_tokens) and torch.equal(attention, expected_attention)
        assert attention.shape == (2, 24, 24) and vision_trunk(model.visual, x)[1] is None
        assert torch.equal(vision_trunk(model.visual, x, cast=False)[0], clip.encode_to_last_block(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert vision_trunk(model.visual, x, cast=False)[0].dtype == torch.float32
            assert clip.encode_to_last_block(x).dtype == torch.bfloat16


def test_the_library_embeds_clip_patches_in_one_place():
    """Patch convolution, class token and positional embedding are read by
    ``pipeline.clip.model.vision_embed`` only: the frozen encoder, the demo CLIP's trainer and the
    CLIP-shaped encoder of the demo SAM and segmenter all call it (no second copy of the trunk)."""
    import re

    readers = sorted(str(p.relative_to(REPO)) for folder in ("pipeline", "stages", "benchmarks")
                     for p in (REPO / folder).rglob("*.py")
                     if re.search(r"class_embedding\.|positional_embedding,|\.conv1\(", p.read_text()))
    assert readers == ["pipeline/clip/model.py"]
