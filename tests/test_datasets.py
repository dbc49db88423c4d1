"""Dataset layouts (VOC, COCO, custom, demo) on small synthetic trees, and bad input."""
import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.data.datasets import (
    VOC_CLASSES, DatasetError, labels_from_mask, load_split, parse_class_list, parse_labels_file,
)
from pipeline.demo.world import DEMO_CLASSES, render as render_demo
from pipeline.data.imageio import read_label, read_rgb, write_palette_png
from stages.cli import main


def _params(tmp_path, **dataset):
    base = {"name": "demo", "root": "unused", "train_split": "train", "eval_split": "val",
            "on_bad_image": "fail", "demo": {"n_train": 3, "n_val": 2, "seed": 0}}
    base.update(dataset)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"dataset": base}))
    return path


def _prepare(tmp_path, params):
    return CliRunner().invoke(main, ["prepare", "--params", str(params), "--out", str(tmp_path / "index")])


def _image(path, h=20, w=30, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def _mask(path, values, h=20, w=30):
    m = np.zeros((h, w), np.uint8)
    for i, v in enumerate(values):
        m[i * 3:(i + 1) * 3, :] = v
    m[-1, :] = 255
    write_palette_png(path, m)


def _voc_tree(root, splits):
    for split, items in splits.items():
        (root / "ImageSets" / "SegmentationAug").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "SegmentationAug" / f"{split}.txt").write_text("\n".join(items) + "\n")
        for image_id, values in items.items():
            _image(root / "JPEGImages" / f"{image_id}.jpg")
            _mask(root / "SegmentationClassAug" / f"{image_id}.png", values)


def test_voc_layout_labels_from_masks(tmp_path):
    root = tmp_path / "VOC"
    _voc_tree(root, {"train_aug": {"2007_000032": [1, 15], "2007_000039": [20]},
                     "val": {"2008_000002": [0, 5]}})
    result = _prepare(tmp_path, _params(tmp_path, name="voc", root=str(root), train_split="train_aug"))
    assert result.exit_code == 0, result.output
    train = load_split(tmp_path / "index", "train_aug")
    assert train.class_names == list(VOC_CLASSES) and train.dataset == "voc"
    assert [(r.id, r.labels, r.height, r.width) for r in train.records] == [
        ("2007_000032", (0, 14), 20, 30), ("2007_000039", (19,), 20, 30)]
    assert load_split(tmp_path / "index", "val").records[0].labels == (4,)


def test_coco_layout(tmp_path):
    root = tmp_path / "coco"
    for split, items in {"train": {"COCO_train2014_000000000009": [1, 80]},
                         "val": {"COCO_val2014_000000000042": [3]}}.items():
        for image_id, values in items.items():
            _image(root / "images" / f"{split}2014" / f"{image_id}.jpg")
            _mask(root / "masks" / f"{split}2014" / f"{image_id}.png", values)
    result = _prepare(tmp_path, _params(tmp_path, name="coco", root=str(root)))
    assert result.exit_code == 0, result.output
    train = load_split(tmp_path / "index", "train")
    assert len(train.class_names) == 80
    assert train.records[0].labels == (0, 79)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_custom_layout_with_optional_masks_and_modes(tmp_path, fmt):
    root = tmp_path / "mine"
    _image(root / "images" / "a.png", mode="L")      # grayscale
    _image(root / "images" / "b.png", mode="RGBA")   # with alpha
    _image(root / "images" / "c.jpg")
    _mask(root / "masks" / "a.png", [2])
    (tmp_path / "classes.txt").write_text("cat\ndog\n# comment\nbird\n")
    labels = {"a": ["dog"], "b": ["cat", "bird"], "c": []}
    if fmt == "json":
        (tmp_path / "labels.json").write_text(json.dumps(labels))
    else:
        (tmp_path / "labels.csv").write_text("id,classes\na,dog\nb,cat;bird\nc,\n")
    params = _params(tmp_path, name="custom", root=str(root), class_names=str(tmp_path / "classes.txt"),
                     labels_file=str(tmp_path / f"labels.{fmt}"))
    result = _prepare(tmp_path, params)
    assert result.exit_code == 0, result.output
    train = load_split(tmp_path / "index", "train")
    assert train.class_names == ["cat", "dog", "bird"]
    assert {r.id: r.labels for r in train.records} == {"a": (1,), "b": (0, 2), "c": ()}
    assert {r.id: r.label is not None for r in train.records} == {"a": True, "b": False, "c": False}
    for r in train.records:
        img = read_rgb(r.image)
        assert img.shape == (20, 30, 3) and img.dtype == np.uint8


