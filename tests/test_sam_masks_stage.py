"""End-to-end tests of ``wsss sam-masks`` on a tiny demo index (tiny random SAM, 8x8 points)."""
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.data.datasets import load_split
from pipeline.data.imageio import image_digest, read_rgb
from pipeline.sam.quasi_superpixels import QuasiSuperpixels
from pipeline.store import FINGERPRINT_KEY, INPUTS_KEY, ImageStore
from stages import sam_masks as sam_masks_stage
from stages.cli import main as cli
from pipeline.provenance import image_inputs
from pipeline.params import section
from pipeline.params import SamConfig
from pipeline.sam.generators import sam_generator
from pipeline.sam.maskers import build_generator
from stages.sam_masks import store_attrs

REPO = Path(__file__).resolve().parents[1]
DTYPES = {
    "masks": np.bool_, "levels": np.uint8, "predicted_iou": np.float32,
    "stability_score": np.float32, "bbox_xywh": np.int64, "point_coords": np.float64,
    "crop_box_xywh": np.int64,
}


def make_params(path: Path, sam=None, compute=None, dataset=None) -> Path:
    """The repo's dataset/compute/sam sections, shrunk for speed, with overrides."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    params = {k: base[k] for k in ("dataset", "compute", "sam")}
    params["dataset"].update(name="demo", demo={"n_train": 3, "n_val": 2, "seed": 0})
    params["compute"].update(scheduler="local", device="cpu")
    params["sam"].update(model="tiny", points_per_side=8, points_per_batch=64, crop_n_layers=0)
    for key, extra in (("sam", sam), ("compute", compute), ("dataset", dataset)):
        params[key].update(extra or {})
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run(*args, expect=0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def sam_masks(params, index, out, caplog=None, expect=0):
    if caplog is not None:
        caplog.set_level(logging.INFO, logger="wsss")
        caplog.clear()
    result = run("sam-masks", "--params", params, "--index", index, "--out", out, expect=expect)
    if caplog is None:
        return result
    summary = [r.getMessage() for r in caplog.records if r.name == "wsss.sam_masks"]
    assert len(summary) == 1
    return summary[0]


def read_all(out) -> dict:
    store = ImageStore(out)
    return {i: store.read(i) for i in store.ids()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for image_id in a:
        assert a[image_id].keys() == b[image_id].keys()
        for name, arr in a[image_id].items():
            other = b[image_id][name]
            assert arr.dtype == other.dtype and arr.shape == other.shape, (image_id, name)
            assert arr.tobytes() == other.tobytes(), (image_id, name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A prepared 3+2-image demo index and one serial sam-masks run over it."""
    root = tmp_path_factory.mktemp("sam_stage")
    params = make_params(root / "params.yaml")
    run("prepare", "--params", params, "--out", root / "index")
    out = root / "sam_masks.zarr"
    sam_masks(params, root / "index", out)
    return root, params, root / "index", out


def test_store_has_every_image_with_contract_arrays_and_provenance(demo):
    root, params_path, index, out = demo
    records = load_split(index, "train").good() + load_split(index, "val").good()
    store = ImageStore(out)
    assert store.ids() == sorted(r.id for r in records) and len(records) == 5
    assert not (root / "sam_masks.zarr.partial").exists()

    params = yaml.safe_load(params_path.read_text())
    cfg = section(params, "sam", SamConfig)
    attrs = store.attrs
    assert attrs["stage"] == "sam_masks"
    assert attrs["model"] == "tiny"
    assert attrs["checkpoint_sha256"] == "random-init"
    assert attrs["untrained"] is True and attrs["sam_oracle"] is False
    assert attrs["package_version"]
    # params.yaml's placeholder pipeline/no_checkpoint.txt is no checkpoint: None in provenance
    assert attrs["sam"] == {**params["sam"], "crop_overlap_ratio": cfg.crop_overlap_ratio, "checkpoint": None}
    assert attrs["precision"] == "fp32"
    assert attrs["fingerprint"] == store_attrs(cfg, "fp32")["fingerprint"]

    settings = cfg.generator_settings()
    generator = build_generator("tiny", None, None, cfg.mask_threshold, "cpu", "fp32", **settings)
    for r in records:
        arrays = store.read(r.id)
        assert {k: v.dtype.type for k, v in arrays.items()} == DTYPES
        s = len(arrays["levels"])
        assert arrays["masks"].shape == (s, r.height, r.width)
        for name, shape in (("predicted_iou", (s,)), ("stability_score", (s,)),
                            ("bbox_xywh", (s, 4)), ("point_coords", (s, 2)),
                            ("crop_box_xywh", (s, 4))):
            assert arrays[name].shape == shape, name
        assert store.read_attrs(r.id) == {"height": r.height, "width": r.width,
                                          INPUTS_KEY: image_inputs(r),
                                          FINGERPRINT_KEY: attrs["fingerprint"]}
        # Generator order: wholes, then parts, then sub-parts.
        assert np.all(np.diff(arrays["levels"].astype(int)) <= 0)
        # The store holds exactly what the generator computes for the image.
        expected = generator.generate(read_rgb(r.image)).to_arrays()
        assert_same({r.id: arrays}, {r.id: expected})
        QuasiSuperpixels.from_arrays(arrays)


