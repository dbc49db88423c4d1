"""Stage ``prepare``: dataset on disk -> ``cache/index/<split>.json`` (ids, sizes, image labels).

The layouts (``dataset.name``: voc, coco, custom, and the demo's generated world) and their index
builders are :mod:`pipeline.data.sources`; this command builds the train and eval splits into a
``.partial`` folder and moves it into place only when every split has usable images.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import click
from tqdm.auto import tqdm

from pipeline.data.datasets import split_path
from pipeline.data.sources import absent_classes, build_split, dataset_root
from pipeline.errors import PipelineError
from pipeline.params import DatasetConfig, section
from stages.params import PARAMS_OPTION, load_params

log = logging.getLogger("wsss.prepare")


@click.command("prepare")
@PARAMS_OPTION
@click.option("--out", default="cache/index", show_default=True, type=click.Path(file_okay=False))
def command(params_path: str, out: str) -> None:
    """Index the dataset: image ids, sizes and image-level labels per split."""
    cfg = section(load_params(params_path), "dataset", DatasetConfig)
    out_dir = Path(out)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    progress = partial(tqdm, unit="img", dynamic_ncols=True)
    root = dataset_root(cfg, tmp, progress)
    splits = list(dict.fromkeys([cfg.train_split, cfg.eval_split]))
    indexes = []
    for split in splits:
        index = build_split(cfg, split, root, progress)
        if not index.good():
            raise PipelineError(f"split {split!r} of dataset {cfg.name!r} has no usable images")
        indexes.append(index)
    for index in indexes:
        if root.is_relative_to(tmp):  # a generated tree moves with the index: store paths where it will live
            index.records = [
                replace(r, image=r.image.replace(str(tmp), str(out_dir), 1),
                        label=r.label and r.label.replace(str(tmp), str(out_dir), 1))
                for r in index.records
            ]
        split_path(tmp, index.split).write_text(index.to_json())
        missing = absent_classes(index)
        if missing:
            log.warning("split %s: classes never present: %s", index.split, ", ".join(missing))
        log.info("split %s: %d images (%d skipped)", index.split, len(index.good()), len(index.skipped()))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
