"""`wsss seeds`, `wsss import-cams` and `wsss visualize` on small hand-made stores."""
import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.cams.score import cam_score
from pipeline.data.datasets import Record, SplitIndex, split_path
from pipeline.data.imageio import VOC_PALETTE, read_label, read_rgb, write_palette_png
from pipeline.metrics import CamEvaluator, ConfusionAccumulator, cam_confusions
from pipeline.seeds.sams import cam_argmax_seed, sams_seed
from pipeline.store import ImageStore
from stages.cli import main

CLASSES = ["cat", "dog", "car"]
ALPHA = {"coarse": 0.6, "fine": 0.7}
POWERS = [1.0, 2.0, 3.0]
SIZES = {"a": (20, 30), "b": (17, 23), "c": (16, 16)}


def _params(path, **seeds):
    cfg = {
        "dataset": {"name": "demo", "root": "unused", "train_split": "train", "eval_split": "val"},
        "compute": {"scheduler": "local", "workers": 1, "device": "cpu"},
        "seeds": {"coarse": {"alpha": 0.6}, "fine": {"alpha": 0.7}, "cam_bg_powers": POWERS,
                  "fallback_thresh": 0.5, **seeds},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _inputs(tmp_path, with_gt=True):
    """Index of 3 images (c has no quasi-superpixels), CAM store, SAM store, ground truth."""
    rng = np.random.default_rng(0)
    records, cams, sams, gts = [], {}, {}, {}
    for image_id, (h, w) in SIZES.items():
        fg = np.sort(rng.choice(3, 2, replace=False))
        cams[image_id] = (rng.normal(size=(2, (h + 15) // 16, (w + 15) // 16)).astype(np.float32), fg)
        if image_id != "c":
            masks = rng.random((6, h, w)) < 0.3
            sams[image_id] = (masks, rng.integers(0, 3, 6).astype(np.uint8))
        gt = rng.integers(0, 4, (h, w)).astype(np.uint8)
        gt[0, 0] = 255
        gts[image_id] = gt
        label = None
        if with_gt:
            label = str(tmp_path / "gt" / f"{image_id}.png")
            write_palette_png(label, gt)
        records.append(Record(image_id, str(tmp_path / f"{image_id}.jpg"), label, h, w,
                              tuple(int(c) for c in fg)))
    # an image that failed in prepare: no seed for it
    records.append(Record("bad", str(tmp_path / "bad.jpg"), None, 0, 0, (), error="unreadable"))
    index = tmp_path / "index"
    index.mkdir()
    split_path(index, "train").write_text(SplitIndex("demo", "train", CLASSES, records).to_json())
    store = ImageStore.open_for_writing(tmp_path / "cams.zarr", {"fingerprint": "x", "untrained": True})
    for image_id, (cam, fg) in cams.items():
        h, w = SIZES[image_id]
        store.write(image_id, {"cam": cam, "fg_cls": fg.astype(np.int64)}, {"height": h, "width": w})
    sam = ImageStore.open_for_writing(tmp_path / "sam.zarr", {"fingerprint": "y"})
    for image_id, (masks, levels) in sams.items():
        sam.write(image_id, {"masks": masks, "levels": levels})
    return index, cams, sams, gts


def _run_seeds(tmp_path, which="fine", cams="cams.zarr", extra=()):
    args = ["seeds", "--which", which, "--params", str(tmp_path / "params.yaml"),
            "--index", str(tmp_path / "index"), "--cams", str(tmp_path / cams),
            "--sam-masks", str(tmp_path / "sam.zarr"), "--out", str(tmp_path / "seeds" / which),
            "--metrics", str(tmp_path / "metrics.json"), "--plots", str(tmp_path / "plots.json"),
            *extra]
    return CliRunner().invoke(main, args)


def _expected_seed(image_id, cams, sams, alpha):
    cam, fg = cams[image_id]
    hw = SIZES[image_id]
    if image_id in sams:
        return sams_seed(cam, fg, *sams[image_id], alpha, hw)
    return cam_argmax_seed(cam, fg, hw, 0.5)


@pytest.mark.parametrize("which", ["coarse", "fine"])
def test_seeds_stage_writes_exact_seeds_and_metrics(tmp_path, which):
    _params(tmp_path / "params.yaml")
    _, cams, sams, gts = _inputs(tmp_path)
    stale = tmp_path / "seeds" / which / "old.png"
    write_palette_png(stale, np.zeros((2, 2), np.uint8))
    result = _run_seeds(tmp_path, which, extra=["--note", "demo run"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "seeds" / which
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png", "provenance.json"]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["untrained"] is True and provenance["which"] == which
    seeds = {}
    for image_id in SIZES:
        with Image.open(out / f"{image_id}.png") as im:
            assert im.mode == "P"
            assert np.array_equal(np.array(im.getpalette()[:768], np.uint8).reshape(-1, 3),
                                  VOC_PALETTE)
        seeds[image_id] = read_label(out / f"{image_id}.png")
        np.testing.assert_array_equal(seeds[image_id],
                                      _expected_seed(image_id, cams, sams, ALPHA[which]))

    acc, cam_eval, background = ConfusionAccumulator(4), CamEvaluator(4, POWERS), ConfusionAccumulator(4)
    for image_id, seed in seeds.items():
        acc.add(seed, gts[image_id])
        background.add(np.zeros_like(seed), gts[image_id])
        cam, fg = cams[image_id]
        cam_eval.add_confusions(cam_confusions(cam_score(cam, SIZES[image_id]), fg,
                                               gts[image_id], POWERS, 4))
    expected = acc.scores().as_dict(["background", *CLASSES])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["which"] == which and metrics["alpha"] == ALPHA[which]
    assert metrics["n_images"] == 3 and metrics["n_evaluated"] == 3
    assert metrics["n_fallback"] == 1 and metrics["fallback_ids"] == ["c"]
    assert metrics["n_missing_masks"] == 1
    assert metrics["untrained"] is True and metrics["note"] == "demo run"
    assert metrics["cam_source"] == ["cam"]
    # JSON round-trips floats exactly: the stage's sums equal the direct computation's.
    assert metrics["seed"] == expected
    assert metrics["cam"] == json.loads(json.dumps(cam_eval.results()))
    assert metrics["cam"]["best_power"] in POWERS and "cam_caa" not in metrics
    assert metrics["background_only"]["miou"] == background.scores().as_dict()["miou"]
    assert 0 < metrics["background_only"]["miou"] < metrics["seed"]["miou"] <= 100  # percent
    plots = json.loads((tmp_path / "plots.json").read_text())
    assert plots == [{"class": k, "iou": v} for k, v in expected["per_class_iou"].items()]
    assert [p["class"] for p in plots] == ["background", *CLASSES]


def test_seeds_without_ground_truth_has_no_scores(tmp_path):
    _params(tmp_path / "params.yaml")
    _inputs(tmp_path, with_gt=False)
    result = _run_seeds(tmp_path)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_images"] == 3 and metrics["n_evaluated"] == 0
    assert "seed" not in metrics and "cam" not in metrics
    assert json.loads((tmp_path / "plots.json").read_text()) == []


def test_seeds_prefers_caa_cams_and_scores_both(tmp_path):
    _params(tmp_path / "params.yaml")
    _, cams, sams, gts = _inputs(tmp_path)
    cam, fg = cams["a"]
    caa = np.ascontiguousarray(cam[::-1])
    ImageStore(tmp_path / "cams.zarr").write(
        "a", {"cam": cam, "cam_caa": caa, "fg_cls": fg.astype(np.int64)}, {"height": 20, "width": 30})
    assert _run_seeds(tmp_path).exit_code == 0
    np.testing.assert_array_equal(read_label(tmp_path / "seeds" / "fine" / "a.png"),
                                  sams_seed(caa, fg, *sams["a"], 0.7, SIZES["a"]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["cam_source"] == ["cam", "cam_caa"]
    assert "cam_caa" not in metrics  # only one image has CAA CAMs: not a CAA evaluation
    raw, refined = CamEvaluator(4, POWERS), CamEvaluator(4, POWERS)
    for image_id in SIZES:  # now every image gets CAA CAMs (reversed channels)
        cam, fg = cams[image_id]
        caa = np.ascontiguousarray(cam[::-1])
        ImageStore(tmp_path / "cams.zarr").write(
            image_id, {"cam": cam, "cam_caa": caa, "fg_cls": fg.astype(np.int64)},
            {"height": SIZES[image_id][0], "width": SIZES[image_id][1]})
        raw.add(cam_score(cam, SIZES[image_id]), fg, gts[image_id])
        refined.add(cam_score(caa, SIZES[image_id]), fg, gts[image_id])
    assert _run_seeds(tmp_path).exit_code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["cam_source"] == ["cam_caa"]
    assert metrics["cam"] == json.loads(json.dumps(raw.results()))
    assert metrics["cam_caa"] == json.loads(json.dumps(refined.results()))
    assert metrics["cam"] != metrics["cam_caa"]


def test_seeds_missing_cam_image_fails_with_one_line(tmp_path):
    _params(tmp_path / "params.yaml")
    _inputs(tmp_path)
    ImageStore(tmp_path / "cams.zarr").image_path("b").unlink()
    result = _run_seeds(tmp_path)
    assert result.exit_code == 1
    assert "1 of 3 images of split 'train' have no CAMs" in result.output and "(e.g. b)" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not list((tmp_path / "seeds").rglob("*.png"))  # failed before the first seed


def test_seeds_bad_params_name_the_key(tmp_path):
    _params(tmp_path / "params.yaml", coarse={"alpha": "high"})
    _inputs(tmp_path)
    result = _run_seeds(tmp_path)
    assert result.exit_code == 1
    assert "seeds.coarse.alpha" in result.output


def test_seeds_missing_store_fails_cleanly(tmp_path):
    _params(tmp_path / "params.yaml")
    _inputs(tmp_path)
    result = _run_seeds(tmp_path, cams="nope.zarr")
    assert result.exit_code == 1 and "no store at" in result.output


# -- import-cams ---------------------------------------------------------------------------------


def _import(tmp_path, cam_dir):
    return CliRunner().invoke(main, ["import-cams", str(cam_dir), "--index", str(tmp_path / "index"),
                                     "--out", str(tmp_path / "imported.zarr")])


def test_import_cams_round_trip_and_seeding(tmp_path):
    _params(tmp_path / "params.yaml")
    _, cams, sams, _ = _inputs(tmp_path)
    src = tmp_path / "external"
    src.mkdir()
    for image_id, (cam, fg) in cams.items():
        # float64 and uint8 inputs are normalised to the store's float32 / int64
        np.savez(src / f"{image_id}.npz", cam=cam.astype(np.float64) * 2, fg_cls=fg.astype(np.uint8))
    result = _import(tmp_path, src)
    assert result.exit_code == 0, result.output
    store = ImageStore(tmp_path / "imported.zarr")
    assert store.ids() == ["a", "b", "c"]
    for image_id, (cam, fg) in cams.items():
        arrays = store.read(image_id)
        assert set(arrays) == {"cam", "fg_cls"}
        assert arrays["cam"].dtype == np.float32 and arrays["fg_cls"].dtype == np.int64
        np.testing.assert_array_equal(arrays["cam"], cam * 2)
        np.testing.assert_array_equal(arrays["fg_cls"], fg)
        assert store.read_attrs(image_id) == {"height": SIZES[image_id][0],
                                              "width": SIZES[image_id][1]}
    assert _run_seeds(tmp_path, "coarse", cams="imported.zarr").exit_code == 0
    np.testing.assert_array_equal(read_label(tmp_path / "seeds" / "coarse" / "a.png"),
                                  sams_seed(cams["a"][0] * 2, cams["a"][1], *sams["a"], 0.6, (20, 30)))


@pytest.mark.parametrize("arrays, message", [
    ({"cam": np.zeros((2, 3, 3), np.float32)}, "missing array 'fg_cls'"),
    ({"cam": np.zeros((3, 3), np.float32), "fg_cls": np.array([0])}, "'cam' must be (P, h, w)"),
    ({"cam": np.zeros((2, 3, 3), np.int32), "fg_cls": np.array([0, 1])}, "floating point"),
    ({"cam": np.zeros((2, 3, 3), np.float32), "fg_cls": np.array([1, 0])}, "strictly ascending"),
    ({"cam": np.zeros((2, 3, 3), np.float32), "fg_cls": np.array([0, 3])}, "below 3"),
    ({"cam": np.zeros((2, 3, 3), np.float32), "fg_cls": np.array([0])}, "to match 'cam'"),
    ({"cam": np.full((1, 3, 3), np.nan, np.float32), "fg_cls": np.array([0])}, "NaN"),
])
def test_import_cams_rejects_bad_files_before_writing(tmp_path, arrays, message):
    _inputs(tmp_path)
    src = tmp_path / "external"
    src.mkdir()
    np.savez(src / "a.npz", cam=np.zeros((1, 2, 2), np.float32), fg_cls=np.array([0]))
    np.savez(src / "b.npz", **arrays)
    result = _import(tmp_path, src)
    assert result.exit_code == 1
    assert message in result.output and "b.npz" in result.output
    assert not (tmp_path / "imported.zarr").exists()


@pytest.mark.parametrize("content, message", [
    (b"id,cam\na,0.5\n", "b.npz: not an .npz archive; expected a numpy .npz archive with arrays 'cam'"),
    (None, "b.npz: a single .npy array; expected a numpy .npz archive"),
    ("zip", "b.npz: unreadable .npz"),
])
def test_import_cams_names_a_file_of_the_wrong_format(tmp_path, content, message):
    _inputs(tmp_path)
    src = tmp_path / "external"
    src.mkdir()
    np.savez(src / "a.npz", cam=np.zeros((1, 2, 2), np.float32), fg_cls=np.array([0]))
    if content is None:
        with open(src / "b.npz", "wb") as f:
            np.save(f, np.zeros((1, 2, 2), np.float32))
    elif content == "zip":  # a zip archive whose members are not arrays
        import zipfile

        with zipfile.ZipFile(src / "b.npz", "w") as z:
            z.writestr("cam.npy", b"junk")
            z.writestr("fg_cls.npy", b"junk")
    else:
        (src / "b.npz").write_bytes(content)
    result = _import(tmp_path, src)
    assert result.exit_code == 1
    assert "pickled" not in result.output and "Traceback" not in result.output
    assert message in result.output.strip().splitlines()[-1], result.output


def test_import_cams_rejects_ids_outside_the_index(tmp_path):
    _inputs(tmp_path)
    src = tmp_path / "external"
    src.mkdir()
    np.savez(src / "zzz.npz", cam=np.zeros((1, 2, 2), np.float32), fg_cls=np.array([0]))
    result = _import(tmp_path, src)
    assert result.exit_code == 1 and "'zzz'" in result.output


# -- visualize -----------------------------------------------------------------------------------


def test_visualize_writes_panel_of_expected_size(tmp_path):
    _params(tmp_path / "params.yaml")
    _inputs(tmp_path)
    for image_id, (h, w) in SIZES.items():
        rgb = np.random.default_rng(1).integers(0, 255, (h, w, 3), np.uint8)
        Image.fromarray(rgb).save(tmp_path / f"{image_id}.jpg")
    assert _run_seeds(tmp_path).exit_code == 0
    args = ["visualize", "--ids", "a", "--ids", "c", "--which", "fine",
            "--params", str(tmp_path / "params.yaml"), "--index", str(tmp_path / "index"),
            "--cams", str(tmp_path / "cams.zarr"), "--sam-masks", str(tmp_path / "sam.zarr"),
            "--seeds", str(tmp_path / "seeds" / "fine"), "--out", str(tmp_path / "vis")]
    from pipeline.visualization import TITLE_HEIGHT, label_overlay

    pred = np.zeros(SIZES["a"], np.uint8)
    pred[2:9, 3:12] = 2
    write_palette_png(tmp_path / "pred" / "a.png", pred)
    args += ["--predictions", str(tmp_path / "pred")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # titled panels (image, 3 levels, CAM, seed, ground truth [, prediction]) with 4 px gaps,
    # a legend underneath
    for image_id, n_panels in (("a", 8), ("c", 7)):
        h, w = SIZES[image_id]
        with Image.open(tmp_path / "vis" / f"{image_id}.png") as im:
            assert im.mode == "RGB" and im.size[0] == n_panels * w + (n_panels - 1) * 4
            assert im.size[1] >= h + 2 * TITLE_HEIGHT
            panel = np.asarray(im)
        image = read_rgb(tmp_path / f"{image_id}.jpg")
        seed = read_label(tmp_path / "seeds" / "fine" / f"{image_id}.png")
        body = panel[TITLE_HEIGHT:TITLE_HEIGHT + h]
        np.testing.assert_array_equal(body[:, 5 * (w + 4):5 * (w + 4) + w], label_overlay(image, seed))
        assert (panel[:TITLE_HEIGHT] < 128).any()  # titles are drawn
    body = np.asarray(Image.open(tmp_path / "vis" / "a.png"))[TITLE_HEIGHT:TITLE_HEIGHT + SIZES["a"][0]]
    w = SIZES["a"][1]
    np.testing.assert_array_equal(body[:, 7 * (w + 4):7 * (w + 4) + w],
                                  label_overlay(read_rgb(tmp_path / "a.jpg"), pred))
    first = (tmp_path / "vis" / "a.png").read_bytes()
    assert CliRunner().invoke(main, args).exit_code == 0
    assert (tmp_path / "vis" / "a.png").read_bytes() == first  # deterministic colours
    bad = CliRunner().invoke(main, [*args[:2], "nope", *args[5:]])
    assert bad.exit_code == 1 and "'nope'" in bad.output
    # A fixed sample: the first N usable train images (no eval split in this index), in order.
    sampled = CliRunner().invoke(main, ["visualize", "--sample", "2", *args[5:],
                                        "--out", str(tmp_path / "sample")])
    assert sampled.exit_code == 0, sampled.output
    assert sorted(p.name for p in (tmp_path / "sample").iterdir()) == ["a.png", "b.png"]
    assert (tmp_path / "sample" / "a.png").read_bytes() == first
    none = CliRunner().invoke(main, ["visualize", *args[5:]])
    assert none.exit_code == 2 and "--sample" in none.output


def test_seeds_image_without_present_class_is_background(tmp_path):
    _params(tmp_path / "params.yaml")
    _inputs(tmp_path)
    ImageStore(tmp_path / "cams.zarr").write(
        "b", {"cam": np.zeros((0, 2, 2), np.float32), "fg_cls": np.zeros(0, np.int64)},
        {"height": 17, "width": 23})
    result = _run_seeds(tmp_path)
    assert result.exit_code == 0, result.output
    assert not read_label(tmp_path / "seeds" / "fine" / "b.png").any()


def test_visualize_names_a_missing_seed_instead_of_showing_a_black_seed():
    """Eval-split images have no seed: the panel's title says "none" (a black panel titled
    "fine seed" would read as an all-background seed)."""
    from pipeline.visualization import TITLE_HEIGHT, render, titled

    image = np.full((20, 160, 3), 120, np.uint8)  # wide enough for the whole title
    row = render(image, None, None, None, None, None, ["cat"], "fine")
    x0 = 5 * (160 + 4)  # image, three mask levels, CAM, then the seed panel
    strip = row[:TITLE_HEIGHT, x0:x0 + 160]
    np.testing.assert_array_equal(strip, titled(np.zeros_like(image), "fine seed: none")[:TITLE_HEIGHT])
    assert not np.array_equal(strip, titled(np.zeros_like(image), "fine seed")[:TITLE_HEIGHT])


@pytest.mark.parametrize("store, arrays, member, reason", [
    ("cams.zarr", {"cam": np.zeros((2, 2, 2)), "fg_cls": np.array([0, 1])}, "cam/zarr.json",
     "has dtype float64 and 3 dimensions, expected float32 and 3"),
    ("sam.zarr", {"masks": np.zeros((1, 17, 23), bool), "levels": np.zeros((1, 1), np.uint8)},
     "levels/zarr.json", "has dtype uint8 and 2 dimensions, expected uint8 and 1"),
    ("sam.zarr", {"masks": np.zeros((1, 17, 23), bool), "code": np.zeros(1)}, "code/zarr.json",
     "is an unexpected array"),
])
def test_seeds_stop_on_a_stored_image_other_than_expected(tmp_path, store, arrays, member, reason):
    """Stores come through DVC remotes: an image whose arrays are not what the producing stage
    writes stops the stage in one line naming the file and the member (issue 24)."""
    _params(tmp_path / "params.yaml")
    _inputs(tmp_path)
    ImageStore(tmp_path / store).write("b", arrays, {"height": 17, "width": 23})
    result = _run_seeds(tmp_path)
    lines = [line for line in result.output.strip().splitlines() if "img/s" not in line]  # tqdm
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert f"{tmp_path / store / 'b.zip'}: member {member!r} {reason}" in result.output
