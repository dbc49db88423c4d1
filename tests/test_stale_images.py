"""No stale images: an image replaced under the same id (and size) is recomputed in every
per-image store, and nothing else is; a stage never reads an upstream image computed from another
version of the image. In-process runs on a custom dataset and on the demo world with the tiny
models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.store import INPUTS_KEY, ImageStore
from stages.cli import main
from tests.tiny_params import use_tiny_clip

REPO = Path(__file__).resolve().parents[1]
IDS = {"train": ("a", "b", "c"), "val": ("d",)}
STORES = ("sam_masks.zarr", "features/train_views.zarr", "features/inference.zarr", "cls.zarr")


def _invoke(*args, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((40, 56, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    y, x = rng.integers(4, 20, 2)
    pixels[y:y + 16, x:x + 24] = rng.integers(0, 255, 3, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _dataset(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    for i, image_id in enumerate(IDS["train"] + IDS["val"]):
        _image(root / "images" / f"{image_id}.png", i)
    (root / "classes.txt").write_text("cat\ndog\n")
    labels = {"a": ["cat"], "b": ["dog"], "c": ["cat", "dog"], "d": ["dog"]}
    (root / "labels.json").write_text(json.dumps(labels))
    for split, ids in IDS.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def _params(work: Path, root: Path | None) -> Path:
    """Tiny params for the custom dataset at ``root``, or for the demo world (``root`` None)."""
    params = use_tiny_clip(yaml.safe_load((REPO / "params.yaml").read_text()))
    if root is None:
        params["dataset"].update(name="demo", demo={"n_train": 3, "n_val": 1, "seed": 0})
    else:
        params["dataset"].update(name="custom", root=str(root), class_names=str(root / "classes.txt"),
                                 labels_file=str(root / "labels.json"), train_split="train",
                                 eval_split="val")
    params["compute"] = {"scheduler": "local", "workers": 1, "device": "cpu", "precision": "fp32"}
    params["sam"].update(model="tiny", checkpoint=None, points_per_side=4, crop_n_layers=0,
                         pred_iou_thresh=0.0, stability_score_thresh=0.0)
    params["clip_features"]["n_views"] = 2
    params["prompts"]["cls"].update(iterations=2, warmup_iterations=1, batch_size=2)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _per_image_stages(params: Path, index: Path, out: Path, prompts: Path | None = None) -> None:
    """sam-masks, clip-features, (train-prompts when no ``prompts``), cams, seeds into ``out``."""
    common = ["--params", params, "--index", index]
    _invoke("sam-masks", *common, "--out", out / "sam_masks.zarr")
    _invoke("clip-features", *common, "--out", out / "features")
    if prompts is None:
        prompts = out / "cls.pt"
        _invoke("train-prompts", "--which", "cls", *common, "--features", out / "features",
                "--out", prompts, "--metrics", out / "cls.csv")
    _invoke("cams", "--which", "cls", *common, "--features", out / "features",
            "--prompts", prompts, "--out", out / "cls.zarr")
    _invoke("seeds", "--which", "coarse", *common, "--cams", out / "cls.zarr",
            "--sam-masks", out / "sam_masks.zarr", "--out", out / "seeds",
            "--metrics", out / "seeds.json", "--plots", out / "seeds_plots.json")


def _files(out: Path) -> dict[str, tuple[bytes, int]]:
    """(bytes, inode) of every image file of the per-image stores and of the seed PNGs."""
    files = {}
    for store in STORES:
        for path in sorted((out / store).glob("*.zip")):
            files[f"{store}/{path.name}"] = (path.read_bytes(), path.stat().st_ino)
    for path in sorted((out / "seeds").glob("*.png")):
        files[f"seeds/{path.name}"] = (path.read_bytes(), path.stat().st_ino)
    return files


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    work = tmp_path_factory.mktemp("stale")
    root = work / "data"
    _dataset(root)
    params = _params(work, root)
    _invoke("prepare", "--params", params, "--out", work / "index")
    _per_image_stages(params, work / "index", work / "out")
    return work, params, _files(work / "out")


def test_every_image_records_the_content_digest_it_was_computed_from(before):
    work, _, _ = before
    records = json.loads((work / "index" / "train.json").read_text())["records"]
    assert all(len(r["digest"]) == 32 for r in records)
    for store in STORES:
        s = ImageStore(work / "out" / store)
        recorded = {i: s.recorded_inputs(i) for i in s.ids()}
        assert all(recorded.values()) and len(set(recorded.values())) == len(recorded), store
        assert s.read_attrs(s.ids()[0])[INPUTS_KEY] == recorded[s.ids()[0]]


@pytest.fixture(scope="module")
def before_demo(tmp_path_factory):
    """The same runs on the demo world (3 train images and 1 val, rendered by prepare)."""
    work = tmp_path_factory.mktemp("stale_demo")
    params = _params(work, None)
    _invoke("prepare", "--params", params, "--out", work / "index")
    _per_image_stages(params, work / "index", work / "out")
    return work, params, _files(work / "out")


def _replace_custom(work: Path, monkeypatch) -> str:
    _image(work / "data" / "images" / "b.png", 99)  # same id, same size, other pixels
    return "b"


def _replace_demo(work: Path, monkeypatch) -> str:
    """The world renders demo_0001 with other pixels (same size, same labels), as a change to the
    world's code for that one image would; prepare writes the demo again."""
    import dataclasses

    import pipeline.demo.dataset

    render = pipeline.demo.dataset.render_demo

    def render_one_changed(seed, index):
        sample = render(seed, index)
        return dataclasses.replace(sample, image=255 - sample.image) if index == 1 else sample

    monkeypatch.setattr(pipeline.demo.dataset, "render_demo", render_one_changed)
    return "demo_0001"


