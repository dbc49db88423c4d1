"""CLIP feature caches at real-size cost: fp16 CAA attention, one chunk per cached view, the
``clip.max_side`` cap (and CAMs mapped back to the image size), ``compute.precision``."""
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

from conftest import golden_params
from pipeline.cams.caa import class_aware_attention_affinity
from pipeline.clip.model import inference_resize, inference_size
from pipeline.data.datasets import load_split
from pipeline.data.imageio import read_label
from pipeline.store import ImageStore
from stages.cli import main

REPO = Path(__file__).resolve().parents[1]
FP16_CAA_TOLERANCE = 1e-3
"""Held-out CAA on float16-stored attention vs float32, relative to the output's largest value."""


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("path", golden_params("caa_cls") + golden_params("caa_seg"))
def test_caa_on_fp16_attention_moves_less_than_1e_3(path):
    """The inference cache stores the attention in float16 (as the reference does; half the
    cache). CAA on the rounded attention stays within 1e-3 of CAA on the original."""
    data = np.load(path)
    kwargs = dict(sinkhorn_iters=int(data["sinkhorn_iters"]), box_thresh=float(data["box_thresh"]),
                  power=int(data["power"]), propagate=str(data["propagate"]))
    exact = class_aware_attention_affinity(data["cam"], data["att"], **kwargs)
    stored = data["att"].astype(np.float16).astype(np.float32)
    assert not np.array_equal(stored, data["att"])
    rounded = class_aware_attention_affinity(data["cam"], stored, **kwargs)
    assert np.abs(rounded - exact).max() <= FP16_CAA_TOLERANCE * np.abs(exact).max()


