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
from dataclasses import replace
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from pipeline.atomic import write_json_atomic
from pipeline.demo.training.evaluate import evaluate_demo_models
from pipeline.demo.training.run import demo_device, train_demo_clip, train_demo_sam
from pipeline.errors import PipelineError
from pipeline.params import SamConfig, section
from stages.params import PARAMS_OPTION, load_params

REPORT_FILE = "demo_models.json"


def _bar(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def progress(step: int, stats: dict) -> None:
        bar.update(step + 1 - bar.n)  # a resumed run starts past 0
        bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if isinstance(v, float)})
        if step + 1 == total:
            bar.close()
    return progress



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
    from pipeline.demo.training.clip import DEMO_CLIP_FILE, ClipTrainingConfig, evaluation_images
    from pipeline.demo.training.sam import SamTrainingConfig

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
        report["clip"], clip_state = train_demo_clip(cfg, out_dir, held_out, _bar(cfg.steps, "demo CLIP"),
                                                     device, precision)
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
        report["sam"] = train_demo_sam(cfg, out_dir, clip_state, init_from, held_out, generator_settings,
                                       _bar(cfg.steps, "demo SAM"), sam_evaluate_every, device, precision)
    write_json_atomic(report_path, report)