@pytest.mark.parametrize("dataset", ["custom", "demo"])
def test_a_replaced_image_is_recomputed_in_every_per_image_stage_and_nothing_else(dataset, request,
                                                                                  monkeypatch):
    work, params, files_before = request.getfixturevalue("before" if dataset == "custom" else "before_demo")
    index, out = work / "index", work / "out"
    victim = {"custom": _replace_custom, "demo": _replace_demo}[dataset](work, monkeypatch)
    _invoke("prepare", "--params", params, "--out", index)

    # Before clip-features has caught up, cams refuses the stale features of the victim.
    result = _invoke("cams", "--which", "cls", "--params", params, "--index", index,
                     "--features", out / "features", "--prompts", out / "cls.pt",
                     "--out", work / "refused.zarr", expect=1)
    assert f"image {victim} in" in result.output and "rerun `wsss clip-features`" in result.output
    assert [line for line in result.output.splitlines() if "rerun" in line] == \
        [result.output.strip().splitlines()[-1]]
    assert not list((work / "refused.zarr").glob("*.zip"))

    # The prompts stay those trained before, so only the victim's inputs changed for every stage.
    _per_image_stages(params, index, out, prompts=out / "cls.pt")
    files_after = _files(out)
    assert sorted(files_after) == sorted(files_before)
    changed = {name for name in files_after if files_after[name][0] != files_before[name][0]}
    rewritten = {name for name in files_after if files_after[name][1] != files_before[name][1]}
    per_image = {f"{store}/{victim}.zip" for store in STORES}
    assert per_image <= changed, f"a store served {victim}'s old artifact"
    assert rewritten - {n for n in rewritten if n.startswith("seeds/")} == per_image
    # Seeds are recomputed every run (no resume); only the victim's differs.
    assert {n for n in changed if n.startswith("seeds/")} <= {f"seeds/{victim}.png"}

    # What the resumed stores hold equals a fresh run on the new data, byte for byte.
    fresh = work / "fresh"
    _per_image_stages(params, index, fresh, prompts=out / "cls.pt")
    fresh_files = _files(fresh)
    assert {n: v[0] for n, v in fresh_files.items()} == {n: v[0] for n, v in files_after.items()}


def test_seeds_refuse_quasi_superpixels_of_another_image_version(before, tmp_path):
    work, params, _ = before
    out = work / "out"
    stale = tmp_path / "sam_masks.zarr"
    shutil.copytree(out / "sam_masks.zarr", stale)
    target = ImageStore(stale).image_path("a")
    shutil.copy(ImageStore(stale).image_path("c"), target)  # a's file now holds c's masks
    result = _invoke("seeds", "--which", "coarse", "--params", params, "--index", work / "index",
                     "--cams", out / "cls.zarr", "--sam-masks", stale, "--out", tmp_path / "seeds",
                     "--metrics", tmp_path / "m.json", "--plots", tmp_path / "p.json", expect=1)
    assert "image a in" in result.output and "rerun `wsss sam-masks`" in result.output


def _copy_with_index(work: Path, dest: Path) -> Path:
    """The custom dataset and its index copied to ``dest`` (index paths pointed at the copy)."""
    shutil.copytree(work / "data", dest / "data")
    shutil.copytree(work / "index", dest / "index")
    for path in (dest / "index").glob("*.json"):
        path.write_text(path.read_text().replace(str(work / "data"), str(dest / "data")))
    return dest / "index"


@pytest.mark.parametrize("stage", ["sam-masks", "clip-features"])
def test_an_image_edited_after_prepare_stops_the_stage_that_reads_it(before, tmp_path, stage):
    """The stage is run directly (not through DVC, which would rerun prepare first): the image's
    bytes are hashed as they are read, and bytes other than the index's stop it in one line."""
    work, params, _ = before
    index = _copy_with_index(work, tmp_path)
    # Same id and size, other pixels (than both versions the other tests index).
    _image(tmp_path / "data" / "images" / "b.png", 1234)
    out = tmp_path / "out"
    result = _invoke(stage, "--params", params, "--index", index, "--out", out, expect=1)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "image b (" in errors[0], result.output
    assert "b.png changed after the index was made" in errors[0]
    assert "rerun `wsss prepare`" in errors[0]
    stores = [out] if stage == "sam-masks" else [out / "train_views.zarr", out / "inference.zarr"]
    for store in stores:
        assert "b" not in ImageStore(store)


def test_predict_hashes_the_image_it_reads(before, tmp_path):
    from pipeline.data.imageio import ImageChangedError, image_digest
    from pipeline.segmenter.predict import prediction_for_image

    work, _, _ = before
    image = work / "data" / "images" / "d.png"
    item = {"id": "d", "image": str(image), "digest": image_digest(b"other bytes")}
    with pytest.raises(ImageChangedError, match="d.png changed after the index was made"):
        prediction_for_image({"generator": None}, item)
