"""Stages ``train-segmenter`` and ``predict`` on a tiny demo index (CliRunner, tiny models)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.data.datasets import load_split
from pipeline.demo.world import DEMO_CLASSES
from pipeline.data.imageio import VOC_PALETTE, read_label, read_rgb, write_palette_png
from pipeline.metrics import ConfusionAccumulator, percent
from pipeline.seeds.sams import sams_postprocess
from pipeline.segmenter.model import load_segmenter, predict_probs
from pipeline.store import ImageStore
from stages.cli import main

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 4


def _params(tmp: Path, **overrides) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"].update(name="demo", train_split="train", eval_split="val")
    params["dataset"]["demo"] = {"n_train": 6, "n_val": 3, "seed": 0}
    params["compute"].update(scheduler="local", device="cpu")
    params["sam"].update(model="tiny", points_per_side=4, crop_n_layers=0, min_mask_region_area=0)
    params["segmenter"].update(
        model="tiny", encoder_weights=None, iterations=ITERATIONS, batch_size=2, crop_size=64,
        val_every=2, checkpoint_every=2, seed=0, loader_workers=0,
    )
    params["predict"].update(scales=[0.75, 1.0], flip=True, postprocess=True, alpha=1.0, alpha_sweep=[1.0, 3.0])
    for key, value in overrides.items():
        sec, name = key.split(".")
        params[sec][name] = value
    path = tmp / f"params_{abs(hash(tuple(sorted(map(str, overrides.items())))))}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _qs_arrays(masks: np.ndarray, levels: np.ndarray) -> dict[str, np.ndarray]:
    S = len(masks)
    return {
        "masks": masks, "levels": levels.astype(np.uint8),
        "predicted_iou": np.ones(S, np.float32), "stability_score": np.ones(S, np.float32),
        "bbox_xywh": np.zeros((S, 4), np.int64), "point_coords": np.zeros((S, 2)),
        "crop_box_xywh": np.zeros((S, 4), np.int64),
    }


def _gt_masks(gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quasi-superpixels from ground truth: the background (level 2) and each class (level 2),
    plus the left half of the image as a part (level 1)."""
    values = [v for v in np.unique(gt) if v != 255]
    masks = [gt == v for v in values]
    half = np.zeros(gt.shape, bool)
    half[:, : gt.shape[1] // 2] = True
    return np.stack(masks + [half]), np.array([2] * len(masks) + [1])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared CPU cores; also keeps CPU results bitwise repeatable
    tmp = tmp_path_factory.mktemp("segmenter_stages")
    params = _params(tmp)
    _ok(_invoke("prepare", "--params", params, "--out", tmp / "index"))
    seeds = tmp / "seeds"
    for r in load_split(tmp / "index", "train").good():
        gt = read_label(r.label)
        write_palette_png(seeds / f"{r.id}.png", np.where(gt == 255, 0, gt).astype(np.uint8))
    store = ImageStore.open_for_writing(tmp / "sam_masks.zarr", {"fingerprint": "test"})
    for r in load_split(tmp / "index", "val").good():
        store.write(r.id, _qs_arrays(*_gt_masks(read_label(r.label))))
    out = tmp / "segmenter"
    _ok(_invoke("train-segmenter", "--params", params, "--index", tmp / "index", "--seeds", seeds,
                "--out", out, "--plots", tmp / "plots" / "train.csv"))
    yield tmp, params
    torch.set_num_threads(threads)


def test_train_writes_model_checkpoint_and_curves(workspace):
    tmp, params = workspace
    net, meta = load_segmenter(tmp / "segmenter" / "last.pt")
    stride = yaml.safe_load(params.read_text())["segmenter"]["output_stride"]
    assert meta == {"model": "tiny", "output_stride": stride, "class_names": list(DEMO_CLASSES),
                    "info": {"step": ITERATIONS, "val_miou": meta["info"]["val_miou"], "selected_by": "last iteration",
                             "untrained": False}}  # seeds without provenance: not from random models
    assert 0.0 <= meta["info"]["val_miou"] <= 100.0  # percent
    assert net.segmentation_head[0].out_channels == len(DEMO_CLASSES) + 1
    ckpt = torch.load(tmp / "segmenter" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == ITERATIONS
    rows = list(csv.DictReader((tmp / "plots" / "train.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, ITERATIONS + 1))
    assert float(rows[0]["lr"]) == pytest.approx(0.01)
    assert float(rows[-1]["lr"]) == pytest.approx(0.01 * (1 / ITERATIONS) ** 0.9)
    assert all(float(r["loss"]) > 0 for r in rows)
    # val mIoU every val_every (2) iterations, blank otherwise
    assert [r["val_miou"] != "" for r in rows] == [False, True, False, True]
    assert all(0.0 <= float(r["val_miou"]) <= 100.0 for r in rows if r["val_miou"])  # percent


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_interruption_equals_uninterrupted_run(workspace, monkeypatch, workers):
    """Killed at iteration 3 and rerun: the same files as the uninterrupted run (which had no
    loader workers), with 0 or 2 DataLoader workers (batches depend on the iteration only)."""
    tmp, _ = workspace
    params = _params(tmp, **{"segmenter.loader_workers": workers})
    import pipeline.segmenter.fit as ts

    calls = {"n": 0}
    real_step = ts.train_step

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    out, plots = tmp / f"resumed_{workers}", tmp / "plots" / f"resumed_{workers}.csv"
    args = ("train-segmenter", "--params", params, "--index", tmp / "index", "--seeds", tmp / "seeds",
            "--out", out, "--plots", plots)
    monkeypatch.setattr(ts, "train_step", crash_on_third)
    result = _invoke(*args)
    assert result.exit_code != 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
    monkeypatch.setattr(ts, "train_step", real_step)
    _ok(_invoke(*args))
    for name in ("last.pt", "best.pt"):
        a, b = torch.load(tmp / "segmenter" / name), torch.load(out / name)
        assert a["info"] == b["info"]
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (name, k)
    assert plots.read_text() == (tmp / "plots" / "train.csv").read_text()


def test_unreadable_training_image_is_one_line_from_a_loader_worker(workspace):
    tmp, _ = workspace
    seeds = tmp / "seeds_corrupt"
    shutil.copytree(tmp / "seeds", seeds)
    for png in seeds.glob("*.png"):
        png.write_bytes(b"not a png")
    params = _params(tmp, **{"segmenter.loader_workers": 2})
    result = _invoke("train-segmenter", "--params", params, "--index", tmp / "index", "--seeds", seeds,
                     "--out", tmp / "corrupt", "--plots", tmp / "corrupt.csv")
    assert result.exit_code == 1
    # the progress bar's lines, then the error in one line: no worker traceback
    error = [line for line in result.output.strip().splitlines() if "train segmenter" not in line]
    assert len(error) == 1 and error[0].startswith("Error: image ") and "seeds_corrupt" in error[0], result.output
    assert "Traceback" not in result.output and "worker" not in result.output


def test_batched_validation_equals_one_image_at_a_time(workspace):
    """The stage's val mIoU over batches of equal-size images (each val image twice under
    another id, so batches hold 2 images) equals predict_probs one image at a time."""
    import dataclasses

    import pipeline.segmenter.fit as ts
    from pipeline.segmenter.model import build_segmenter
    from pipeline.segmenter.data import size_batches

    tmp, _ = workspace
    # A random network whose BatchNorm statistics moved off 0/1 predicts many classes (the
    # 4-iteration model predicts one class everywhere, which any batching would reproduce).
    net = build_segmenter("tiny", len(DEMO_CLASSES) + 1, seed=0).train()
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 3, 64, 64))
    net.eval()
    # Ground truth = the network's own prediction with its left third made background, so the
    # mIoU is strictly between 0 and 1 and moves with any changed prediction.
    records, single = [], ConfusionAccumulator(len(DEMO_CLASSES) + 1)
    for r in load_split(tmp / "index", "val").good():
        pred = predict_probs(net, read_rgb(r.image), (1.0,), flip=False).argmax(0).numpy().astype(np.uint8)
        assert len(np.unique(pred)) > 1
        gt = pred.copy()
        gt[:, : gt.shape[1] // 3] = 0
        write_palette_png(tmp / "val_gt" / f"{r.id}.png", gt)
        r = dataclasses.replace(r, label=str(tmp / "val_gt" / f"{r.id}.png"))
        records += [r, dataclasses.replace(r, id=f"{r.id}_again")]
        single.add(pred, gt)
        single.add(pred, gt)
    assert 0 < single.scores().miou < 1
    max_pixels = 2 * max(r.height * r.width for r in records)
    batches = size_batches([(r.height, r.width) for r in records], max_pixels)
    assert sorted(map(len, batches)) == [2] * (len(records) // 2)
    for workers in (0, 2):
        miou = ts.evaluate(net, ts.eval_loader(records, max_pixels, workers), len(DEMO_CLASSES) + 1)
        assert miou == single.scores().miou, workers


def test_changed_params_restart_instead_of_resuming(workspace):
    tmp, _ = workspace
    out = tmp / "restarted"
    shutil.copytree(tmp / "segmenter", out)  # a finished run of other params
    params = _params(tmp, **{"segmenter.lr": 0.02})
    _ok(_invoke("train-segmenter", "--params", params, "--index", tmp / "index", "--seeds", tmp / "seeds",
                "--out", out, "--plots", tmp / "plots" / "restarted.csv"))
    rows = list(csv.DictReader((tmp / "plots" / "restarted.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, ITERATIONS + 1))
    assert float(rows[0]["lr"]) == pytest.approx(0.02)
    a = torch.load(tmp / "segmenter" / "last.pt")["state_dict"]
    b = torch.load(out / "last.pt")["state_dict"]
    assert not torch.equal(a["segmentation_head.0.weight"], b["segmentation_head.0.weight"])


def test_predict_on_eval_split(workspace):
    tmp, params = workspace
    out, metrics_path = tmp / "predictions", tmp / "metrics" / "predict.json"
    _ok(_invoke("predict", "--params", params, "--index", tmp / "index", "--segmenter", tmp / "segmenter",
                "--sam-masks", tmp / "sam_masks.zarr", "--out", out, "--metrics", metrics_path))
    records = load_split(tmp / "index", "val").good()
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(r.id for r in records)
    net, meta = load_segmenter(tmp / "segmenter" / "best.pt")  # predict.checkpoint: best
    raw_acc, post_acc, sweep3 = (ConfusionAccumulator(len(DEMO_CLASSES) + 1) for _ in range(3))
    store = ImageStore(tmp / "sam_masks.zarr")
    for r in records:
        with Image.open(out / f"{r.id}.png") as im:
            assert im.mode == "P" and im.size == (r.width, r.height)
            assert np.array_equal(np.array(im.getpalette()[:768], np.uint8).reshape(256, 3), VOC_PALETTE)
        post, raw = read_label(out / f"{r.id}.png"), read_label(out / "raw" / f"{r.id}.png")
        probs = predict_probs(net, read_rgb(r.image), (0.75, 1.0), flip=True)
        np.testing.assert_array_equal(raw, probs.argmax(0).numpy())
        arrays = store.read(r.id)
        np.testing.assert_array_equal(post, sams_postprocess(probs, arrays["masks"], arrays["levels"], 1.0))
        # Post-processed labels are constant inside each whole (ground-truth region) mask.
        for m, level in zip(arrays["masks"], arrays["levels"]):
            if level == 2:
                assert len(np.unique(post[m])) == 1
        gt = read_label(r.label)
        raw_acc.add(raw, gt)
        post_acc.add(post, gt)
        sweep3.add(sams_postprocess(probs, arrays["masks"], arrays["levels"], 3.0), gt)
    metrics = json.loads(metrics_path.read_text())
    assert metrics["images"] == metrics["images_with_ground_truth"] == len(records)
    # JSON scores are percentages rounded to 0.001 (pipeline.metrics.percent)
    assert metrics["raw"]["miou"] == percent(raw_acc.scores().miou)
    assert metrics["postprocessed"]["miou"] == percent(post_acc.scores().miou)
    assert metrics["postprocessed"]["alpha"] == 1.0
    assert metrics["miou"] == metrics["postprocessed"]["miou"]
    assert metrics["alpha_sweep"] == {
        "1": percent(post_acc.scores().miou), "3": percent(sweep3.scores().miou)
    }
    assert metrics["checkpoint"] == {"which": "best", "file": str(tmp / "segmenter" / "best.pt"),
                                     **meta["info"], "output_stride": meta["output_stride"]}
    assert metrics["untrained"] is False  # hand-made seeds and SAM store, no random model
    assert metrics["compute_precision"] == "fp32"
    assert set(metrics["raw"]["per_class_iou"]) <= {"background", *DEMO_CLASSES}
    assert "background" in metrics["postprocessed"]["per_class_iou"]


def test_predict_folder_of_new_images_with_sam_on_the_fly(workspace):
    tmp, params = workspace
    folder = tmp / "new_images"
    folder.mkdir()
    records = load_split(tmp / "index", "val").good()[:2]
    shutil.copy(records[0].image, folder / "first.jpg")
    Image.open(records[1].image).convert("L").save(folder / "second.png")  # grayscale input
    out = tmp / "folder_predictions"
    _ok(_invoke("predict", "--params", params, "--images", folder, "--segmenter", tmp / "segmenter", "--out", out))
    for name, r in (("first", records[0]), ("second", records[1])):
        for path in (out / f"{name}.png", out / "raw" / f"{name}.png"):
            label = read_label(path)
            assert label.shape == (r.height, r.width) and label.max() <= len(DEMO_CLASSES)


def test_missing_encoder_weights_is_one_clear_line(workspace):
    tmp, _ = workspace
    params = _params(tmp, **{"segmenter.model": "deeplabv3plus_r101"})
    result = _invoke("train-segmenter", "--params", params, "--index", tmp / "index", "--seeds", tmp / "seeds",
                     "--out", tmp / "r101", "--plots", tmp / "r101.csv")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "segmenter.encoder_weights" in lines[0] and "not found" in lines[0]
    assert not (tmp / "r101").exists()


def test_missing_seeds_and_masks_are_clear_errors(workspace):
    tmp, params = workspace
    result = _invoke("train-segmenter", "--params", params, "--index", tmp / "index", "--seeds", tmp / "nowhere",
                     "--out", tmp / "x", "--plots", tmp / "x.csv")
    assert result.exit_code == 1 and "no seed for image" in result.output and "6 missing" in result.output
    result = _invoke("predict", "--params", params, "--index", tmp / "index", "--segmenter", tmp / "segmenter",
                     "--sam-masks", tmp / "none.zarr", "--out", tmp / "y")
    assert result.exit_code == 1 and "no store at" in result.output
    result = _invoke("predict", "--params", params, "--index", tmp / "index", "--segmenter", tmp / "nothing",
                     "--out", tmp / "y")
    assert result.exit_code == 1 and "run `wsss train-segmenter`" in result.output


def test_segmenter_files_holding_code_are_refused_in_one_line(workspace, tmp_path):
    """The resume state and the trained model travel through cache/ and DVC remotes: a pickled
    object in either stops the stage in one line naming the file, and never runs (issue 24)."""
    from tests.conftest import write_code_pickle

    tmp, params = workspace
    out, marker = tmp_path / "segmenter", tmp_path / "ran"
    write_code_pickle(out / "checkpoint.pt", marker, fingerprint="x", step=2)
    result = _invoke("train-segmenter", "--params", params, "--index", tmp / "index", "--seeds", tmp / "seeds",
                     "--out", out, "--plots", tmp_path / "train.csv")
    assert not marker.exists()
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"segmenter resume state {out / 'checkpoint.pt'} holds objects other than tensors" in result.output
    assert not (out / "last.pt").exists()

    write_code_pickle(out / "best.pt", marker, format=2, model="tiny")
    result = _invoke("predict", "--params", params, "--index", tmp / "index", "--segmenter", out,
                     "--out", tmp_path / "predictions")
    assert not marker.exists()
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"segmenter checkpoint {out / 'best.pt'} holds objects other than tensors" in result.output


def test_image_without_quasi_superpixels_keeps_its_raw_prediction(tmp_path):
    from pipeline.sam.quasi_superpixels import QuasiSuperpixels
    from pipeline.segmenter.model import build_segmenter
    from pipeline.params import PredictConfig
    from pipeline.segmenter.predict import summarise
    from pipeline.segmenter.predict import prediction_for_image

    image = np.random.default_rng(0).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "im.png")
    gt = np.zeros((40, 56), np.uint8)
    gt[10:30, 10:30] = 2
    write_palette_png(tmp_path / "gt.png", gt)
    store = ImageStore.open_for_writing(tmp_path / "masks.zarr", {"fingerprint": "t"})
    store.write("im", QuasiSuperpixels.empty(40, 56).to_arrays())
    res = {"net": build_segmenter("tiny", 3).eval(), "meta": {"model": "tiny"}, "generator": None}
    item = {"id": "im", "image": str(tmp_path / "im.png"), "label": str(tmp_path / "gt.png"),
            "scales": [1.0], "flip": False, "postprocess": True, "alpha": 1.0, "alpha_sweep": [2.0],
            "out": str(tmp_path / "out"), "sam_masks": str(tmp_path / "masks.zarr"), "precision": "fp32"}
    result = prediction_for_image(res, item)
    raw = read_label(tmp_path / "out" / "raw" / "im.png")
    np.testing.assert_array_equal(read_label(tmp_path / "out" / "im.png"), raw)
    assert result["no_masks"] is True
    np.testing.assert_array_equal(result["post"][1.0], result["raw"])
    assert result["raw"].sum() == 40 * 56
    metrics = summarise([result], PredictConfig(alpha=1.0, alpha_sweep=[2.0]), ["a", "b"], "tiny")
    assert metrics["images_without_sam_masks"] == 1
    assert metrics["postprocessed"]["miou"] == metrics["raw"]["miou"] == metrics["alpha_sweep"]["2"]


@pytest.mark.slow
def test_predict_on_a_dask_cluster_equals_the_serial_run(workspace):
    tmp, _ = workspace
    params = _params(tmp, **{"compute.scheduler": "local-cluster", "compute.workers": 2})
    serial, parallel = tmp / "serial", tmp / "parallel"
    for out, p in ((serial, _params(tmp)), (parallel, params)):
        _ok(_invoke("predict", "--params", p, "--index", tmp / "index", "--segmenter", tmp / "segmenter",
                    "--sam-masks", tmp / "sam_masks.zarr", "--out", out, "--metrics", out / "metrics.json"))
    files = sorted(p.relative_to(serial) for p in serial.rglob("*.png"))
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*.png")) and len(files) == 6
    for f in files:
        np.testing.assert_array_equal(read_label(serial / f), read_label(parallel / f))
    assert json.loads((serial / "metrics.json").read_text()) == json.loads((parallel / "metrics.json").read_text())


# -- best checkpoint on val (§9), its resume, and predict's choice --------------------------------


def _train(tmp: Path, params: Path, out: Path, plots: Path | None = None, index: Path | None = None):
    return _invoke("train-segmenter", "--params", params, "--index", index or tmp / "index", "--seeds",
                   tmp / "seeds", "--out", out, "--plots", plots or out.with_suffix(".csv"))


def test_best_checkpoint_is_the_best_evaluated_iteration(workspace):
    import pipeline.segmenter.fit as ts

    tmp, _ = workspace
    rows = list(csv.DictReader((tmp / "plots" / "train.csv").open()))
    scored = [(int(r["step"]), float(r["val_miou"])) for r in rows if r["val_miou"]]
    best_step, best_miou = max(scored, key=lambda sv: (sv[1], -sv[0]))  # first of equal scores
    best, meta = load_segmenter(tmp / "segmenter" / "best.pt")
    assert meta["info"] == {"step": best_step, "val_miou": best_miou,
                            "selected_by": "highest single-scale val mIoU", "untrained": False}
    # The file really holds that iteration's weights: re-evaluating it gives its val mIoU.
    val = [r for r in load_split(tmp / "index", "val").good()]
    miou = ts.evaluate(best, ts.eval_loader(val, max_pixels=64 * 64), len(DEMO_CLASSES) + 1)
    assert percent(miou) == pytest.approx(best_miou, abs=1e-3)
    last = torch.load(tmp / "segmenter" / "last.pt")["state_dict"]
    same = all(torch.equal(v, last[k]) for k, v in best.state_dict().items())
    assert same == (best_step == ITERATIONS)


@pytest.fixture(scope="module")
def scripted(workspace):
    """Runs whose val mIoU is scripted (0.2, 0.5, 0.5, 0.4 at iterations 1-4), so the best is
    iteration 2, before a crash at iteration 3: one uninterrupted run and one killed + resumed."""
    import pipeline.segmenter.fit as ts

    tmp, _ = workspace
    params = _params(tmp, **{"segmenter.val_every": 1})
    mp = pytest.MonkeyPatch()
    real_evaluate, real_step = ts.evaluate, ts.train_step

    def script(values):
        values = list(values)
        mp.setattr(ts, "evaluate", lambda *args, **kwargs: values.pop(0))

    script([0.2, 0.5, 0.5, 0.4])
    full = tmp / "scripted_full"
    _ok(_train(tmp, params, full))
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    resumed = tmp / "scripted_resumed"
    script([0.2, 0.5])
    mp.setattr(ts, "train_step", crash_on_third)
    assert _train(tmp, params, resumed).exit_code != 0
    at_crash = torch.load(resumed / "checkpoint.pt", weights_only=True)
    mp.setattr(ts, "train_step", real_step)
    script([0.5, 0.4])  # iterations 3 and 4, after the resume from iteration 2
    _ok(_train(tmp, params, resumed))
    mp.undo()
    assert ts.evaluate is real_evaluate
    return tmp, params, full, resumed, at_crash


def test_best_is_kept_across_a_resume(scripted):
    tmp, _, full, resumed, at_crash = scripted
    assert at_crash["step"] == 2 and at_crash["best"]["step"] == 2
    step2 = at_crash["model"]  # the weights of iteration 2
    for run in (full, resumed):
        best, last = torch.load(run / "best.pt"), torch.load(run / "last.pt")
        # iteration 3 ties 0.5: the first of equal scores stays
        assert best["info"] == {"step": 2, "val_miou": 50.0, "selected_by": "highest single-scale val mIoU",
                                "untrained": False}
        assert last["info"] == {"step": ITERATIONS, "val_miou": 40.0, "selected_by": "last iteration",
                                "untrained": False}
        for k, v in best["state_dict"].items():
            assert torch.equal(v, step2[k]), (run.name, k)
        assert not torch.equal(best["state_dict"]["segmentation_head.0.weight"],
                               last["state_dict"]["segmentation_head.0.weight"])
    for name in ("best.pt", "last.pt"):
        a, b = torch.load(full / name)["state_dict"], torch.load(resumed / name)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert full.with_suffix(".csv").read_text() == resumed.with_suffix(".csv").read_text()


@pytest.mark.parametrize("which, step", [("best", 2), ("last", ITERATIONS)])
def test_predict_uses_the_chosen_checkpoint(scripted, which, step):
    tmp, _, full, _, _ = scripted
    params = _params(tmp, **{"predict.checkpoint": which, "predict.scales": [1.0], "predict.flip": False})
    out = tmp / f"pred_{which}"
    _ok(_invoke("predict", "--params", params, "--index", tmp / "index", "--segmenter", full,
                "--sam-masks", tmp / "sam_masks.zarr", "--out", out, "--metrics", out / "metrics.json"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"]["which"] == which and metrics["checkpoint"]["step"] == step
    assert metrics["checkpoint"]["val_miou"] == {"best": 50.0, "last": 40.0}[which]  # percent
    assert metrics["checkpoint"]["file"] == str(full / f"{which}.pt")
    net, _ = load_segmenter(full / f"{which}.pt")
    for r in load_split(tmp / "index", "val").good():
        expected = predict_probs(net, read_rgb(r.image), (1.0,), flip=False).argmax(0).numpy()
        np.testing.assert_array_equal(read_label(out / "raw" / f"{r.id}.png"), expected)


def test_without_val_ground_truth_best_is_the_last_iteration(workspace, caplog):
    tmp, params = workspace
    index = tmp / "index_no_gt"
    shutil.copytree(tmp / "index", index)
    val = json.loads((index / "val.json").read_text())
    for r in val["records"]:
        r["label"] = None
    (index / "val.json").write_text(json.dumps(val))
    out = tmp / "no_gt"
    with caplog.at_level("WARNING", logger="wsss"):
        _ok(_train(tmp, params, out, index=index))
    assert "best.pt is the last iteration" in caplog.text
    best, last = torch.load(out / "best.pt"), torch.load(out / "last.pt")
    assert best["info"] == {"step": ITERATIONS, "val_miou": None,
                            "selected_by": "last iteration (no val ground truth)", "untrained": False}
    assert all(torch.equal(v, last["state_dict"][k]) for k, v in best["state_dict"].items())
    assert all(r["val_miou"] == "" for r in csv.DictReader(out.with_suffix(".csv").open()))
    # Same weights as the run with ground truth: evaluation never changes training.
    ref = torch.load(tmp / "segmenter" / "last.pt")["state_dict"]
    assert all(torch.equal(v, ref[k]) for k, v in last["state_dict"].items())
    metrics_path = tmp / "no_gt_metrics.json"
    _ok(_invoke("predict", "--params", params, "--index", index, "--segmenter", out,
                "--sam-masks", tmp / "sam_masks.zarr", "--out", tmp / "no_gt_pred", "--metrics", metrics_path))
    metrics = json.loads(metrics_path.read_text())
    assert metrics["checkpoint"]["selected_by"] == "last iteration (no val ground truth)"
    assert metrics["images_with_ground_truth"] == 0 and "miou" not in metrics


# -- precision and sub-batches in the stage ----------------------------------------------------------


def test_changed_precision_restarts_training_and_is_recorded(workspace, caplog):
    tmp, _ = workspace
    out = tmp / "bf16"
    shutil.copytree(tmp / "segmenter", out)  # a finished fp32 run
    params = _params(tmp, **{"compute.precision": "bf16"})
    with caplog.at_level("INFO", logger="wsss"):
        _ok(_train(tmp, params, out))
    assert "training from scratch" in caplog.text
    a = torch.load(tmp / "segmenter" / "last.pt")["state_dict"]
    b = torch.load(out / "last.pt")["state_dict"]
    assert not torch.equal(a["segmentation_head.0.weight"], b["segmentation_head.0.weight"])
    metrics_path = tmp / "bf16_metrics.json"
    _ok(_invoke("predict", "--params", params, "--index", tmp / "index", "--segmenter", out,
                "--sam-masks", tmp / "sam_masks.zarr", "--out", tmp / "bf16_pred", "--metrics", metrics_path))
    assert json.loads(metrics_path.read_text())["compute_precision"] == "bf16"


def test_stage_passes_sub_batches_and_precision_to_each_step(workspace, monkeypatch):
    import pipeline.segmenter.fit as ts

    tmp, _ = workspace
    seen = []
    real_step = ts.train_step

    def spy(*args, **kwargs):
        seen.append((len(args[2]), kwargs["sub_batches"], kwargs["precision"]))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ts, "train_step", spy)
    params = _params(tmp, **{"segmenter.iterations": 2, "segmenter.batch_size": 4, "segmenter.sub_batches": 2,
                             "segmenter.val_every": 0})
    _ok(_train(tmp, params, tmp / "sub_batches"))
    assert seen == [(4, 2, "fp32"), (4, 2, "fp32")]


@pytest.mark.parametrize("override, key", [
    ({"segmenter.sub_batches": 3}, "segmenter.sub_batches"),          # 4 images do not split in 3
    ({"segmenter.sub_batches": 4}, "segmenter.sub_batches"),          # sub-batches of 1 image
    ({"segmenter.output_stride": 32}, "segmenter.output_stride"),
    ({"predict.checkpoint": "final"}, "predict.checkpoint"),
])
def test_bad_recipe_params_name_the_key(workspace, override, key):
    tmp, _ = workspace
    params = _params(tmp, **{"segmenter.batch_size": 4, **override})
    command = "predict" if key.startswith("predict") else "train-segmenter"
    result = _invoke(command, "--params", params, "--index", tmp / "index", "--out", tmp / "never")
    assert result.exit_code == 1 and key in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp / "never").exists()


def test_dvc_stages_depend_on_compute_precision():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("train_segmenter", "predict"):
        assert "compute.precision" in stages[name]["params"], name
        assert "pipeline/precision.py" in stages[name]["deps"], name
    prompts = stages["train_prompts"]["do"]  # prompt training runs in compute.precision too
    assert "compute.precision" in prompts["params"] and "pipeline/precision.py" in prompts["deps"]
    import pipeline.segmenter.fit as ts

    code = {f"{m.replace('.', '/')}.py" for m in ts.CODE_MODULES}
    assert code <= set(stages["train_segmenter"]["deps"])


def test_untrained_upstream_models_are_flagged_through_training_and_predict(workspace):
    """Seeds from random models (the seeds stage's provenance says so) make every downstream
    metrics file say `untrained`, as the seeds' own metrics do."""
    tmp, params = workspace
    seeds = tmp / "seeds_untrained"
    shutil.copytree(tmp / "seeds", seeds)
    (seeds / "provenance.json").write_text(json.dumps({"stage": "seeds", "untrained": True}))
    out = tmp / "segmenter_untrained"
    _ok(_invoke("train-segmenter", "--params", params, "--index", tmp / "index", "--seeds", seeds,
                "--out", out, "--plots", out.with_suffix(".csv")))
    assert torch.load(out / "best.pt")["info"]["untrained"] is True
    pred = tmp / "pred_untrained"
    p = _params(tmp, **{"predict.postprocess": False, "predict.scales": [1.0]})
    _ok(_invoke("predict", "--params", p, "--index", tmp / "index", "--segmenter", out,
                "--out", pred, "--metrics", pred / "metrics.json"))
    assert json.loads((pred / "metrics.json").read_text())["untrained"] is True