def test_rerun_resumes_computing_only_missing_images(demo, tmp_path, caplog):
    _, params, index, out = demo
    copy = tmp_path / "sam_masks.zarr"
    shutil.copytree(out, copy)
    store = ImageStore(copy)
    ids = store.ids()
    victim = ids[1]
    store.image_path(victim).unlink()
    # What a killed run leaves behind: a half-written image in the temporary directory.
    (tmp_path / "sam_masks.zarr.partial").mkdir()
    (tmp_path / "sam_masks.zarr.partial" / f"{victim}.dead.zip").write_bytes(b"PK\x03\x04")
    kept = {i: os.stat(store.image_path(i)).st_mtime_ns for i in ids if i != victim}

    summary = sam_masks(params, index, copy, caplog)
    assert summary.startswith("sam_masks: 1 images computed, 4 already in the store (resumed)")
    assert {i: os.stat(store.image_path(i)).st_mtime_ns for i in kept} == kept
    assert not (tmp_path / "sam_masks.zarr.partial").exists()
    assert_same(read_all(copy), read_all(out))

    assert sam_masks(params, index, copy, caplog).startswith("sam_masks: 0 images computed, 5 already")


def test_sam_param_change_resets_store_but_checkpoint_path_does_not(demo, tmp_path, caplog):
    _, _, index, out = demo
    copy = tmp_path / "sam_masks.zarr"
    shutil.copytree(out, copy)
    old_fp = ImageStore(copy).attrs["fingerprint"]

    moved = make_params(tmp_path / "moved.yaml", sam={"checkpoint": "elsewhere/sam.pth"})
    assert sam_masks(moved, index, copy, caplog).startswith("sam_masks: 0 images computed, 5 already")
    assert ImageStore(copy).attrs["sam"]["checkpoint"] == "elsewhere/sam.pth"

    changed = make_params(tmp_path / "changed.yaml", sam={"occupation_thresh": 0.5})
    open(copy / "stale_marker", "w").close()
    assert sam_masks(changed, index, copy, caplog).startswith("sam_masks: 5 images computed, 0 already")
    store = ImageStore(copy)
    assert store.attrs["fingerprint"] != old_fp and store.attrs["sam"]["occupation_thresh"] == 0.5
    assert not (copy / "stale_marker").exists() and len(store) == 5


def test_code_change_resets_store(demo, tmp_path, caplog, monkeypatch):
    _, params, index, out = demo
    copy = tmp_path / "sam_masks.zarr"
    shutil.copytree(out, copy)
    assert ImageStore(copy).attrs["code"] == sam_masks_stage.code_digest(*sam_masks_stage.CODE_MODULES)
    monkeypatch.setattr(sam_masks_stage, "CODE_MODULES", ("pipeline.data.imageio",))
    assert sam_masks(params, index, copy, caplog).startswith("sam_masks: 5 images computed, 0 already")
    assert ImageStore(copy).attrs["code"] == sam_masks_stage.code_digest(*sam_masks_stage.CODE_MODULES)


def test_local_cluster_matches_serial_run_byte_for_byte(demo, tmp_path, caplog):
    _, _, index, out = demo
    params = make_params(tmp_path / "params.yaml",
                         compute={"scheduler": "local-cluster", "workers": 2})
    summary = sam_masks(params, index, tmp_path / "dask.zarr", caplog)
    assert summary.startswith("sam_masks: 5 images computed, 0 already")
    assert ImageStore(tmp_path / "dask.zarr").attrs == ImageStore(out).attrs
    assert_same(read_all(tmp_path / "dask.zarr"), read_all(out))


def test_corrupt_image_fails_with_one_line_naming_id_and_path(demo, tmp_path):
    _, params, index, _ = demo
    bad_index = tmp_path / "index"
    shutil.copytree(index, bad_index)
    record = load_split(index, "val").good()[0]
    # The index stores the demo image paths under the original index; point them at the copy.
    for split in ("train", "val"):
        path = bad_index / f"{split}.json"
        path.write_text(path.read_text().replace(str(index), str(bad_index)))
    bad_image = Path(record.image.replace(str(index), str(bad_index)))
    bad_image.write_bytes(b"\xff\xd8 this is not a jpeg")

    def run() -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "stages.cli", "sam-masks", "--params", str(params),
             "--index", str(bad_index), "--out", str(tmp_path / "out.zarr")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 1
        # A terminal shows what follows a carriage return (tqdm's redraw) as its own line.
        lines = re.split(r"[\r\n]", proc.stderr)
        errors = [line for line in lines if "Error" in line]
        assert len(errors) == 1 and errors[0].startswith("Error: "), proc.stderr
        assert f"image {record.id} ({bad_image})" in errors[0]
        assert "Traceback" not in proc.stderr
        return errors[0]

    # The bytes differ from those prepare indexed: refused before decoding.
    assert "changed after the index was made" in run()
    # An index that records these very bytes: they are decoded, and fail as an unreadable image.
    path = bad_index / "val.json"
    path.write_text(path.read_text().replace(record.digest, image_digest(bad_image.read_bytes())))
    assert "cannot read image" in run()
    # Images before the bad one are stored complete; the bad one is not.
    store = ImageStore(tmp_path / "out.zarr")
    assert record.id not in store
    assert set(store.ids()) <= {r.id for r in load_split(index, "train").good()}


