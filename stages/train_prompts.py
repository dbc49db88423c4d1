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
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from pathlib import Path

import click
import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import tensorfile
from pipeline.atomic import write_text_atomic
from pipeline.config import to_dict
from pipeline.data.imageio import ImageReadError, read_label, read_rgb
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
from pipeline.precision import grad_scaler, training_precision
from pipeline.prompts.augment import ViewParams, apply_view_label
from pipeline.prompts.class_names import background_names, prompt_names
from pipeline.prompts.learner import PromptLearner, warm_start_context
from pipeline.prompts.training import optimizer_iteration, warmup_cosine_factor
from pipeline.provenance import fingerprint, labelled_inputs, package_version
from pipeline.store import ImageStore, StoreError
from stages.clip_features import (
    VIEWS_ARRAYS,
    VIEWS_STORE,
    build_clip,
    clip_provenance,
    encode_views,
    sample_views,
    train_records,
    verify_clip,
    view_rng,
)
from stages.params import INDEX_OPTION, PARAMS_OPTION, load_params

log = logging.getLogger("wsss.train_prompts")
STAGE = "train_prompts"



def build_learner(clip, class_names, dataset: str, cfg: PromptsConfig) -> PromptLearner:
    fg = prompt_names(class_names, dataset)
    bg = background_names(dataset)
    if cfg.background == "empty":
        bg = ("",) * len(bg)
    return PromptLearner(
        clip.model, list(fg) + list(bg), n_fg=len(fg), n_ctx=cfg.n_ctx,
        shared_context=cfg.shared_context, class_position=cfg.class_position,
        init_std=cfg.init_std, seed=cfg.seed, truncate=cfg.truncate_text,
    ).to(clip.visual.proj.device)


def load_learner(clip, path: str | os.PathLike, iteration: int | None = None) -> tuple[PromptLearner, dict]:
    """Rebuild trained prompts from a final checkpoint written by this stage.

    ``iteration``: the context kept after that iteration (``prompts.<which>.cam_iteration``);
    None: the final one. The text encoder runs over all 77 positions (the reference's inference).
    """
    state = read_prompts(path)
    spec = state["spec"]
    if iteration is None:
        ctx = state["ctx"]
    elif iteration in state.get("contexts", {}):
        ctx = state["contexts"][iteration]
    else:
        raise PipelineError(f"prompts checkpoint {path} holds no context of iteration {iteration} "
                         f"(it has {sorted(state.get('contexts', {}))}); rerun train-prompts with "
                         "this cam_iteration")
    learner = PromptLearner(clip.model, spec["names"], spec["n_fg"], spec["n_ctx"],
                            spec["shared_context"], spec["class_position"], truncate=False)
    if learner.ctx.shape != ctx.shape:
        raise PipelineError(f"prompts checkpoint {path} does not fit the CLIP model (context "
                         f"{tuple(ctx.shape)} vs {tuple(learner.ctx.shape)})")
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    return learner.to(clip.visual.proj.device), state


PROMPTS_KEYS = ("spec", "ctx")


def read_prompts(path: str | os.PathLike) -> dict:
    """A final prompts checkpoint as data (tensors and plain containers only, never code): a file
    holding anything else, or not written by this stage, stops with one line naming it."""
    try:
        return tensorfile.load_dict(path, "prompts checkpoint", "rerun train-prompts (`dvc repro`) "
                                    "to rewrite it", PROMPTS_KEYS)
    except tensorfile.TensorFileError as exc:
        raise PipelineError(str(exc)) from exc


def warm_start(learner: PromptLearner, clip, path: Path) -> None:
    """Copy the trained classification context at ``path`` into ``learner`` (``init: cls``)."""
    if not path.is_file():
        raise PipelineError(f"prompts.seg.init is cls but there are no classification prompts at {path} "
                         "(run train-prompts --which cls)")
    try:
        ctx = warm_start_context(learner, load_learner(clip, path)[0])
    except ValueError as exc:
        raise PipelineError(f"prompts.seg.init is cls but the seg prompts differ from {path} in "
                         f"{exc} (a warm start needs the same prompt layout)") from exc
    with torch.no_grad():
        learner.ctx.copy_(ctx)


