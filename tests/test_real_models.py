"""The path a researcher takes with real weights, at the real architectures' sizes.

Random weights written in the real files' formats (tests/real_checkpoints.py: SAM vit_b as
torch.save writes it, open_clip ViT-B-16 as open_clip_pytorch_model.bin, torchvision resnet101
named like torchvision's file), a custom dataset, `wsss configure custom` with the checkpoints and
their checksums, then `dvc repro` of the whole graph with run lengths cut to a few steps: SAM masks
on two small images, CLIP features, 2 prompt iterations each, CAMs, seeds, 1 segmenter iteration at
a small crop, predict on 2 images. Nothing about quality is asserted (the weights are random); every
artifact must exist, carry the checkpoints' checksums and say it is not from an untrained demo model.
"""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

import real_checkpoints
from dvc_project import dvc_env, make_project, ran_stages, sh
from pipeline.data.imageio import write_palette_png
from pipeline.store import ImageStore

pytestmark = pytest.mark.slow

ALL_STAGES = {
    "prepare", "sam_masks", "clip_features", "train_prompts@cls", "cams@cls", "seeds@coarse",
    "train_prompts@seg", "cams@seg", "seeds@fine", "train_segmenter", "predict", "panels",
}
# A real run's recipe (configure) with its run lengths cut down; model sizes stay real.
SHORT = {
    "compute.device": "cpu",
    "sam.points_per_side": 4, "sam.crop_n_layers": 0,
    # random weights predict meaningless IoUs: thresholds off so that masks reach the seeds
    "sam.pred_iou_thresh": 0.0, "sam.stability_score_thresh": 0.0,
    "clip_features.n_views": 2,
    **{f"prompts.{w}.{k}": v for w in ("cls", "seg") for k, v in
       (("iterations", 2), ("warmup_iterations", 1), ("batch_size", 2), ("checkpoint_every", 1))},
    "segmenter.iterations": 1, "segmenter.batch_size": 2, "segmenter.crop_size": 64,
    "segmenter.val_every": 1, "segmenter.checkpoint_every": 1,
    "predict.scales": [1.0], "predict.flip": False,
}


def _dataset(root):
    rng = np.random.default_rng(0)
    for image_id, cls in (("a", 1), ("b", 2)):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (72, 104, 3), np.uint8)).save(root / "images" / f"{image_id}.jpg")
        mask = np.zeros((72, 104), np.uint8)
        mask[10:50, 20:70] = cls
        write_palette_png(root / "masks" / f"{image_id}.png", mask)
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "labels.csv").write_text("a,cat\nb,dog\n")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\n")
    (root / "splits" / "val.txt").write_text("a\nb\n")


def _set(params_path, dotted_values):
    params = yaml.safe_load(params_path.read_text())
    for dotted, value in dotted_values.items():
        node = params
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_real_architectures_through_configure_and_dvc_repro(tmp_path_factory):
    weights = tmp_path_factory.mktemp("weights")
    sam = real_checkpoints.sam_vit_b(weights)
    clip = real_checkpoints.open_clip_vit_b16(weights)
    resnet = real_checkpoints.torchvision_resnet101(weights)
    root = tmp_path_factory.mktemp("real")
    env = dvc_env(root / "home")
    repo = root / "repo"
    make_project(repo, env, {})
    _dataset(repo / "data" / "mine")
    sh("wsss", "configure", "custom", "--root", "data/mine", "--class-names", "data/mine/classes.txt",
       "--labels-file", "data/mine/labels.csv", "--sam-model", "vit_b", "--sam-checkpoint", sam.path,
       "--sam-sha256", sam.sha256, "--clip-checkpoint", clip.path, "--clip-sha256", clip.sha256,
       "--backbone-weights", resnet.path, cwd=repo, env=env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert (params["sam"]["model"], params["clip"]["model"], params["segmenter"]["model"]) == \
        ("vit_b", "ViT-B-16", "deeplabv3plus_r101")
    assert params["segmenter"]["output_stride"] == 8
    _set(repo / "params.yaml", SHORT)
    out = sh("dvc", "repro", cwd=repo, env=env, timeout=3000)
    assert ran_stages(out) == ALL_STAGES, out

    masks = ImageStore(repo / "cache" / "sam_masks.zarr")
    assert masks.ids() == ["a", "b"] and masks.attrs["model"] == "vit_b"
    assert masks.attrs["checkpoint_sha256"] == sam.sha256 and masks.attrs["untrained"] is False
    assert masks.read("a")["masks"].shape[1:] == (72, 104)
    features = ImageStore(repo / "cache" / "clip_features" / "inference.zarr")
    assert features.attrs["clip"]["checkpoint_sha256"] == clip.sha256
    assert features.read("a")["tokens"].shape[-1] == 768  # ViT-B/16's width
    cams = ImageStore(repo / "cache" / "cams" / "seg.zarr")
    assert cams.read("a")["fg_cls"].tolist() == [0] and cams.attrs["untrained"] is False
    for which in ("coarse", "fine"):
        metrics = json.loads((repo / "cache" / "metrics" / f"seeds_{which}.json").read_text())
        assert metrics["untrained"] is False and metrics["n_images"] == 1
    best = __import__("torch").load(repo / "cache" / "segmenter" / "best.pt")
    assert best["model"] == "deeplabv3plus_r101" and best["output_stride"] == 8
    assert best["info"]["encoder_weights_sha256"] == resnet.sha256
    predict = json.loads((repo / "cache" / "metrics" / "predict.json").read_text())
    assert predict["images"] == 2 and predict["untrained"] is False
    assert sorted(p.name for p in (repo / "cache" / "predictions").glob("*.png")) == ["a.png", "b.png"]
    report = sh("wsss", "report", "--json", cwd=repo, env=env)
    assert json.loads(report[report.index("{"):])["fine_seed_miou"] is not None
    assert "up to date" in sh("dvc", "status", cwd=repo, env=env)