def test_demo_is_deterministic_and_consistent(tmp_path):
    a, b = render_demo(0, 5), render_demo(0, 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    result = _prepare(tmp_path, _params(tmp_path))
    assert result.exit_code == 0, result.output
    train = load_split(tmp_path / "index", "train")
    assert [r.id for r in train.records] == ["demo_0000", "demo_0001", "demo_0002"]
    for r in train.records:
        label = read_label(r.label)
        assert label.shape == (r.height, r.width) == read_rgb(r.image).shape[:2]
        n = len(DEMO_CLASSES)
        assert r.labels == labels_from_mask(label, n) == render_demo(0, int(r.id[-4:])).classes
        assert len(r.labels) >= 1 and set(np.unique(label)) <= {*range(n + 1), 255}
    assert [r.id for r in load_split(tmp_path / "index", "val").records] == ["demo_0003", "demo_0004"]


def test_bad_image_fails_with_id_and_path_or_is_skipped(tmp_path):
    root = tmp_path / "VOC"
    _voc_tree(root, {"train": {"x1": [1], "x2": [2]}, "val": {"x3": [3]}})
    (root / "JPEGImages" / "x2.jpg").write_bytes(b"not an image")
    result = _prepare(tmp_path, _params(tmp_path, name="voc", root=str(root)))
    assert result.exit_code != 0
    assert "x2" in result.output and "x2.jpg" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "index").exists()  # nothing half-written
    result = _prepare(tmp_path, _params(tmp_path, name="voc", root=str(root), on_bad_image="skip"))
    assert result.exit_code == 0, result.output
    train = load_split(tmp_path / "index", "train")
    assert [r.id for r in train.good()] == ["x1"] and [r.id for r in train.skipped()] == ["x2"]
    assert "cannot read image" in train.skipped()[0].error


def test_truncated_jpeg_is_caught_by_prepare(tmp_path):
    root = tmp_path / "VOC"
    _voc_tree(root, {"train": {"x1": [1], "x2": [2]}, "val": {"x3": [3]}})
    path = root / "JPEGImages" / "x2.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a cut-off download
    result = _prepare(tmp_path, _params(tmp_path, name="voc", root=str(root)))
    assert result.exit_code == 1 and "x2" in result.output and "truncated" in result.output
    result = _prepare(tmp_path, _params(tmp_path, name="voc", root=str(root), on_bad_image="skip"))
    assert result.exit_code == 0, result.output
    assert [r.id for r in load_split(tmp_path / "index", "train").skipped()] == ["x2"]


def _custom(tmp_path, labels_name, labels_text, splits=True):
    root = tmp_path / "mine"
    for i in ("a", "b"):
        _image(root / "images" / f"{i}.jpg")
    if splits:
        (root / "splits").mkdir(parents=True)
        (root / "splits" / "train.txt").write_text("a\n")
        (root / "splits" / "val.txt").write_text("b\n")
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / labels_name).write_text(labels_text)
    return _params(tmp_path, name="custom", root=str(root), class_names=str(root / "classes.txt"),
                   labels_file=str(root / labels_name))


@pytest.mark.parametrize("name, text, message", [
    ("labels.csv", "", "labels.csv has no image entries"),
    ("labels.csv", "id,classes\n", "labels.csv has no image entries"),
    ("labels.json", "{}", "labels.json has no image entries"),
    ("labels.json", '{"a": ["cat"],\n "b": ["dog"\n', "labels.json: invalid JSON at line 3"),
    ("labels.json", '["a", "b"]', "a JSON labels file maps image id -> list of class names"),
    ("labels.csv", "id,classes\na,cat\nb,cow\n", "labels.csv, line 3: image b: unknown class name 'cow'"),
    ("labels.csv", "a,cat\nb,dog\na,dog\n", "labels.csv, line 3: image a is listed twice (first on line 1)"),
])
def test_bad_labels_file_names_file_and_line(tmp_path, name, text, message):
    result = _prepare(tmp_path, _custom(tmp_path, name, text))
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output


