"""The prompt-training loop (algorithms.md §6, §7) with resumable checkpoints.

Every iteration is one optimizer step over ``batch_size`` samples (optionally in ``sub_batches``
whose gradients add up to the full-batch gradient, :func:`pipeline.prompts.training.
optimizer_iteration`); the scheduler steps once per iteration. Every ``checkpoint_every``
iterations the full training state goes to ``<out>.resume`` (atomic; :data:`RESUME_KEYS`); the
final ``<out>`` is written atomically and the resume file removed. It holds the final context
and, with ``cam_iteration``, the context after that iteration, which ``cams`` then uses (the
authors' COCO CAMs come from intermediate checkpoints). The loss curve goes to a CSV.
"""
from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from pipeline import tensorfile
from pipeline.atomic import write_text_atomic
from pipeline.config import to_dict
from pipeline.params import PromptsConfig
from pipeline.precision import grad_scaler
from pipeline.prompts.batches import BatchSource
from pipeline.prompts.learner import PromptLearner
from pipeline.prompts.training import optimizer_iteration, warmup_cosine_factor

log = logging.getLogger("wsss.train_prompts")

RESUME_KEYS = ("fingerprint", "iteration", "ctx", "optimizer", "scheduler", "torch_rng", "rows",
               "contexts")
"""Keys every resume state (``<out>.resume``) holds."""


def read_resume(path: Path) -> dict:
    """A resume state as data (tensors and plain containers only): anything else stops the stage
    with one line naming the file (``pipeline.tensorfile.TensorFileError``), never runs its code."""
    return tensorfile.load_dict(path, "prompts resume state", f"delete it (rm {path}) to train "
                                "from the start", RESUME_KEYS)


def write_curve(rows, path: Path) -> None:
    """The training curve (step, loss, lr per iteration) as a CSV, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "loss", "lr"])
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def train(which: str, cfg: PromptsConfig, clip, learner: PromptLearner, source: BatchSource,
          out: Path, metrics: Path, fp: str, extra: dict, precision: str = "fp32",
          progress: Callable[..., Iterable[int]] | None = None) -> dict:
    """The §7 loop with resumable checkpoints; returns the final checkpoint dict.

    ``precision`` (``pipeline.precision.training_precision``) must be part of ``fp``: a resume
    state of another precision (a CPU run's fp32 state met by a CUDA run with ``amp``, or the
    reverse) is not resumed but restarted, with a log line. Within one precision a run resumes
    on another device (fp32 on the CPU, then on CUDA); the GradScaler state (fp16-amp only) is
    loaded only when the state holds one and this run's scaler is enabled.

    ``progress(iterations, initial=, total=)`` wraps the iterations (a progress bar, e.g.
    ``functools.partial(tqdm, desc=...)``); None: none."""
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
    iterations = range(start, cfg.iterations)
    if progress is not None:
        iterations = progress(iterations, initial=start, total=cfg.iterations)
    for it in iterations:
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
    write_curve(rows, metrics)
    tensorfile.save_atomic(final, out)
    resume_path.unlink(missing_ok=True)
    return final