def test_inference_size_caps_the_long_side_then_rounds_up_to_16():
    assert inference_size(375, 500, 512) == (384, 512)          # VOC: unaffected by the cap
    assert inference_size(375, 500, None) == (384, 512)
    assert inference_size(1411, 1411, 512) == (512, 512)
    assert inference_size(3000, 4000, 512) == (384, 512)        # a 12 MP photo
    assert inference_size(4000, 3000, None) == (4000, 3008)     # native (the reference)
    assert inference_size(1000, 333, 500) == (512, 176)         # 500 x 166.5 -> up to 16s
    image = np.random.default_rng(0).integers(0, 256, (700, 300, 3), dtype=np.uint8)
    out = inference_resize(image, 512)
    assert out.shape == (512, 224, 3) and out.dtype == np.uint8


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"]["demo"] = {"n_train": 4, "n_val": 1, "seed": 0}
    params["compute"] = {"scheduler": "local", "workers": 1, "device": "cpu", "precision": "fp32"}
    params["clip_features"]["n_views"] = 3
    params["prompts"]["cls"].update(iterations=2, warmup_iterations=1, batch_size=3, checkpoint_every=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert _invoke("prepare", "--params", root / "params.yaml", "--out", root / "index").exit_code == 0
    res = _invoke("clip-features", "--params", root / "params.yaml", "--index", root / "index",
                  "--out", root / "features")
    assert res.exit_code == 0, res.output
    res = _invoke("train-prompts", "--which", "cls", "--params", root / "params.yaml", "--index",
                  root / "index", "--features", root / "features", "--out", root / "cls.pt",
                  "--metrics", root / "cls.csv")
    assert res.exit_code == 0, res.output
    return root


def _variant(work, tmp_path, **changes):
    params = yaml.safe_load((work / "params.yaml").read_text())
    for dotted, value in changes.items():
        node = params
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_inference_attention_is_stored_in_float16(work):
    store = ImageStore(work / "features" / "inference.zarr")
    image_id = store.ids()[0]
    data = store.read(image_id)
    assert data["attention"].dtype == np.float16 and data["tokens"].dtype == np.float32
    assert store.attrs["max_side"] == 512


def test_each_cached_view_is_its_own_chunk_and_read_alone(work, tmp_path):
    views = ImageStore(work / "features" / "train_views.zarr")
    image_id = views.ids()[0]
    with zarr.storage.ZipStore(views.image_path(image_id), mode="r") as zip_store:
        tokens = zarr.open_array(store=zip_store, path="tokens", mode="r")
        # 3 views of 197 tokens (the CLIP's width: params' clip.model), one chunk per view
        assert tokens.shape[:2] == (3, 197) and tokens.chunks == (1, *tokens.shape[1:])
    whole = views.read_array(image_id, "tokens")
    # a copy of the image without the chunks of views 0 and 2 still serves view 1
    copy = tmp_path / "views.zarr"
    shutil.copytree(views.path, copy)
    partial = ImageStore(copy)
    dropped = {f"tokens/c/{k}/0/0" for k in (0, 2)}
    with zipfile.ZipFile(views.image_path(image_id)) as src, \
            zipfile.ZipFile(partial.image_path(image_id), "w") as dst:
        assert dropped <= set(src.namelist())
        for info in src.infolist():
            if info.filename not in dropped:
                dst.writestr(info, src.read(info))
    np.testing.assert_array_equal(partial.read_array(image_id, "tokens", 1), whole[1])
    assert not np.array_equal(partial.read_array(image_id, "tokens")[0], whole[0])  # fill value


def test_cached_training_reads_one_view_not_whole_groups(work, tmp_path, monkeypatch):
    def no_whole_reads(self, image_id):
        raise AssertionError(f"read all arrays of {image_id}")

    monkeypatch.setattr(ImageStore, "read", no_whole_reads)
    res = _invoke("train-prompts", "--which", "cls", "--params", work / "params.yaml", "--index",
                  work / "index", "--features", work / "features", "--out", tmp_path / "cls.pt",
                  "--metrics", tmp_path / "cls.csv")
    assert res.exit_code == 0, res.output
    # same batches as the stage's own run (same views drawn, same context)
    torch.testing.assert_close(torch.load(tmp_path / "cls.pt", weights_only=True)["ctx"],
                               torch.load(work / "cls.pt", weights_only=True)["ctx"], rtol=0, atol=0)


def test_max_side_caps_clip_input_and_cams_map_back_to_the_image(work, tmp_path, caplog):
    """Demo images are 88-160 px; a cap of 64 shrinks every one: the inference cache and the
    CAMs are on the capped grid, the seeds (CAMs resized by the consumer) on the image's size."""
    params = _variant(work, tmp_path, clip__max_side=64)
    with caplog.at_level(logging.WARNING, logger="wsss"):
        res = _invoke("clip-features", "--params", params, "--index", work / "index",
                      "--out", tmp_path / "features")
    assert res.exit_code == 0, res.output
    warnings = [r.getMessage() for r in caplog.records if "clip.max_side" in r.getMessage()]
    assert len(warnings) == 1 and "4 of 4 images" in warnings[0]
    split = load_split(work / "index", "train")
    store = ImageStore(tmp_path / "features" / "inference.zarr")
    assert store.attrs["max_side"] == 64
    for r in split.good():
        attrs = store.read_attrs(r.id)
        assert (attrs["height"], attrs["width"]) == (r.height, r.width)
        expected = inference_size(r.height, r.width, 64)
        assert (attrs["input_height"], attrs["input_width"]) == expected
        assert max(expected) <= 64 + 15
        assert (attrs["grid_h"], attrs["grid_w"]) == (expected[0] // 16, expected[1] // 16)
        assert store.read(r.id)["attention"].shape == (attrs["grid_h"] * attrs["grid_w"],) * 2
    res = _invoke("cams", "--which", "cls", "--params", params, "--index", work / "index",
                  "--features", tmp_path / "features", "--prompts", work / "cls.pt",
                  "--out", tmp_path / "cams.zarr")
    assert res.exit_code == 0, res.output
    cams = ImageStore(tmp_path / "cams.zarr")
    for r in split.good():
        attrs = store.read_attrs(r.id)
        assert cams.read(r.id)["cam"].shape[1:] == (attrs["grid_h"], attrs["grid_w"])
        assert (cams.read_attrs(r.id)["height"], cams.read_attrs(r.id)["width"]) == (r.height, r.width)
    # seeds (no quasi-superpixels here: the CAM-argmax fallback) come out at the image's size
    from pipeline.store import finish

    ImageStore.open_for_writing(tmp_path / "sam.zarr", {"fingerprint": "empty"})
    finish(tmp_path / "sam.zarr")
    res = _invoke("seeds", "--which", "coarse", "--params", params, "--index", work / "index",
                  "--cams", tmp_path / "cams.zarr", "--sam-masks", tmp_path / "sam.zarr",
                  "--out", tmp_path / "seeds", "--metrics", tmp_path / "m.json",
                  "--plots", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    for r in split.good():
        assert read_label(tmp_path / "seeds" / f"{r.id}.png").shape == (r.height, r.width)


def test_bf16_precision_reruns_the_caches_and_stays_close(work, tmp_path):
    """compute.precision changes results: the stores record it and reset on a change; bf16 CAMs
    stay close to the fp32 reference on the tiny model."""
    params = _variant(work, tmp_path, compute__precision="bf16")
    features = tmp_path / "features"
    shutil.copytree(work / "features", features)  # an fp32 cache: must be rebuilt, not resumed
    res = _invoke("clip-features", "--params", params, "--index", work / "index", "--out", features)
    assert res.exit_code == 0, res.output
    fp32 = ImageStore(work / "features" / "inference.zarr")
    bf16 = ImageStore(features / "inference.zarr")
    assert bf16.attrs["precision"] == "bf16" and fp32.attrs["precision"] == "fp32"
    assert bf16.attrs["fingerprint"] != fp32.attrs["fingerprint"]
    image_id = fp32.ids()[0]
    a, b = fp32.read(image_id)["tokens"], bf16.read(image_id)["tokens"]
    assert not np.array_equal(a, b)
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
    for store_params, feats, out in ((work / "params.yaml", work / "features", tmp_path / "c32.zarr"),
                                     (params, features, tmp_path / "c16.zarr")):
        res = _invoke("cams", "--which", "cls", "--params", store_params, "--index", work / "index",
                      "--features", feats, "--prompts", work / "cls.pt", "--out", out)
        assert res.exit_code == 0, res.output
    c32, c16 = ImageStore(tmp_path / "c32.zarr"), ImageStore(tmp_path / "c16.zarr")
    assert c16.attrs["precision"] == "bf16" and c16.attrs["fingerprint"] != c32.attrs["fingerprint"]
    for image_id in c32.ids():
        x, y = c32.read(image_id)["cam"], c16.read(image_id)["cam"]
        assert x.shape == y.shape and np.isfinite(y).all()
        assert np.abs(x - y).max() <= 0.25 * np.abs(x).max()


def test_dvc_yaml_lists_precision_and_cam_iteration_where_they_change_results():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "compute.precision" in stages["clip_features"]["params"]
    assert "compute.precision" in stages["cams"]["do"]["params"]
    assert "prompts.${item}.cam_iteration" in stages["cams"]["do"]["params"]
    train = stages["train_prompts"]["do"]["params"]
    assert "clip" not in train and "clip.max_side" not in train and "clip.model" in train
