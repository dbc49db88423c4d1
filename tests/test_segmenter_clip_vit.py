"""The demo segmenter ``demo_clip_vit``: the committed demo CLIP's vision tower with a small head,
built, loaded, trained and predicted through the same code paths as DeepLabV3+."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.clip.model import create_clip, to_model_input
from pipeline.segmenter.inputs import to_input
from pipeline.segmenter.model import (
    build_segmenter, forward_padded, input_multiple, load_segmenter, predict_probs, save_segmenter,
)
from pipeline.weights import CheckpointError
from pipeline.data.datasets import load_split
from pipeline.data.imageio import read_label, write_palette_png
from pipeline.store import ImageStore
from stages.cli import main
from tests.test_segmenter_stages import _gt_masks, _qs_arrays

REPO = Path(__file__).resolve().parents[1]
DEMO_CLIP = REPO / "pipeline/demo/weights/clip_demo.pt"


def test_encoder_is_the_demo_clips_vision_tower_at_any_grid():
    """With the demo CLIP's weights, the encoder's tokens on an ImageNet-normalised input equal
    CLIP's own last-block output on the CLIP-normalised image, at a non-square size (positional
    embedding resized as the CAM stage resizes it)."""
    net = build_segmenter("demo_clip_vit", 7, DEMO_CLIP, output_stride=16).eval()
    clip = create_clip("wsss-demo-ViT-16", checkpoint=str(DEMO_CLIP))
    image = np.random.default_rng(0).integers(0, 256, (1, 160, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = clip.visual.transformer.resblocks[-1](clip.encode_to_last_block(to_model_input(image)))[:, 1:]
        x = to_input(image) * net.renorm_scale + net.renorm_shift
        tokens = net.encoder.tokens(x)
    assert tokens.shape == (1, 128, 10, 14)
    torch.testing.assert_close(tokens.flatten(2).transpose(1, 2), expected.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x, to_model_input(image), rtol=1e-5, atol=1e-5)


def test_logits_cover_any_input_size_and_save_load_round_trips(tmp_path):
    net = build_segmenter("demo_clip_vit", 5, DEMO_CLIP, output_stride=16).eval()
    assert input_multiple(net) == 16
    x = to_input(np.random.default_rng(1).integers(0, 256, (2, 75, 131, 3), dtype=np.uint8))
    with torch.no_grad():
        logits = forward_padded(net, x)
    assert logits.shape == (2, 5, 75, 131)
    save_segmenter(tmp_path / "m.pt", net, "demo_clip_vit", ["a", "b", "c", "d"], {"step": 1})
    loaded, meta = load_segmenter(tmp_path / "m.pt")
    assert meta["model"] == "demo_clip_vit" and meta["output_stride"] == 16
    image = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    torch.testing.assert_close(predict_probs(loaded, image, (0.75, 1.0)), predict_probs(net, image, (0.75, 1.0)))


def test_needs_its_encoder_weights_and_stride_16(tmp_path):
    with pytest.raises(CheckpointError, match="segmenter.encoder_weights"):
        build_segmenter("demo_clip_vit", 3, None, output_stride=16)
    with pytest.raises(ValueError, match=r"one of \(16,\)"):
        build_segmenter("demo_clip_vit", 3, DEMO_CLIP, output_stride=8)
    corrupt = tmp_path / "clip_demo.pt"  # the committed file's name, so its known checksum applies
    corrupt.write_bytes(DEMO_CLIP.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="SHA-256"):
        build_segmenter("demo_clip_vit", 3, corrupt, output_stride=16)
    foreign = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, foreign)
    with pytest.raises(CheckpointError, match="do not fit the wsss-demo-ViT-16 vision tower"):
        build_segmenter("demo_clip_vit", 3, foreign, output_stride=16)


def test_stage_trains_and_predicts_with_the_demo_segmenter(tmp_path):
    """train-segmenter + predict through the CLI with the embedded default's segmenter keys,
    on a small demo index whose seeds are the ground truth; a stride-8 request is one line."""
    runner = CliRunner()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["segmenter"]["model"] == "demo_clip_vit"
    params["dataset"]["demo"] = {"n_train": 4, "n_val": 2, "seed": 0}
    params["segmenter"].update(iterations=2, batch_size=2, val_every=2, checkpoint_every=2)
    params["predict"].update(scales=[1.0], alpha_sweep=[1.0, 3.0])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    index = tmp_path / "index"

    def run(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    assert run("prepare", "--params", path, "--out", index).exit_code == 0
    seeds = tmp_path / "seeds"
    for r in load_split(index, "train").good():
        gt = read_label(r.label)
        write_palette_png(seeds / f"{r.id}.png", np.where(gt == 255, 0, gt).astype(np.uint8))
    store = ImageStore.open_for_writing(tmp_path / "sam_masks.zarr", {"fingerprint": "test"})
    for r in load_split(index, "val").good():
        store.write(r.id, _qs_arrays(*_gt_masks(read_label(r.label))))
    out = tmp_path / "segmenter"
    result = run("train-segmenter", "--params", path, "--index", index, "--seeds", seeds, "--out", out,
                 "--plots", tmp_path / "train.csv")
    assert result.exit_code == 0, result.output
    net, meta = load_segmenter(out / "best.pt")
    assert meta["model"] == "demo_clip_vit"
    clip = torch.load(DEMO_CLIP, weights_only=True)
    changed = (net.encoder.conv1.weight - clip["visual.conv1.weight"].float()).abs().max()
    assert 0 < changed < 0.1  # fine-tuned from the demo CLIP, not from scratch
    result = run("predict", "--params", path, "--index", index, "--segmenter", out,
                 "--out", tmp_path / "pred", "--metrics", tmp_path / "predict.json",
                 "--sam-masks", tmp_path / "sam_masks.zarr")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "predict.json").read_text())
    assert metrics["model"] == "demo_clip_vit" and 0 <= metrics["postprocessed"]["miou"] <= 100
    assert len(list((tmp_path / "pred").rglob("*.png"))) >= 2
    params["segmenter"]["output_stride"] = 8
    path.write_text(yaml.safe_dump(params))
    result = run("train-segmenter", "--params", path, "--index", index, "--seeds", seeds, "--out", tmp_path / "x",
                 "--plots", tmp_path / "x.csv")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "output_stride of demo_clip_vit must be 16" in lines[0], result.output
