"""Fitting the final segmenter on seeds (algorithms.md §9): the loop, the best checkpoint, resume.

DeepLabV3+ (or any :mod:`pipeline.segmenter.archs` architecture) trains on the seeds of the train
split. Every ``val_every`` iterations (and at the last) the single-scale mIoU on the eval split's
ground truth is computed (:mod:`pipeline.segmenter.evaluate`); the weights with the highest one
so far are the *best* checkpoint (§9: the authors report the best checkpoint on val; the first of
equal scores wins). ``last.pt`` holds the final iteration, ``best.pt`` the best one. Without
ground truth on the eval split there is nothing to select by: ``best.pt`` is the last iteration
(logged, and recorded in its ``info``).

Every ``checkpoint_every`` iterations the model, optimizer, step, random states and the best
weights so far are saved atomically to ``checkpoint.pt``; a rerun with the same params, seeds
and val set resumes from it (the result, best included, equals an uninterrupted run), a rerun
with different ones starts over. Loss, learning rate and the val mIoU of every iteration are
returned (:func:`write_csv` writes them for ``dvc plots``).

Batches come from a DataLoader (``loader_workers`` processes decode and augment while the device
trains; :mod:`pipeline.segmenter.data`): iteration t's samples and augmentations depend only on
(seed, t, row), so the result is the same for every ``loader_workers`` and a resume needs only
t. The loss stays on the device and is read once per checkpoint or validation.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from pipeline import tensorfile
from pipeline.atomic import write_text_atomic
from pipeline.data.datasets import Record
from pipeline.data.imageio import ImageReadError, read_label, read_rgb
from pipeline.errors import PipelineError
from pipeline.metrics import percent
from pipeline.params import SegmenterConfig
from pipeline.provenance import code_digest
from pipeline.schemas import SEEDS_PROVENANCE, seed_path
from pipeline.segmenter.data import (
    IterationSampler,
    LoadFailure,
    TrainingSamples,
    collate_training,
    make_loader,
)
from pipeline.segmenter.evaluate import eval_loader, evaluate
from pipeline.segmenter.model import build_segmenter, save_atomic, save_segmenter
from pipeline.segmenter.training import (
    SegmentationAugment,
    build_optimizer,
    poly_lr,
    train_step,
)
from pipeline.weights import sha256sum

# train-segmenter's logger: these lines are part of the stage's log.
log = logging.getLogger("wsss.train_segmenter")
CSV_FIELDS = ("step", "loss", "lr", "val_miou")
# The code the trained weights depend on (dvc.yaml's code deps): a change restarts training
# instead of "resuming" a finished run of the old code.
CODE_MODULES = ("pipeline.segmenter.fit", "pipeline.segmenter.evaluate", "pipeline.segmenter.model",
                "pipeline.segmenter.archs", "pipeline.segmenter.inputs", "pipeline.segmenter.training",
                "pipeline.segmenter.data",
                "pipeline.segmenter.clip_vit", "pipeline.sam.clip_encoder",
                "pipeline.precision", "pipeline.metrics", "pipeline.data.datasets", "pipeline.data.imageio")
RESUME_KEYS = ("fingerprint", "step", "model", "optimizer", "rng", "history", "best")


def seeds_untrained(seeds_dir: Path) -> bool:
    """Whether the seeds' provenance (written by the seeds stage) says a model was untrained;
    seeds from elsewhere (no provenance file) count as trained."""
    path = Path(seeds_dir) / SEEDS_PROVENANCE
    try:
        return bool(json.loads(path.read_text()).get("untrained", False)) if path.is_file() else False
    except (OSError, json.JSONDecodeError):
        return False


def data_digest(
    records: list[Record], seeds_dir: Path, class_names: list[str], val_records: Sequence[Record] = ()
) -> str:
    """A hash of the training set (ids, images, seed contents) and of the val set the best
    checkpoint is chosen on (ids, images, ground-truth contents), so new data restarts training."""
    h = hashlib.sha256("\n".join(class_names).encode())
    for r in records:
        h.update(f"{r.id}\t{r.image}\t{r.digest}\n".encode())
        h.update(seed_path(seeds_dir, r.id).read_bytes())
    h.update(b"val\n")
    for r in val_records:
        h.update(f"{r.id}\t{r.image}\t{r.digest}\n".encode())
        h.update(Path(r.label).read_bytes())
    return h.hexdigest()[:16]


def load_pair(record: Record, seeds_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A training image and its seed."""
    try:
        image = read_rgb(record.image, record.digest)
        seed = read_label(seed_path(seeds_dir, record.id))
    except (ImageReadError, OSError) as exc:
        raise PipelineError(f"image {record.id}: {exc}") from exc
    if seed.shape != image.shape[:2]:
        raise PipelineError(f"image {record.id}: seed is {seed.shape}, image is {image.shape[:2]}")
    return image, seed