class BatchSource:
    """(last-block inputs (B, 1+196, D), image labels (B, C), seed crops or None) per iteration."""

    def __init__(self, which, cfg: PromptsConfig, split, features: Path, seeds: Path | None,
                 features_cfg: ClipFeaturesConfig, clip):
        self.which, self.cfg, self.clip = which, cfg, clip
        self.seeds = seeds
        self.features_cfg = features_cfg
        self.records = split.good()
        if not self.records:
            raise PipelineError("the train split has no usable image")
        self.n_classes = len(split.class_names)
        self.views = None
        self._view_params: dict[str, np.ndarray] = {}  # (K, 18) per image, read once
        if cfg.path == "cached":
            try:
                self.views = ImageStore(features / VIEWS_STORE, arrays=VIEWS_ARRAYS)
            except StoreError as exc:
                raise PipelineError(str(exc)) from exc
            missing = [r.id for r in self.records if r.id not in self.views]
            if missing:
                raise PipelineError(f"{features / VIEWS_STORE} lacks image {missing[0]!r} "
                                 f"({len(missing)} missing; rerun `wsss clip-features`)")
            # (an image that records no inputs was written by other tools: taken as it is)
            stale = [r.id for r in self.records
                     if self.views.recorded_inputs(r.id) not in (None, labelled_inputs(r))]
            if stale:
                raise PipelineError(f"{features / VIEWS_STORE} holds image {stale[0]!r} computed from "
                                 f"another version of the image or its labels ({len(stale)} such; "
                                 "rerun `wsss clip-features`)")
            if list(self.views.attrs.get("class_names", [])) != list(split.class_names):
                raise PipelineError(f"{features / VIEWS_STORE} was built for other classes; rerun clip-features")

    def batch(self, iteration: int):
        rng = np.random.default_rng([self.cfg.seed, iteration])
        n = len(self.records)
        picks = rng.choice(n, size=self.cfg.batch_size, replace=n < self.cfg.batch_size)
        records = [self.records[int(i)] for i in picks]
        if self.views is not None:
            xs, views = zip(*(self._cached_view(r, rng) for r in records))
            x = torch.stack(xs).float()
        else:
            views = [self._fresh_view(r, iteration, row) for row, r in enumerate(records)]
            # the exact path: the full encoder on this step's fresh views, as one batch
            x = encode_views(self.clip, None, views, images=[self._image(r) for r in records]).cpu()
        labels = np.zeros((len(records), self.n_classes), np.float32)
        for row, r in enumerate(records):
            labels[row, list(r.labels)] = 1
        seed_crops = None
        if self.which == "seg":
            seed_crops = torch.from_numpy(np.stack(
                [apply_view_label(self._seed(r.id), v) for r, v in zip(records, views)]))
        return x, torch.from_numpy(labels), seed_crops

    def _cached_view(self, record, rng):
        # One view's chunk is read and decompressed, not the K views of the image.
        params = self._view_params.get(record.id)
        if params is None:
            params = self._view_params[record.id] = self.views.read_array(record.id, "views")
        k = int(rng.integers(params.shape[0]))
        tokens = self.views.read_array(record.id, "tokens", k)
        return torch.from_numpy(tokens), ViewParams.from_array(params[k])

    def _image(self, record) -> np.ndarray:
        try:
            return read_rgb(record.image)
        except ImageReadError as exc:
            raise PipelineError(f"image {record.id} ({record.image}): {exc}") from exc

    def _fresh_view(self, record, iteration: int, row: int):
        # the row keeps an image drawn twice into one batch from getting the same view
        return sample_views(view_rng(self.cfg.seed, record.id, iteration, row),
                            (record.height, record.width), 1, self.features_cfg.augment)[0]

    def _seed(self, image_id: str) -> np.ndarray:
        path = self.seeds / f"{image_id}.png"
        try:
            return read_label(path)
        except (ImageReadError, OSError) as exc:
            raise PipelineError(f"coarse seed of {image_id} unreadable at {path}: {exc} (run seeds@coarse)") from exc


