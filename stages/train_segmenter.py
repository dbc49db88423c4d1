"""Stage ``train_segmenter``: train split images + fine seeds -> ``cache/segmenter/{best,last}.pt``.

Trains DeepLabV3+ on the seeds (algorithms.md §9) on ``compute.device`` at ``compute.precision``
(:func:`pipeline.segmenter.fit.fit`). Every ``val_every`` iterations (and at the last) the
single-scale mIoU on the eval split's ground truth is computed; the weights with the highest one
so far are the *best* checkpoint (§9). ``last.pt`` holds the final iteration, ``best.pt`` the
best one; ``predict.checkpoint`` chooses. Every ``checkpoint_every`` iterations ``checkpoint.pt``
is saved; a rerun with the same params, seeds and val set resumes from it, a rerun with
different ones starts over. Loss, learning rate and the val mIoU go to a CSV for ``dvc plots``.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import click
from tqdm.auto import tqdm

from pipeline.data.datasets import load_split
from pipeline.device import torch_device
from pipeline.errors import PipelineError
from pipeline.params import ComputeConfig, DatasetConfig, SegmenterConfig, section
from pipeline.schemas import seed_path
from pipeline.segmenter.fit import fit, write_csv
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params

log = logging.getLogger("wsss.train_segmenter")


@click.command("train-segmenter")
@PARAMS_OPTION
@INDEX_OPTION
@click.option("--seeds", "seeds_dir", default="cache/seeds/fine", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", default="cache/segmenter", show_default=True, type=click.Path(file_okay=False))
@click.option("--plots", default="cache/plots/segmenter_train.csv", show_default=True, type=click.Path(dir_okay=False))
def command(params_path: str, index_dir: str, seeds_dir: str, out: str, plots: str) -> None:
    """Train the final segmenter (DeepLabV3+) on the fine seeds of the train split."""
    params = load_params(params_path)
    cfg = section(params, "segmenter", SegmenterConfig)
    data = section(params, "dataset", DatasetConfig)
    compute = section(params, "compute", ComputeConfig)
    device = torch_device(compute.device, compute.precision)
    seeds = Path(seeds_dir)
    train = load_split(index_dir, data.train_split)
    val = load_split(index_dir, data.eval_split)
    records = train.good()
    missing = [r.id for r in records if not seed_path(seeds, r.id).is_file()]
    if missing:
        raise PipelineError(f"no seed for image {missing[0]} in {seeds} ({len(missing)} missing; run `wsss seeds`)")
    progress = partial(tqdm, desc="train segmenter", unit="it", dynamic_ncols=True)
    history = fit(cfg, records, val.good(), train.class_names, seeds, Path(out), device,
                  compute.precision, data.eval_split, progress)
    write_csv(Path(plots), history)
    final = history[-1]["loss"] if history else "n/a"
    log.info("segmenter trained for %d iterations; final loss %s", cfg.iterations, final)