@dataclass
class BestCheckpoint:
    """The best weights so far on val: highest single-scale val mIoU, the first of equal scores."""

    step: int | None = None
    val_miou: float | None = None
    state_dict: dict | None = None

    def offer(self, step: int, val_miou: float, net: torch.nn.Module) -> bool:
        """Keep ``net``'s weights (a CPU copy) if ``val_miou`` beats the best so far."""
        if math.isnan(val_miou) or (self.val_miou is not None and val_miou <= self.val_miou):
            return False
        self.step, self.val_miou = step, float(val_miou)
        self.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        return True

    def to_state(self) -> dict:
        return {"step": self.step, "val_miou": self.val_miou, "state_dict": self.state_dict}

    @classmethod
    def from_state(cls, state: dict) -> "BestCheckpoint":
        return cls(state["step"], state["val_miou"], state["state_dict"])


def write_csv(path: Path, rows: list[dict]) -> None:
    """The training curve (:data:`CSV_FIELDS` per iteration) for ``dvc plots``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def read_resume(path: Path) -> dict:
    """The resume state as data (tensors and plain containers only): anything else stops the
    stage with one line naming the file, never runs its code."""
    return tensorfile.load_dict(path, "segmenter resume state", f"delete it (rm {path}) to "
                                "train from the start", RESUME_KEYS)


def _rng_state(device: torch.device) -> dict:
    # torch's generators only (dropout): the data's randomness is a function of the iteration.
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def fit(
    cfg: SegmenterConfig,
    records: list[Record],
    val: list[Record],
    class_names: list[str],
    seeds_dir: Path,
    out_dir: Path,
    device: torch.device,
    precision: str = "fp32",
    eval_split: str = "val",
    progress: Callable[[Iterable], Iterable] = lambda steps: steps,
) -> list[dict]:
    """Train on ``records``' seeds in ``seeds_dir``, choosing the best on the records of ``val``
    that have ground truth (``eval_split`` names that split in messages); resume from and
    checkpoint to ``out_dir/checkpoint.pt``, then write ``out_dir/{best,last}.pt``. ``progress``
    wraps the iterations (the stage passes tqdm, whose ``set_postfix`` shows the loss). Returns
    the history: one row of :data:`CSV_FIELDS` per iteration, from the first (a resume's too)."""
    seeds = Path(seeds_dir)
    val_records = [r for r in val if r.label is not None]
    num_classes = len(class_names) + 1
    fp = cfg.training_fingerprint(data_digest(records, seeds, class_names, val_records), precision,
                                  code_digest(*CODE_MODULES))

    net = build_segmenter(cfg.model, num_classes, cfg.encoder_weights, cfg.encoder_weights_sha256, cfg.seed,
                          cfg.output_stride)
    net.to(device)
    optimizer = build_optimizer(net, cfg.lr, cfg.momentum, cfg.weight_decay)
    torch.manual_seed(cfg.seed)
    start, history, best = 0, [], BestCheckpoint()
    ckpt_path = Path(out_dir) / "checkpoint.pt"
    if ckpt_path.is_file():
        ckpt = read_resume(ckpt_path)
        if ckpt.get("fingerprint") == fp:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"], device)
            start, history = int(ckpt["step"]), list(ckpt["history"])
            best = BestCheckpoint.from_state(ckpt["best"])
            log.info("resuming from iteration %d of %d (best so far: %s)", start, cfg.iterations,
                     f"iteration {best.step}, val mIoU {100 * best.val_miou:.1f}%" if best.step is not None else "none")
        else:
            log.info("checkpoint %s is from other params or data; training from scratch", ckpt_path)

    def save_checkpoint(step: int) -> None:
        # The best weights travel inside the one atomic file, so a resumed run keeps exactly the
        # best of the iterations before its checkpoint, never one from a lost later part.
        save_atomic(
            {"fingerprint": fp, "step": step, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": _rng_state(device), "history": history, "best": best.to_state()},
            ckpt_path,
        )

    if not val_records:
        log.warning("eval split %r has no ground truth: no val mIoU, best.pt will be the last iteration",
                    eval_split)
    augment = SegmentationAugment(cfg.crop_size, cfg.scale_range, cfg.flip_prob)
    pin = device.type == "cuda"
    samples = TrainingSamples(records, partial(load_pair, seeds_dir=seeds), augment, cfg.seed, errors=(PipelineError,))
    loader = make_loader(samples, IterationSampler(len(records), cfg.batch_size, cfg.seed, start, cfg.iterations),
                         collate_training, cfg.loader_workers, pin, cfg.seed)
    # Inference without gradients: a val batch holds at most the training batch's input pixels.
    val_batches = eval_loader(val_records, cfg.batch_size * cfg.crop_size ** 2, cfg.loader_workers, pin) \
        if val_records else None
    bar = progress(range(start, cfg.iterations))
    show_loss = getattr(bar, "set_postfix", None)
    pending: list[tuple[dict, torch.Tensor]] = []  # rows whose loss is still on the device

    def read_losses() -> None:
        # The one host sync of a logging interval.
        if pending:
            values = torch.stack([loss for _, loss in pending]).tolist()
            for (row, _), value in zip(pending, values):
                row["loss"] = round(value, 6)
            if show_loss is not None:
                show_loss(loss=f"{values[-1]:.3f}")
            pending.clear()

    for step, batch in zip(bar, loader):
        if isinstance(batch, LoadFailure):
            raise PipelineError(batch.message)
        lr = poly_lr(cfg.lr, step, cfg.iterations, cfg.poly_power)
        loss = train_step(net, optimizer, batch.images, batch.labels, lr, sub_batches=cfg.sub_batches,
                          precision=precision)
        done = step + 1
        row = {"step": done, "loss": None, "lr": lr, "val_miou": ""}
        pending.append((row, loss))
        if val_records and ((cfg.val_every and done % cfg.val_every == 0) or done == cfg.iterations):
            read_losses()
            miou = evaluate(net, val_batches, num_classes, precision)
            row["val_miou"] = percent(miou)
            if best.offer(done, miou, net):
                log.info("iteration %d: val mIoU %.1f%%, the best so far", done, 100 * miou)
        history.append(row)
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            read_losses()
            save_checkpoint(done)
    _save_best_and_last(cfg, net, best, history, class_names, seeds, Path(out_dir), eval_split)
    return history


def _save_best_and_last(cfg: SegmenterConfig, net: torch.nn.Module, best: BestCheckpoint, history: list[dict],
                        class_names: list[str], seeds: Path, out_dir: Path, eval_split: str) -> None:
    last_miou = history[-1]["val_miou"] if history else ""
    # `untrained`: the seeds came from random (untrained) CLIP/SAM, so the scores check plumbing
    last_info = {"step": cfg.iterations,
                 "val_miou": None if last_miou in ("", None) else last_miou,
                 "selected_by": "last iteration", "untrained": seeds_untrained(seeds)}
    if cfg.encoder_weights:  # provenance: which ImageNet weights (pinned, name-checked or not)
        last_info["encoder_weights_sha256"] = sha256sum(cfg.encoder_weights)
    save_segmenter(out_dir / "last.pt", net, cfg.model, class_names, last_info)
    if best.step is None:
        log.warning("no val mIoU to select by (eval split %r has no usable ground truth): "
                    "best.pt is the last iteration", eval_split)
        best_info = {**last_info, "selected_by": "last iteration (no val ground truth)"}
        save_segmenter(out_dir / "best.pt", net, cfg.model, class_names, best_info)
    else:
        best_info = {"step": best.step, "val_miou": percent(best.val_miou),
                     "selected_by": "highest single-scale val mIoU",
                     **{k: last_info[k] for k in ("untrained", "encoder_weights_sha256") if k in last_info}}
        save_segmenter(out_dir / "best.pt", net, cfg.model, class_names, best_info, best.state_dict)
        log.info("best checkpoint: iteration %d of %d, val mIoU %.1f%%", best.step, cfg.iterations,
                 100 * best.val_miou)
