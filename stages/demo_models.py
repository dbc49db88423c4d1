"""``wsss demo-models``: train the embedded demo's tiny CLIP and SAM on the procedural world.

Not a DVC stage of the pipeline: it creates the weights that ``clip.checkpoint`` (model
``wsss-demo-ViT-16``) and ``sam.checkpoint`` (model ``demo``) load like real checkpoints. The
training images come from the world's training stream, which no demo split uses.
Writes ``clip_demo.pt`` (open_clip state dict, fp16), ``sam_demo.pth`` (segment-anything state
dict) and ``demo_models.json`` (settings, SHA-256 of both files, held-out quality and curves,
seconds). Deterministic for a given seed, device and thread count (``--threads``); both trainers
resume from their state files in the output folder after an interruption (on any device: the
states load on the CPU, then move). ``--device`` / ``--precision`` choose where and how training
and ``--evaluate`` run; initialisation and sampling stay on the CPU, so ``--device cpu`` (the
default) gives the committed weights.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from pipeline.atomic import write_json_atomic
from pipeline.errors import PipelineError
from pipeline.params import section
from pipeline.tensorfile import TensorFileError
from pipeline.weights import sha256sum
from stages.params import PARAMS_OPTION, load_params

log = logging.getLogger("wsss.demo_models")
CLIP_FILE = "clip_demo.pt"
SAM_FILE = "sam_demo.pth"
REPORT_FILE = "demo_models.json"
SAM_CURVE_FILE = "sam_curve.jsonl"


def _bar(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def progress(step: int, stats: dict) -> None:
        bar.update(step + 1 - bar.n)  # a resumed run starts past 0
        bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if isinstance(v, float)})
        if step + 1 == total:
            bar.close()
    return progress


def _cpu_state(state: dict) -> dict:
    """A state dict with its tensors on the CPU (the same object on the CPU: the same bytes
    saved), keeping ``_metadata`` as ``state_dict()`` sets it."""
    if all(v.device.type == "cpu" for v in state.values()):
        return state
    out = type(state)((k, v.cpu()) for k, v in state.items())
    if hasattr(state, "_metadata"):
        out._metadata = state._metadata
    return out


def demo_device(name: str) -> torch.device:
    """``--device`` (cpu, cuda, cuda:N, auto) as a torch device; a bad name or a missing CUDA
    device is a one-line :class:`PipelineError`."""
    from pipeline.device import torch_device

    try:
        dev = torch_device(name)
    except PipelineError:
        raise PipelineError(f"demo-models: --device is {name!r} but no CUDA device is available") from None
    except RuntimeError:
        raise PipelineError(f"demo-models: --device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise PipelineError(f"demo-models: --device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PipelineError(f"demo-models: --device is {name!r} but only {torch.cuda.device_count()} "
                         "CUDA device(s) are visible")
    return dev


def _save(obj, path: Path) -> str:
    """Atomic ``torch.save`` with byte-identical output for identical tensors.

    ``torch.save`` names the zip archive inside the file after the file it writes to, so saving
    under a random temporary name (then renaming) would make every run's bytes differ; saving to
    memory names it ``archive`` always.
    """
    import hashlib
    import io
    import os

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def evaluate_demo_models(world_seed: int, n: int, clip_file: str | None, sam_file: str | None = None,
                         only: str | None = None, sam_settings: dict | None = None,
                         device: torch.device | str = "cpu", precision: str = "fp32") -> dict:
    """Held-out quality of the demo models on ``n`` images of world ``world_seed``'s held-out
    stream, loaded through the pipeline's real-checkpoint path (the committed file's checksum
    is verified; a given file's is recorded).

    CLIP: classification mAP and Grad-CAM mIoU. SAM (``sam_file``, else the committed file when
    there is one): single positive point IoU per level (best of the three outputs), and the
    project's quasi-superpixel generator with ``sam_settings`` (params.yaml's ``sam:`` generator
    settings; the thresholds used are in the output): masks per image, the fraction of images
    with all three levels, object recall at IoU 0.5. The models run on ``device`` under
    ``precision`` (``pipeline.precision``)."""
    from pipeline.demo.clip_training import evaluation_images

    if n < 1:
        raise PipelineError(f"--n must be >= 1, got {n}")
    samples = evaluation_images(world_seed, n)
    out = {"world_seed": world_seed, "n_images": n}
    if only in (None, "clip"):
        out["clip"] = _evaluate_clip(samples, clip_file, device, precision)
    if only in (None, "sam"):
        sam = _evaluate_sam(samples, sam_file, sam_settings or {}, required=only == "sam", device=device,
                            precision=precision)
        if sam is not None:
            out["sam"] = sam
    return out


def _evaluate_clip(samples, clip_file: str | None, device="cpu", precision: str = "fp32") -> dict:
    from pipeline.demo.clip_training import (
        DEMO_CLIP_FILE,
        DEMO_CLIP_MODEL,
        DEMO_CLIP_SHA256,
        evaluate_clip,
    )
    from pipeline.params import ClipConfig
    from stages.clip_features import build_clip, verify_clip

    cfg = ClipConfig(model=DEMO_CLIP_MODEL, checkpoint=str(clip_file or DEMO_CLIP_FILE),
                     checkpoint_sha256=None if clip_file else DEMO_CLIP_SHA256)
    if not Path(cfg.checkpoint).is_file():
        raise PipelineError(f"demo CLIP weights not found: {cfg.checkpoint} (make them with "
                         "`wsss demo-models --only clip --out DIR`)")
    sha = verify_clip(cfg)
    clip = build_clip(cfg.model, cfg.checkpoint, None, 0, str(device))
    result = evaluate_clip(clip.model, samples, precision=precision)
    log.info("demo CLIP %s (SHA-256 %s) on %d held-out images", cfg.checkpoint, sha, len(samples))
    return {"map": result["classification_map"], "cam_miou": result["cam_miou"],
            "cam_best_power": result["cam_best_power"],
            "all_background_miou": result["all_background_miou"], "sha256": sha}


def _evaluate_sam(samples, sam_file: str | None, settings: dict, required: bool, device="cpu",
                  precision: str = "fp32") -> dict | None:
    from pipeline.demo.sam_training import DEMO_SAM_FILE, evaluate_sam, point_iou
    from pipeline.sam.models import SPECS, build_sam_predictor
    from pipeline.weights import sha256sum

    path = Path(sam_file) if sam_file else DEMO_SAM_FILE
    if not path.is_file():
        if required or sam_file:
            raise PipelineError(f"demo SAM weights not found: {path} (make them with "
                             "`wsss demo-models --only sam --out DIR`)")
        return None
    # the committed file is verified against the pinned checksum; a given one is recorded
    predictor = build_sam_predictor("demo", path, sha256sum(path) if sam_file else None, device=device)
    sam = predictor.model
    start = time.perf_counter()
    points = point_iou(sam, samples, precision=precision)
    gen = evaluate_sam(sam, samples, precision=precision, **settings)
    log.info("demo SAM %s on %d held-out images in %.0f s", path, len(samples), time.perf_counter() - start)
    return {"point_iou": {k: points[k] for k in ("subpart", "part", "whole")},
            "point_iou_object_points": points["object_points"], "points": points["n_points"],
            "masks_per_image": round(gen["masks_per_image"], 3),
            "three_level_fraction": round(gen["three_level_percent"] / 100, 4),
            "object_recall": round(gen["object_recall_at_0.5_percent"] / 100, 4),
            "thresholds": {"pred_iou_thresh": settings.get("pred_iou_thresh"),
                           "stability_score_thresh": settings.get("stability_score_thresh")},
            "sha256": SPECS["demo"].checkpoint_sha256 if not sam_file else sha256sum(path)}


@click.command("demo-models")
@PARAMS_OPTION
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for the weights (the committed ones live in pipeline/demo/weights).")
@click.option("--seed", default=0, show_default=True, help="Seed of initialisation and sampling.")
@click.option("--threads", default=2, show_default=True,
              help="Torch CPU threads; results are deterministic for a given thread count.")
@click.option("--only", type=click.Choice(["clip", "sam"]), default=None, help="Train one model only.")
@click.option("--clip-steps", type=int, default=None, help="Override the CLIP step count (quick runs).")
@click.option("--sam-steps", type=int, default=None, help="Override the SAM step count (quick runs).")
@click.option("--n-images", type=int, default=None, help="Override the training image count (quick runs).")
@click.option("--eval-images", default=48, show_default=True, help="Held-out images for the report.")
@click.option("--evaluate", is_flag=True,
              help="Train nothing: print the held-out quality of the committed (or given) weights as JSON.")
@click.option("--world-seed", default=0, show_default=True, help="--evaluate: the world whose held-out images to use.")
@click.option("--n", "n_eval", default=48, show_default=True, help="--evaluate: how many held-out images.")
@click.option("--clip", "clip_file", default=None, type=click.Path(dir_okay=False),
              help="Demo CLIP weights: the file --evaluate evaluates, and the one the SAM's image encoder "
                   "starts from with --only sam (default: the committed file).")
@click.option("--sam", "sam_file", default=None, type=click.Path(dir_okay=False),
              help="--evaluate: demo SAM weights (default: the committed file, checksum verified, if any).")
@click.option("--sam-iou-thresh", type=float, default=None,
              help="--evaluate: the generator's pred_iou_thresh (default: params.yaml's sam.pred_iou_thresh).")
@click.option("--sam-stability-thresh", type=float, default=None,
              help="--evaluate: the generator's stability_score_thresh (default: params.yaml's).")
@click.option("--sam-evaluate-every", default=500, show_default=True,
              help="Held-out point IoU of the SAM every N training steps (the report's curve; 0: at the end only).")
@click.option("--device", "device_name", default="cpu", show_default=True,
              help="Where training and --evaluate run: cpu, cuda, cuda:N or auto (cuda when available). "
                   "Sampling stays on the CPU; cpu gives the committed weights.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Forward passes in fp32 or under bf16 autocast (losses and optimizer in fp32).")
def command(params_path, out, seed, threads, only, clip_steps, sam_steps, n_images, eval_images,
            evaluate, world_seed, n_eval, clip_file, sam_file, sam_iou_thresh, sam_stability_thresh,
            sam_evaluate_every, device_name, precision) -> None:
    """Train the demo CLIP and SAM on the procedural world, or evaluate them (--evaluate)."""
    from pipeline.params import SamConfig

    if threads < 1:
        raise PipelineError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    device = demo_device(device_name)
    # the held-out SAM reports run the quasi-superpixel generator with the pipeline's settings
    generator_settings = section(load_params(params_path), "sam", SamConfig).generator_settings()
    if evaluate:
        settings = {**generator_settings, **{k: v for k, v in (("pred_iou_thresh", sam_iou_thresh),
                                                               ("stability_score_thresh", sam_stability_thresh))
                                             if v is not None}}
        click.echo(json.dumps(evaluate_demo_models(world_seed, n_eval, clip_file, sam_file, only, settings,
                                                   device, precision)))
        return
    if out is None:
        raise PipelineError("demo-models: --out is required to train (or pass --evaluate)")
    from pipeline.demo.clip_training import (
        DEMO_CLIP_FILE,
        ClipTrainingConfig,
        evaluate_clip,
        evaluation_images,
        train_clip,
    )
    from pipeline.demo.sam_training import STATE_FILE as SAM_STATE_FILE
    from pipeline.demo.sam_training import (
        SamTrainingConfig,
        evaluate_sam,
        point_iou,
        train_sam,
    )

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["command"] = {"seed": seed, "threads": threads, "device": str(device), "precision": precision}
    held_out = evaluation_images(seed, eval_images) if eval_images else []
    clip_state = None
    if only in (None, "clip"):
        cfg = ClipTrainingConfig(seed=seed, world_seed=seed)
        cfg = replace(cfg, **{k: v for k, v in (("n_images", n_images),) if v})
        if clip_steps:
            cfg = cfg.with_phase_steps(clip_steps)
        curve = []

        def evaluate_phase(name, model):
            if held_out:
                curve.append({"phase": name, **evaluate_clip(model, held_out, precision=precision)})
                log.info("demo CLIP after %s: %s", name, json.dumps(curve[-1]))

        start = time.perf_counter()
        try:
            model = train_clip(cfg, progress=_bar(cfg.steps, "demo CLIP"), state_dir=out_dir,
                               on_phase_end=evaluate_phase, device=device, precision=precision)
        except TensorFileError as exc:
            raise PipelineError(str(exc)) from exc
        seconds = time.perf_counter() - start
        sha = _save({k: v.cpu().half() for k, v in model.state_dict().items()}, out_dir / CLIP_FILE)
        model.load_state_dict(torch.load(out_dir / CLIP_FILE, map_location="cpu", weights_only=True))
        clip_state = _cpu_state(model.state_dict())
        report["clip"] = {"file": CLIP_FILE, "sha256": sha, "config": asdict(cfg), "seconds": round(seconds, 1),
                          "curve": curve,
                          "held_out": evaluate_clip(model, held_out, precision=precision) if held_out else None}
        log.info("demo CLIP: %s (SHA-256 %s) in %.0f s", out_dir / CLIP_FILE, sha, seconds)
    if only in (None, "sam"):
        cfg = SamTrainingConfig(seed=seed, world_seed=seed)
        cfg = replace(cfg, **{k: v for k, v in (("steps", sam_steps), ("n_images", n_images)) if v})
        init_from = None
        if cfg.init == "clip" and clip_state is None:
            init_from = Path(clip_file) if clip_file else DEMO_CLIP_FILE
            if not init_from.is_file():
                raise PipelineError(f"the demo SAM starts from the demo CLIP, not found: {init_from} (train it with "
                                 "`wsss demo-models --only clip --out DIR`, then pass --clip DIR/clip_demo.pt)")
            clip_state = torch.load(init_from, map_location="cpu", weights_only=True)
        # the held-out curve survives interruptions (a resumed run appends to it)
        curve_path = out_dir / SAM_CURVE_FILE
        curve = {}
        if curve_path.is_file() and not (out_dir / SAM_STATE_FILE).is_file():
            curve_path.unlink()  # a fresh run
        if curve_path.is_file():
            for line in curve_path.read_text().splitlines():
                entry = json.loads(line)
                curve[entry["step"]] = entry

        def evaluate_step(step, train_seconds, stats, sam):
            if held_out:
                points = point_iou(sam, held_out, precision=precision)
                curve[step] = {"step": step, "train_minutes": round(train_seconds / 60, 2),
                               "train_iou": {k[4:]: round(v, 4) for k, v in stats.items() if k.startswith("iou_")},
                               "point_iou": {k: points[k] for k in ("subpart", "part", "whole")}}
                with curve_path.open("a") as f:
                    f.write(json.dumps(curve[step]) + "\n")
                log.info("demo SAM at step %d: %s", step, json.dumps(curve[step]))

        start = time.perf_counter()
        try:
            sam = train_sam(cfg, clip_state=clip_state, progress=_bar(cfg.steps, "demo SAM"),
                            state_dir=out_dir, evaluate_every=sam_evaluate_every,
                            on_evaluate=evaluate_step, device=device, precision=precision)
        except TensorFileError as exc:
            raise PipelineError(str(exc)) from exc
        seconds = time.perf_counter() - start
        sha = _save(_cpu_state(sam.state_dict()), out_dir / SAM_FILE)
        report["sam"] = {"file": SAM_FILE, "sha256": sha, "config": asdict(cfg), "seconds": round(seconds, 1),
                         "clip_init": None if init_from is None else {"file": str(init_from),
                                                                      "sha256": sha256sum(init_from)},
                         "curve": [curve[k] for k in sorted(curve) if k <= cfg.steps],
                         "held_out": ({**evaluate_sam(sam, held_out[:12], precision=precision, **generator_settings),
                                       "n_images": len(held_out[:12])}
                                      if held_out else None)}
        log.info("demo SAM: %s (SHA-256 %s) in %.0f s", out_dir / SAM_FILE, sha, seconds)
    write_json_atomic(report_path, report)