def test_custom_data_without_split_lists_warns(tmp_path, caplog):
    params = _custom(tmp_path, "labels.csv", "a,cat\nb,dog\n", splits=False)
    with caplog.at_level("WARNING", logger="wsss.prepare"):
        result = _prepare(tmp_path, params)
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if "evaluated on its own training images" in r.getMessage()]
    assert len(warnings) == 2 and "split train" in warnings[0]


@pytest.mark.parametrize(
    "dataset, message",
    [
        ({"name": "voc", "root": "/nonexistent/voc"}, "dataset.root not found: /nonexistent/voc"),
        ({"name": "imagenet"}, "dataset.name must be demo, voc, coco or custom"),
        ({"on_bad_image": "ignore"}, "dataset.on_bad_image must be fail or skip"),
        ({"demo": {"n_train": 0, "n_val": 2, "seed": 0}}, "'dataset.demo.n_train' must be >= 1, got 0"),
        ({"nme": "demo"}, "unknown parameter 'dataset.nme'"),
        ({"demo": {"n_train": "many"}}, "'dataset.demo.n_train' must be an integer"),
    ],
)
def test_bad_params_one_clear_line(tmp_path, dataset, message):
    result = _prepare(tmp_path, _params(tmp_path, **dataset))
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_mask_and_split_list(tmp_path):
    root = tmp_path / "VOC"
    _voc_tree(root, {"train": {"x1": [1]}, "val": {"x3": [3]}})
    (root / "SegmentationClassAug" / "x1.png").unlink()
    result = _prepare(tmp_path, _params(tmp_path, name="voc", root=str(root)))
    assert result.exit_code != 0 and "ground-truth mask not found" in result.output
    result = _prepare(tmp_path, _params(tmp_path, name="voc", root=str(root), train_split="train_aug"))
    assert result.exit_code != 0 and "split list not found" in result.output


def test_parsers():
    assert parse_class_list("a\nb\n\n") == ["a", "b"]
    with pytest.raises(DatasetError, match="duplicate"):
        parse_class_list("a\na\n")
    with pytest.raises(DatasetError, match="background"):
        parse_class_list("background\na\n")
    with pytest.raises(DatasetError, match="image z: unknown class name 'cow'"):
        parse_labels_file('{"z": ["cow"]}', "json", ["cat"])
    assert labels_from_mask(np.array([[0, 3, 255, 21]], np.uint8), 20) == (2,)


def test_class_never_present_is_reported_by_name(tmp_path, caplog):
    root = tmp_path / "VOC"
    _voc_tree(root, {"train": {"x1": [1, 15]}, "val": {"x3": [3]}})
    with caplog.at_level("WARNING", logger="wsss.prepare"):
        result = _prepare(tmp_path, _params(tmp_path, name="voc", root=str(root)))
    assert result.exit_code == 0, result.output
    warning = [r.getMessage() for r in caplog.records if "never present" in r.getMessage()]
    assert len(warning) == 2  # one line per split
    assert "split train: classes never present: bicycle, bird," in warning[0]
    assert "aeroplane" not in warning[0] and "person" not in warning[0]


def test_dataset_sources_are_a_registry_with_the_demo_registered(monkeypatch):
    from pipeline.data import registry
    from pipeline.registry import resolve
    from pipeline.errors import PipelineError
    from pipeline.params import DatasetConfig

    assert registry.source_names() == ("voc", "coco", "custom", "demo")
    for name in registry.source_names():
        source = registry.dataset_source(name)
        assert callable(resolve(source.build))
        assert (source.generate is not None) == (name == "demo")
    assert callable(resolve(registry.dataset_source("demo").generate))
    with pytest.raises(PipelineError, match=r"unknown dataset 'imagenet' \(known: voc, coco, custom, demo\)"):
        registry.dataset_source("imagenet")
    # A registered source is a valid dataset.name, listed by the params check.
    monkeypatch.setitem(registry.SOURCES.entries, "mine", registry.DatasetSource(build="pipeline.data.sources:voc_split"))
    assert DatasetConfig(name="mine").name == "mine"
    with pytest.raises(PipelineError, match="dataset.name must be demo, voc, coco, custom or mine, got 'x'"):
        DatasetConfig(name="x")


def test_validating_dataset_names_imports_no_builder():
    import subprocess
    import sys

    code = ("import sys; from pipeline.params import DatasetConfig; DatasetConfig(name='voc'); "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.data.') "
            "or m.startswith('pipeline.demo.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pipeline.data.registry', 'pipeline.demo.registry']"
