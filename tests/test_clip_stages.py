"""Stages clip-features, train-prompts and cams on a tiny demo index, through the real CLI."""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.clip.model import create_clip
from pipeline.data.datasets import load_split
from pipeline.demo.world import DEMO_CLASSES
from pipeline.cams.gradcam import softmax_gradcam
from pipeline.prompts.training import (
    batched_gradcam, present_classes, segmentation_loss, warmup_cosine_factor,
)
from pipeline.prompts.learner import PromptLearner, clip_logits
from pipeline.store import ImageStore
from stages.cli import main
from tests.tiny_params import use_tiny_clip

REPO = Path(__file__).resolve().parents[1]
N_TRAIN = 5
N_FG = len(DEMO_CLASSES)


def _invoke(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipstages")
    params = use_tiny_clip(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["dataset"]["demo"] = {"n_train": N_TRAIN, "n_val": 1, "seed": 0}
    params["compute"] = {"scheduler": "local", "workers": 1, "device": "cpu"}
    params["clip_features"]["n_views"] = 2
    for which in ("cls", "seg"):
        params["prompts"][which].update(iterations=4, warmup_iterations=1, batch_size=3,
                                        checkpoint_every=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    p = str(root / "params.yaml")
    assert _invoke("prepare", "--params", p, "--out", str(root / "index")).exit_code == 0
    res = _invoke("clip-features", "--params", p, "--index", str(root / "index"),
                  "--out", str(root / "features"))
    assert res.exit_code == 0, res.output
    return root


def _args(work, *extra):
    return ["--params", str(work / "params.yaml"), "--index", str(work / "index"), *extra]


def test_clip_features_writes_both_stores(work):
    split = load_split(work / "index", "train")
    views = ImageStore(work / "features" / "train_views.zarr")
    inference = ImageStore(work / "features" / "inference.zarr")
    assert views.ids() == inference.ids() == sorted(r.id for r in split.good())
    assert views.attrs["untrained"] is True and views.attrs["stage"] == "clip_features"
    clip = create_clip("tiny", seed=0)
    for r in split.good()[:2]:
        v = views.read(r.id)
        assert v["tokens"].shape == (2, 197, 64) and v["tokens"].dtype == np.float16
        assert v["views"].shape == (2, 18) and v["views"].dtype == np.float32
        assert np.flatnonzero(v["labels"]).tolist() == sorted(r.labels)
        inf, attrs = inference.read(r.id), inference.read_attrs(r.id)
        gh, gw = -(-r.height // 16), -(-r.width // 16)
        assert (attrs["height"], attrs["width"], attrs["grid_h"], attrs["grid_w"]) == (r.height, r.width, gh, gw)
        assert inf["tokens"].shape == (1 + gh * gw, 64) and inf["tokens"].dtype == np.float32
        assert inf["attention"].shape == (gh * gw, gh * gw)
        # the cached tokens are the model's last-block input of the stored view
        from pipeline.prompts.augment import ViewParams
        from pipeline.clip.features import encode_views
        from pipeline.data.imageio import read_rgb
        again = encode_views(clip, read_rgb(r.image), [ViewParams.from_array(v["views"][1])])
        np.testing.assert_allclose(v["tokens"][1].astype(np.float32), again[0].numpy(), rtol=2e-3, atol=2e-3)


def test_clip_features_resumes_without_recomputing(work):
    image_id = load_split(work / "index", "train").good()[0].id
    group = ImageStore(work / "features" / "inference.zarr").image_path(image_id)
    before = group.stat().st_mtime_ns
    res = _invoke("clip-features", *_args(work, "--out", str(work / "features")))
    assert res.exit_code == 0 and group.stat().st_mtime_ns == before


def test_train_prompts_cls_writes_checkpoint_and_curve(work):
    out, metrics = work / "prompts" / "cls.pt", work / "plots" / "cls.csv"
    res = _invoke("train-prompts", "--which", "cls", *_args(work, "--features", str(work / "features"),
                  "--out", str(out), "--metrics", str(metrics)))
    assert res.exit_code == 0, res.output
    state = torch.load(out, weights_only=True)
    assert state["ctx"].shape == (16, 64) and state["untrained"] is True
    assert state["spec"]["n_fg"] == N_FG and len(state["spec"]["names"]) == N_FG + 25
    rows = list(csv.DictReader(metrics.open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[0]["lr"]) == pytest.approx(1e-5) and float(rows[1]["lr"]) == pytest.approx(1e-3)
    assert not (out.parent / "cls.pt.resume").exists()


def test_train_prompts_resume_equals_uninterrupted(work, monkeypatch):
    from tests.conftest import kill_prompt_training_at

    args = ["train-prompts", "--which", "cls", *_args(work, "--features", str(work / "features"))]
    full = work / "resume" / "full.pt"
    assert _invoke(*args, "--out", str(full), "--metrics", str(work / "resume" / "full.csv")).exit_code == 0
    killed = work / "resume" / "killed.pt"
    revive = kill_prompt_training_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        _invoke(*args, "--out", str(killed), "--metrics", str(work / "resume" / "killed.csv"))
    resume = killed.with_name("killed.pt.resume")
    assert torch.load(resume, weights_only=True)["iteration"] == 2 and not killed.exists()
    revive()
    assert _invoke(*args, "--out", str(killed), "--metrics", str(work / "resume" / "killed.csv")).exit_code == 0
    torch.testing.assert_close(torch.load(killed, weights_only=True)["ctx"],
                               torch.load(full, weights_only=True)["ctx"], rtol=0, atol=0)
    assert (work / "resume" / "killed.csv").read_text() == (work / "resume" / "full.csv").read_text()
    assert not resume.exists()


def test_cams_refuse_prompts_holding_code(work, tmp_path):
    """A prompts file from a shared cache is read as data: a pickled object stops the stage in one
    line naming the file, and its code never runs (issue 24)."""
    from tests.conftest import write_code_pickle

    prompts, marker = tmp_path / "cls.pt", tmp_path / "ran"
    write_code_pickle(prompts, marker, ctx=torch.zeros(16, 64), contexts={})
    res = _invoke("cams", "--which", "cls", *_args(work, "--features", str(work / "features"),
                  "--prompts", str(prompts), "--out", str(tmp_path / "cams.zarr")))
    assert not marker.exists()
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert f"prompts checkpoint {prompts} holds objects other than tensors" in res.output
    assert not (tmp_path / "cams.zarr").exists()


def test_train_prompts_refuses_resume_state_holding_code(work, tmp_path):
    from tests.conftest import write_code_pickle

    out, marker = tmp_path / "cls.pt", tmp_path / "ran"
    resume = tmp_path / "cls.pt.resume"
    write_code_pickle(resume, marker, fingerprint="x", iteration=2)
    res = _invoke("train-prompts", "--which", "cls", *_args(work, "--features", str(work / "features"),
                  "--out", str(out), "--metrics", str(tmp_path / "cls.csv")))
    assert not marker.exists()
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert f"prompts resume state {resume} holds objects other than tensors" in res.output
    assert f"rm {resume}" in res.output and not out.exists()


def test_cams_write_per_contract(work):
    prompts = work / "prompts" / "cls.pt"
    if not prompts.exists():
        test_train_prompts_cls_writes_checkpoint_and_curve(work)
    out = work / "cams" / "cls.zarr"
    res = _invoke("cams", "--which", "cls", *_args(work, "--features", str(work / "features"),
                  "--prompts", str(prompts), "--out", str(out)))
    assert res.exit_code == 0, res.output
    store = ImageStore(out)
    assert store.attrs["untrained"] is True
    for r in load_split(work / "index", "train").good():
        data, attrs = store.read(r.id), store.read_attrs(r.id)
        gh, gw = -(-r.height // 16), -(-r.width // 16)
        assert data["fg_cls"].dtype == np.int64 and data["fg_cls"].tolist() == sorted(r.labels)
        assert data["cam"].shape == data["cam_caa"].shape == (len(r.labels), gh, gw)
        assert data["cam"].dtype == np.float32 and np.isfinite(data["cam"]).all()
        assert (attrs["height"], attrs["width"]) == (r.height, r.width)


def test_cams_without_caa_and_bad_prompts_path(work, tmp_path):
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["cams"]["cls"]["caa"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prompts = work / "prompts" / "cls.pt"
    if not prompts.exists():
        test_train_prompts_cls_writes_checkpoint_and_curve(work)
    base = ["cams", "--which", "cls", "--params", str(tmp_path / "params.yaml"), "--index",
            str(work / "index"), "--features", str(work / "features")]
    res = _invoke(*base, "--prompts", str(prompts), "--out", str(tmp_path / "c.zarr"))
    assert res.exit_code == 0, res.output
    store = ImageStore(tmp_path / "c.zarr")
    assert set(store.read(store.ids()[0])) == {"cam", "fg_cls"}
    res = _invoke(*base, "--prompts", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "d.zarr"))
    assert res.exit_code == 1 and "prompts not found" in res.output and len(res.output.strip().splitlines()) == 1


def test_train_prompts_seg_on_seed_crops(work):
    seeds = work / "seeds"
    seeds.mkdir(exist_ok=True)
    for png in (work / "index" / "demo" / "SegmentationClassAug").glob("*.png"):
        shutil.copy(png, seeds / png.name)  # ground truth stands in for the coarse seeds
    out = work / "prompts" / "seg.pt"
    res = _invoke("train-prompts", "--which", "seg", *_args(work, "--features", str(work / "features"),
                  "--seeds", str(seeds), "--out", str(out), "--metrics", str(work / "plots" / "seg.csv")))
    assert res.exit_code == 0, res.output
    state = torch.load(out, weights_only=True)
    assert state["ctx"].shape == (N_FG + 25, 16, 64)
    assert state["spec"]["names"][N_FG:] == [""] * 25 and state["spec"]["class_position"] == "front"
    res = _invoke("train-prompts", "--which", "seg", *_args(work, "--features", str(work / "features")))
    assert res.exit_code == 1 and "--seeds" in res.output


@pytest.fixture(scope="module")
def clip():
    return create_clip("tiny", seed=0)


def _learner(clip, shared=False):
    return PromptLearner(clip.model, ["ball", "box", "kite", "", ""], n_fg=3, n_ctx=4,
                         shared_context=shared, class_position="front", init_std=0.0125, seed=0)


def test_batched_gradcam_equals_per_class_loop(clip):
    learner = _learner(clip)
    x = torch.randn(2, 197, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    with torch.no_grad():
        text = learner.text_features(clip.model)
    batched = batched_gradcam(clip, text, x, labels, 3, (14, 14), create_graph=False)
    loop = []
    for n, c in [(0, 0), (0, 2), (1, 1)]:
        acts, feats = clip.last_block_tail(x[n : n + 1], requires_grad=True)
        logits = clip_logits(feats, text, clip.logit_scale)
        mask = torch.cat([labels[n], torch.ones(2)])[None]
        loop.append(softmax_gradcam(acts, logits, torch.tensor([c]), mask, (14, 14))[0])
    assert batched.shape == (3, 14, 14)
    torch.testing.assert_close(batched, torch.stack(loop), rtol=1e-5, atol=1e-7)
    assert float(batched.abs().sum()) > 0


def test_cal_gradient_reaches_prompt_context(clip):
    learner = _learner(clip)
    x = torch.randn(2, 197, 64, generator=torch.Generator().manual_seed(1))
    seeds = torch.zeros(2, 224, 224, dtype=torch.uint8)
    seeds[0, 50:120, 60:150] = 1
    seeds[0, 150:200, 10:90] = 3
    seeds[1, :, 100:] = 255
    seeds[1, 20:90, 20:90] = 2
    assert present_classes(seeds, 3).tolist() == [[1, 0, 1], [0, 1, 0]]
    loss, n = segmentation_loss(clip, learner, x, seeds)
    loss.backward()
    assert n == 3 and float(loss.detach()) > 0
    grad = learner.ctx.grad
    assert grad is not None and bool(torch.isfinite(grad).all())
    # classes 0..2 and the background contexts enter through the softmax: all get gradient
    assert bool((grad.abs().flatten(1).sum(1) > 0).all())
    learner.ctx.grad = None
    empty, n_empty = segmentation_loss(clip, learner, x, torch.zeros(2, 224, 224, dtype=torch.uint8))
    empty.backward()
    assert n_empty == 0 and float(empty.detach()) == 0 and float(learner.ctx.grad.abs().sum()) == 0


def test_warmup_then_cosine_schedule():
    f = [warmup_cosine_factor(i, 10, 2, 1e-5, 1e-3) for i in range(11)]
    assert f[0] == f[1] == pytest.approx(1e-2)
    assert f[2] == pytest.approx(1.0) and f[6] == pytest.approx(0.5) and f[10] == pytest.approx(0.0)


def test_train_prompts_exact_path_runs_full_encoder_on_fresh_views(work, tmp_path):
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prompts"]["seg"].update(path="exact", iterations=2, batch_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    seeds = tmp_path / "seeds"
    shutil.copytree(work / "index" / "demo" / "SegmentationClassAug", seeds)
    outs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.pt"
        res = _invoke("train-prompts", "--which", "seg", "--params", str(tmp_path / "params.yaml"),
                      "--index", str(work / "index"), "--features", str(tmp_path / "no-cache-needed"),
                      "--seeds", str(seeds), "--out", str(out), "--metrics", str(tmp_path / f"{run}.csv"))
        assert res.exit_code == 0, res.output
        outs.append(torch.load(out, weights_only=True))
    # deterministic given the seed, and trained (context moved from its initialisation)
    torch.testing.assert_close(outs[0]["ctx"], outs[1]["ctx"], rtol=0, atol=0)
    init = PromptLearner(create_clip("tiny").model, outs[0]["spec"]["names"], N_FG, 16, False, "front",
                         init_std=0.0125, seed=0).ctx.detach()
    assert not torch.equal(outs[0]["ctx"], init)


@pytest.mark.slow
def test_clip_features_on_dask_cluster_equal_serial(work, tmp_path):
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["compute"] = {"scheduler": "local-cluster", "workers": 2, "device": "cpu"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = _invoke("clip-features", "--params", str(tmp_path / "params.yaml"), "--index", str(work / "index"),
                  "--out", str(tmp_path / "features"))
    assert res.exit_code == 0, res.output
    for name in ("train_views.zarr", "inference.zarr"):
        serial, dask = ImageStore(work / "features" / name), ImageStore(tmp_path / "features" / name)
        assert serial.ids() == dask.ids()
        for image_id in serial.ids():
            a, b = serial.read(image_id), dask.read(image_id)
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_clip_stages_load_weights_from_a_checkpoint_file(work, tmp_path):
    """A named architecture with `clip.checkpoint` (the path every real run takes): the weights
    come from the file, and the stores say which file (by checksum) and that it is trained."""
    from pipeline.clip.model import TINY_MODEL
    from pipeline.weights import sha256sum

    trained = create_clip("tiny", seed=7).model
    ckpt = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(trained.state_dict(), ckpt)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["clip"].update(model=TINY_MODEL, checkpoint=str(ckpt), checkpoint_sha256=sha256sum(ckpt))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    base = ["--params", str(tmp_path / "params.yaml"), "--index", str(work / "index")]
    res = _invoke("clip-features", *base, "--out", str(tmp_path / "features"))
    assert res.exit_code == 0, res.output
    store = ImageStore(tmp_path / "features" / "inference.zarr")
    assert store.attrs["untrained"] is False
    assert store.attrs["clip"]["checkpoint_sha256"] == sha256sum(ckpt)
    image_id = store.ids()[0]
    tokens = store.read(image_id)["tokens"]
    # the file's weights (seed 7), not the seed-0 initialisation of the same architecture
    record = next(r for r in load_split(work / "index", "train").good() if r.id == image_id)
    from pipeline.clip.model import inference_resize, to_model_input
    from pipeline.data.imageio import read_rgb
    from pipeline.clip.model import FrozenClip

    x = to_model_input(inference_resize(read_rgb(record.image))[None])
    with torch.no_grad():
        expected = FrozenClip(trained, untrained=False).encode_to_last_block(x)[0].numpy()
        other = create_clip("tiny", seed=0).encode_to_last_block(x)[0].numpy()
    np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(tokens, other, atol=1e-3)
    res = _invoke("train-prompts", "--which", "cls", *base, "--features", str(tmp_path / "features"),
                  "--out", str(tmp_path / "cls.pt"), "--metrics", str(tmp_path / "cls.csv"))
    assert res.exit_code == 0, res.output
    res = _invoke("cams", "--which", "cls", *base, "--features", str(tmp_path / "features"),
                  "--prompts", str(tmp_path / "cls.pt"), "--out", str(tmp_path / "cls.zarr"))
    assert res.exit_code == 0, res.output
    assert ImageStore(tmp_path / "cls.zarr").attrs["untrained"] is False
