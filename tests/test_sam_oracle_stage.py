"""``wsss sam-masks`` with ``sam.model: world-oracle`` on a tiny demo index, and its labels."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from pipeline.data.datasets import load_split
from pipeline.data.imageio import read_rgb
from pipeline.demo.sam_oracle import WorldOracleGenerator, world_oracle_masks
from pipeline.demo.world import render
from pipeline.store import ImageStore
from pipeline.errors import PipelineError
from pipeline.params import section
from pipeline.demo.dataset import demo_index
from pipeline.params import SamConfig
from stages.sam_masks import store_attrs
from test_sam_masks_stage import REPO, assert_same, make_params, read_all, run

ORACLE = {"model": "world-oracle", "points_per_side": 8, "crop_n_layers": 0,
          "pred_iou_thresh": 0.86, "stability_score_thresh": 0.92}


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    """A prepared 3+2-image demo index and one serial world-oracle run over it, with metrics."""
    root = tmp_path_factory.mktemp("oracle_stage")
    params = make_params(root / "params.yaml", sam=ORACLE)
    run("prepare", "--params", params, "--out", root / "index")
    out, metrics = root / "sam_masks.zarr", root / "sam_masks.json"
    run("sam-masks", "--params", params, "--index", root / "index", "--out", out,
        "--metrics", metrics)
    return root, params, root / "index", out, metrics


def test_store_holds_the_oracles_masks_labelled_as_oracle(oracle_run):
    _, params_path, index, out, metrics = oracle_run
    params = yaml.safe_load(params_path.read_text())
    cfg = section(params, "sam", SamConfig)
    store = ImageStore(out)
    attrs = store.attrs
    assert attrs["model"] == "world-oracle" and attrs["sam_oracle"] is True
    assert attrs["untrained"] is False
    assert attrs["fingerprint"] == store_attrs(cfg, "fp32", 0)["fingerprint"]
    # The masks depend on the world: another seed is another store.
    assert attrs["fingerprint"] != store_attrs(cfg, "fp32", 1)["fingerprint"]

    generator = WorldOracleGenerator(**cfg.generator_settings())
    records = load_split(index, "train").good() + load_split(index, "val").good()
    assert store.ids() == sorted(r.id for r in records)
    for r in records:
        expected = generator.generate_world(read_rgb(r.image), render(0, demo_index(r.id)))
        assert len(expected) > 1
        assert_same({r.id: store.read(r.id)}, {r.id: expected.to_arrays()})

    got = json.loads(metrics.read_text())
    assert got["sam_oracle"] is True and got["untrained"] is False
    assert got["model"] == "world-oracle" and got["n_images"] == 5
    assert got["masks_per_image"] == pytest.approx(
        np.mean([len(store.read(i, ("levels",))["levels"]) for i in store.ids()]), abs=1e-3)


@pytest.mark.slow
def test_local_cluster_matches_the_serial_oracle_run(oracle_run, tmp_path):
    root, _, index, out, _ = oracle_run
    params = make_params(tmp_path / "params.yaml", sam=ORACLE,
                         compute={"scheduler": "local-cluster", "workers": 2})
    run("sam-masks", "--params", params, "--index", index, "--out", tmp_path / "dask.zarr")
    assert ImageStore(tmp_path / "dask.zarr").attrs == ImageStore(out).attrs
    assert_same(read_all(tmp_path / "dask.zarr"), read_all(out))


def test_oracle_on_another_dataset_fails_with_one_line(oracle_run, tmp_path):
    _, _, index, _, _ = oracle_run
    params = make_params(tmp_path / "voc.yaml", sam=ORACLE,
                         dataset={"name": "voc", "root": str(tmp_path)})
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "sam-masks", "--params", str(params),
         "--index", str(index), "--out", str(tmp_path / "o.zarr")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    lines = [line for line in re.split(r"[\r\n]", proc.stderr) if line.strip()]
    assert lines == ["Error: sam.model world-oracle is the demo world's stand-in; "
                     "it needs dataset.name: demo"], proc.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_oracle_refuses_foreign_ids_and_images_of_another_world():
    generator = WorldOracleGenerator(points_per_side=4, crop_n_layers=0)
    sample = render(0, 3)
    masks = world_oracle_masks
    with pytest.raises(PipelineError, match=r"image 2007_000032: .*not a demo image id.*world-oracle"):
        masks(generator, 0, "2007_000032", sample.image)
    other = render(0, 4).image
    assert other.shape != sample.image.shape
    with pytest.raises(PipelineError, match=r"image demo_0003 is .* but demo world 0 renders it"):
        masks(generator, 0, "demo_0003", other)
    assert len(masks(generator, 0, "demo_0003", sample.image)) > 1


def test_sam_model_choices_name_the_oracle():
    assert SamConfig(model="world-oracle").model == "world-oracle"
    with pytest.raises(PipelineError, match="world-oracle"):
        SamConfig(model="oracle")