def test_bad_params_and_missing_checkpoint_fail_with_the_key(demo, tmp_path):
    _, _, index, _ = demo
    params = make_params(tmp_path / "p.yaml", sam={"model": "vit_h", "checkpoint": "nope/sam.pth"})
    result = sam_masks(params, index, tmp_path / "o.zarr", expect=1)
    assert "nope/sam.pth" in result.output and "'sam.checkpoint'" in result.output
    assert "sam_vit_h_4b8939.pth" in result.output
    assert not (tmp_path / "o.zarr").exists()

    params = make_params(tmp_path / "q.yaml", sam={"points_per_sid": 4})
    assert "'sam.points_per_sid'" in sam_masks(params, index, tmp_path / "o.zarr", expect=1).output
    params = make_params(tmp_path / "r.yaml", sam={"model": "vit_x"})
    assert "sam.model" in sam_masks(params, index, tmp_path / "o.zarr", expect=1).output


def test_metrics_count_masks_per_image_and_level(demo, tmp_path):
    _, params_path, index, out = demo
    metrics = tmp_path / "sam_masks.json"
    run("sam-masks", "--params", params_path, "--index", index, "--out", out, "--metrics", metrics)
    got = __import__("json").loads(metrics.read_text())
    store = ImageStore(out)
    levels = [store.read(i)["levels"] for i in store.ids()]
    counts = np.array([[np.sum(l == k) for k in range(3)] for l in levels])
    assert got["n_images"] == len(levels) == 5 and got["untrained"] is True
    assert got["sam_oracle"] is False
    assert got["masks_per_image"] == pytest.approx(counts.sum(1).mean(), abs=1e-3)
    assert got["three_level_fraction"] == pytest.approx((counts > 0).all(1).mean(), abs=1e-4)


def test_memory_budget_changes_batches_not_results(demo, tmp_path, caplog, monkeypatch):
    from pipeline.sam.point_decoder import PointDecoder

    _, _, index, out = demo
    batches = []
    predict = PointDecoder.predict
    monkeypatch.setattr(PointDecoder, "predict",
                        lambda self, coords, select: batches.append(len(coords))
                        or predict(self, coords, select))
    small = make_params(tmp_path / "small.yaml", sam={"max_batch_memory_mb": 1})
    summary = sam_masks(small, index, tmp_path / "small.zarr", caplog)
    assert summary.startswith("sam_masks: 5 images computed, 0 already")
    assert set(batches) == {4}  # the default budget's batch is points_per_batch: 64
    # Same fingerprint: a store filled under one budget resumes under another.
    assert ImageStore(tmp_path / "small.zarr").attrs["fingerprint"] == \
        ImageStore(out).attrs["fingerprint"]
    assert_same(read_all(tmp_path / "small.zarr"), read_all(out))
    bad = make_params(tmp_path / "bad.yaml", sam={"max_batch_memory_mb": 0})
    assert "'sam.max_batch_memory_mb' must be >= 1, got 0" in \
        sam_masks(bad, index, tmp_path / "o.zarr", expect=1).output


def test_precision_is_in_the_fingerprint_and_bf16_runs(demo, tmp_path, caplog):
    _, _, index, out = demo
    copy = tmp_path / "sam_masks.zarr"
    shutil.copytree(out, copy)
    bf16 = make_params(tmp_path / "bf16.yaml", compute={"precision": "bf16"})
    summary = sam_masks(bf16, index, copy, caplog)
    assert summary.startswith("sam_masks: 5 images computed, 0 already")  # reset, not resumed
    store = ImageStore(copy)
    assert store.attrs["precision"] == "bf16"
    assert store.attrs["fingerprint"] != ImageStore(out).attrs["fingerprint"]
    for image_id in store.ids():
        QuasiSuperpixels.from_arrays(store.read(image_id))


def test_dvc_params_are_the_result_changing_keys():
    """dvc.yaml lists every sam key but the memory budget, and compute.precision."""
    import dataclasses

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sam_masks"]
    listed = set(stage["params"])
    fields = {f.name for f in dataclasses.fields(SamConfig)}
    assert {p.split(".", 1)[1] for p in listed if p.startswith("sam.")} == \
        fields - set(sam_masks_stage.RESULT_NEUTRAL_KEYS)
    assert "compute.precision" in listed and "sam" not in listed
    for module in sam_masks_stage.CODE_MODULES + sam_generator("world-oracle").code_modules:
        assert module.replace(".", "/") + ".py" in stage["deps"], module
    # The world sam.model world-oracle re-renders.
    assert "dataset.demo.seed" in listed
