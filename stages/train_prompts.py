"""Stage ``train_prompts@{cls,seg}``: CLIP features (+ coarse seeds) -> ``cache/prompts/<which>.pt``.

Classification prompts learn with L_MCL on image labels; segmentation prompts with L_CAL against
the coarse seeds, cropped and flipped like the view (algorithms.md §6, §7). The default
``path: cached`` samples (image, view) pairs from ``train_views.zarr`` and runs only the last
block; ``path: exact`` runs the full image encoder on a fresh augmentation every step, as the
authors did. Every iteration is one optimizer step over ``batch_size`` samples (optionally in
``sub_batches`` whose gradients add up to the full-batch gradient); the scheduler steps once per
iteration. Batches are drawn from ``(seed, iteration)`` only, so a resumed run is identical to
an uninterrupted one. Every ``checkpoint_every`` iterations the full training state goes to
``<out>.resume`` (atomic); the final ``<out>`` is written atomically and the resume file removed.
It holds the final context and, with ``cam_iteration``, the context after that iteration, which
``cams`` then uses (the authors' COCO CAMs come from intermediate checkpoints).

The method is in :mod:`pipeline.prompts`: ``checkpoints`` (learners, checkpoints, warm start),
``batches`` (:class:`~pipeline.prompts.batches.BatchSource`) and ``loop`` (the training loop).
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from pipeline.clip.factory import build_clip, clip_kwargs, clip_provenance, verify_clip
from pipeline.data.datasets import load_split
from pipeline.device import torch_device
from pipeline.errors import PipelineError
from pipeline.params import (
    ClipConfig,
    ClipFeaturesConfig,
    ComputeConfig,
    DatasetConfig,
    PromptsConfig,
    section,
)
from pipeline.precision import training_precision
from pipeline.prompts.batches import BatchSource
from pipeline.prompts.checkpoints import (
    build_learner,
    load_learner,  # noqa: F401  (test_golden_prompt imports it from here)
    phrase_start,
    warm_start,
)
from pipeline.prompts.loop import train
from pipeline.provenance import fingerprint, package_version
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params

log = logging.getLogger("wsss.train_prompts")
STAGE = "train_prompts"


@click.command("train-prompts")
@click.option("--which", type=click.Choice(["cls", "seg"]), required=True,
              help="cls: classification prompts (L_MCL); seg: segmentation prompts (L_CAL).")
@PARAMS_OPTION
@click.option("--features", default="cache/clip_features", show_default=True,
              type=click.Path(file_okay=False), help="CLIP feature cache (clip-features).")
@INDEX_OPTION
@click.option("--seeds", default=None, type=click.Path(file_okay=False),
              help="Coarse seed PNGs (required for --which seg).")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Prompts checkpoint [default: cache/prompts/<which>.pt].")
@click.option("--init-prompts", default="cache/prompts/cls.pt", show_default=True,
              type=click.Path(dir_okay=False),
              help="Classification prompts a seg run starts from when prompts.seg.init is cls.")
@click.option("--metrics", default=None, type=click.Path(dir_okay=False),
              help="Training-curve CSV [default: cache/plots/train_prompts_<which>.csv].")
def command(which, params_path, features, index_dir, seeds, out, init_prompts, metrics) -> None:
    """Learn CoOp prompt contexts (classification or segmentation prompts)."""
    params = load_params(params_path)
    cfg = section(params, f"prompts.{which}", PromptsConfig)
    clip_cfg = section(params, "clip", ClipConfig)
    features_cfg = section(params, "clip_features", ClipFeaturesConfig)
    dataset = section(params, "dataset", DatasetConfig)
    compute = section(params, "compute", ComputeConfig)
    if which == "cls" and "loss_classes" in params["prompts"]["cls"]:
        raise PipelineError("params.yaml: prompts.cls.loss_classes has no effect (classification prompts "
                         "learn from the image labels); it belongs to prompts.seg")
    if which == "cls" and cfg.init == "cls":
        raise PipelineError("params.yaml: prompts.cls.init must be random or a phrase such as "
                            "'a photo of a' (cls is what seg can start from)")
    if which == "seg" and seeds is None:
        raise PipelineError("--seeds (the coarse seed directory) is required for --which seg")
    if seeds is not None and not Path(seeds).is_dir():
        raise PipelineError(f"seed directory not found: {seeds} (run seeds@coarse)")
    out_path = Path(out or f"cache/prompts/{which}.pt")
    metrics_path = Path(metrics or f"cache/plots/train_prompts_{which}.csv")
    sha = verify_clip(clip_cfg)
    device = torch_device(compute.device, compute.precision)
    try:
        precision = training_precision(compute.precision, cfg.amp, device)
    except ValueError:
        raise PipelineError(f"params.yaml: prompts.{which}.amp (the reference's fp16 autocast + GradScaler) "
                         f"and compute.precision: {compute.precision} ask for two precisions; set "
                         f"prompts.{which}.amp: false to train in {compute.precision}, or "
                         "compute.precision: fp32") from None
    if cfg.amp and precision != "fp16-amp":
        log.info("train_prompts@%s: prompts.%s.amp applies on CUDA only; training in %s on %s",
                 which, which, precision, device)
    torch.manual_seed(cfg.seed)
    split = load_split(index_dir, dataset.train_split)
    clip = build_clip(**clip_kwargs(clip_cfg, str(device)))
    learner = build_learner(clip, split.class_names, split.dataset, cfg)
    if cfg.init == "cls":
        warm_start(learner, clip, Path(init_prompts))
    elif cfg.init != "random":
        phrase_start(learner, clip, cfg.init, f"prompts.{which}.init")
    source = BatchSource(which, cfg, split, Path(features), Path(seeds) if seeds else None,
                         features_cfg, clip)
    provenance = clip_provenance(clip_cfg, sha)
    # cached: the views store's own fingerprint (model, precision, layout, views) decides the inputs
    inputs = source.views.attrs.get("fingerprint") if source.views is not None else features_cfg.augment
    # a warm start's resume state belongs to the context it started from
    start_ctx = (hashlib.sha256(learner.ctx.detach().cpu().numpy().tobytes()).hexdigest()
                 if cfg.init == "cls" else None)
    fp = fingerprint(STAGE, which, cfg, clip_cfg.model_identity(), sha, inputs,
                     split.class_names, [r.id for r in split.good()], start_ctx, precision)
    extra = {"clip": provenance, "untrained": provenance["untrained"], "class_names": split.class_names,
             "dataset": split.dataset, "package_version": package_version()}
    extra["precision"] = precision
    train(which, cfg, clip, learner, source, out_path, metrics_path, fp, extra, precision,
          progress=functools.partial(tqdm, desc=f"prompts {which}", dynamic_ncols=True))
    log.info("train_prompts@%s: %d iterations -> %s", which, cfg.iterations, out_path)