RESUME_KEYS = ("fingerprint", "iteration", "ctx", "optimizer", "scheduler", "torch_rng", "rows",
               "contexts")


def read_resume(path: Path) -> dict:
    """A resume state as data (tensors and plain containers only): anything else stops the stage
    with one line naming the file, never runs its code."""
    try:
        return tensorfile.load_dict(path, "prompts resume state", f"delete it (rm {path}) to train "
                                    "from the start", RESUME_KEYS)
    except tensorfile.TensorFileError as exc:
        raise PipelineError(str(exc)) from exc


def _write_csv(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "loss", "lr"])
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def train(which: str, cfg: PromptsConfig, clip, learner: PromptLearner, source: BatchSource,
          out: Path, metrics: Path, fp: str, extra: dict, precision: str = "fp32") -> dict:
    """The §7 loop with resumable checkpoints; returns the final checkpoint dict.

    ``precision`` (``pipeline.precision.training_precision``) must be part of ``fp``: a resume
    state of another precision (a CPU run's fp32 state met by a CUDA run with ``amp``, or the
    reverse) is not resumed but restarted, with a log line. Within one precision a run resumes
    on another device (fp32 on the CPU, then on CUDA); the GradScaler state (fp16-amp only) is
    loaded only when the state holds one and this run's scaler is enabled."""
    device = clip.visual.proj.device
    params = [learner.ctx]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: warmup_cosine_factor(
        it, cfg.iterations, cfg.warmup_iterations, cfg.warmup_lr, cfg.lr))
    scaler = grad_scaler(device, precision)
    resume_path = out.with_name(out.name + ".resume")
    start, rows, contexts = 0, [], {}
    if resume_path.is_file():
        state = read_resume(resume_path)
        if state.get("fingerprint") == fp:
            with torch.no_grad():
                learner.ctx.copy_(state["ctx"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            # a disabled scaler saves {}; an enabled one cannot load that (and needs no loading)
            if scaler.is_enabled() and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["torch_rng"])
            start, rows, contexts = state["iteration"], list(state["rows"]), dict(state["contexts"])
            log.info("train_prompts@%s: resuming at iteration %d from %s", which, start, resume_path)
        else:
            log.info("train_prompts@%s: training from the start: %s is of other params, inputs or "
                     "precision (this run: %s)", which, resume_path, precision)
    for it in tqdm(range(start, cfg.iterations), desc=f"prompts {which}", initial=start,
                   total=cfg.iterations, dynamic_ncols=True):
        lr = optimizer.param_groups[0]["lr"]
        loss = optimizer_iteration(which, cfg, clip, learner, source.batch(it), device, optimizer,
                                   scheduler, scaler, precision)
        rows.append((it + 1, loss, lr))
        if cfg.cam_iteration == it + 1:
            contexts[it + 1] = learner.ctx.detach().cpu().clone()
        if (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
            tensorfile.save_atomic({
                "fingerprint": fp, "iteration": it + 1, "ctx": learner.ctx.detach().cpu(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(), "rows": rows,
                "contexts": contexts,
            }, resume_path)
    final = {"which": which, "spec": learner.spec(), "ctx": learner.ctx.detach().cpu(),
             "contexts": contexts, "cam_iteration": cfg.cam_iteration,
             "config": to_dict(cfg), "fingerprint": fp, **extra}
    _write_csv(rows, metrics)
    tensorfile.save_atomic(final, out)
    resume_path.unlink(missing_ok=True)
    return final


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
    if which == "cls" and cfg.init != "random":
        raise PipelineError("params.yaml: prompts.cls.init must be random (cls is what seg can start from)")
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
    split = train_records(index_dir, dataset)
    clip = build_clip(clip_cfg.model, clip_cfg.checkpoint, clip_cfg.pretrained_tag, clip_cfg.seed,
                      str(device))
    learner = build_learner(clip, split.class_names, split.dataset, cfg)
    if cfg.init == "cls":
        warm_start(learner, clip, Path(init_prompts))
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
    train(which, cfg, clip, learner, source, out_path, metrics_path, fp, extra, precision)
    log.info("train_prompts@%s: %d iterations -> %s", which, cfg.iterations, out_path)
