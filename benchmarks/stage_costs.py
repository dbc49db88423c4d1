"""Per-unit cost of every real-size stage but SAM, and the VOC totals computed from it.

Real architectures with random weights, built through the project's own loading paths: open_clip
``ViT-B-16`` from a random ``open_clip_pytorch_model.bin`` and DeepLabV3+ R101 with a random
torchvision ``resnet101`` state dict (``tests/real_checkpoints.py`` writes both, as the real-model
test does; nothing is downloaded). The settings are the paper's: params.yaml with every key that
``wsss configure voc`` writes (``pipeline.profiles.PROFILES["voc"]``). Images are synthetic
500x375 RGB JPEGs (VOC's typical size) with 1-2 labelled classes; synthetic quasi-superpixels
(``--masks`` rectangles and ellipses at random levels) stand in for SAM's.

Each stage runs in its own process (``--in-process``: this one) and calls the library function
its stage command runs per unit, on stores and files laid out as the stage reads them:

- ``clip_features``, per training image: ``pipeline.clip.features.features_for_image`` (read the
  JPEG, K = ``clip_features.n_views`` augmented 224² views through the encoder, the inference pass
  at native size with the last-8-block attention, both zarr writes);
- ``train_prompts@cls|seg``, per optimizer step at ``prompts.<which>.batch_size`` (16): the body
  of ``pipeline.prompts.loop.train``'s loop on the cached-view path (``BatchSource.batch`` reads
  one view chunk per sample from a ``train_views.zarr`` of 16 images x K views (small enough to
  sit in the page cache, unlike VOC's ~100 GB), and for seg the coarse seed PNGs;
  ``pipeline.prompts.training.optimizer_iteration``; SGD + scheduler step). Tokens are random,
  not encoder outputs; for seg the number of (view, class) Grad-CAM pairs depends on the seeds
  (here each view holds its image's 1 or 2 classes), so its mean is printed;
- ``cams@cls|seg``, per image: ``pipeline.cams.inference.cams_for_image`` (2 classes: batched
  Grad-CAM through the last block + CAA with the cached attention; the text features are
  computed once per process, as the stage does);
- ``seeds@coarse|fine``, per image: ``pipeline.seeds.image.seeds_for_image`` (SAMS, the seed
  PNG, and the seed/CAM scoring against the ground truth that VOC train_aug has);
- ``train_segmenter``, per iteration of ``--segmenter-batch`` samples (default 2, reported per
  sample too) at 512² crops, output stride 8, ``compute.precision`` fp32: the loop body of
  ``pipeline.segmenter.fit.fit`` at ``loader_workers: 0`` (a ``TrainingSamples`` batch:
  ``load_pair`` + ``SegmentationAugment`` + collate; ``train_step``, its loss read);
  ``train_segmenter (val)``, per val image: its single-scale ``evaluate`` pass;
- ``predict``, per val image: ``pipeline.segmenter.predict.prediction_for_image`` (multi-scale
  0.5-1.5 + flip, raw PNG, SAMS post-processing for alpha 3 and the 1-5 sweep from stored masks
  (SAM is not run), PNGs, confusion matrices) with a segmenter saved and reloaded like
  ``best.pt``.

Seconds are the median of ``--repeats`` timed calls after ``--warmup`` calls. Memory: on CPU the
peak RSS of the process during the warm-up and timed calls (``/proc/self/clear_refs`` resets the
counter after the models are built; it includes the models and whatever the process holds); on
CUDA the peak of ``torch.cuda.max_memory_allocated``. The VOC totals multiply the unit costs by
10,582 train_aug images, 1,449 val images and the iteration counts of ``configure voc``; they
leave out SAM (``benchmarks/sam_masks.py``), ``prepare``, model loading and process start-up.
The benchmark compares nothing, so its ``RATIO stage_costs=1.0`` line only keeps the benchmarks'
convention (every script ends with one RATIO line).

    .venv/bin/python benchmarks/stage_costs.py [--device cpu|cuda] [--repeats 3] [--warmup 1]
        [--stages clip_features cams@cls ...] [--weights DIR] [--tiny] [--in-process]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

# harness puts this checkout and tests/ (real_checkpoints: real-format random weights) on sys.path
from harness import REPO, PeakMemory, interleaved_times, print_ratio, sync

H, W = 375, 500  # VOC's typical image size
VOC_TRAIN_AUG, VOC_VAL = 10_582, 1_449
STAGES = ("clip_features", "train_prompts@cls", "cams@cls", "seeds@coarse", "train_prompts@seg",
          "cams@seg", "seeds@fine", "train_segmenter", "predict")
IMAGE_LABELS = ((4, 14), (11,))  # bottle + person, dog: images alternate 2 and 1 classes


# -- parameters --------------------------------------------------------------------------------


def paper_params(device: str, clip_checkpoint: str | None, resnet: str | None, tiny: bool) -> dict:
    """params.yaml with what ``wsss configure voc`` writes (tiny: the embedded models, short)."""
    from pipeline.config import set_dotted
    from pipeline.params import check_sections
    from pipeline.profiles import PROFILES

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    check_sections(params)
    for key, value in PROFILES["voc"].items():
        set_dotted(params, key, value)
    set_dotted(params, "compute.device", device)
    set_dotted(params, "clip.checkpoint", clip_checkpoint)
    set_dotted(params, "segmenter.encoder_weights", resnet)
    if tiny:  # the table's code path on the embedded tiny models, in seconds
        for key, value in {"clip.model": "tiny", "clip.checkpoint": None, "clip_features.n_views": 2,
                           "prompts.cls.batch_size": 2, "prompts.seg.batch_size": 2,
                           "segmenter.model": "tiny", "segmenter.encoder_weights": None,
                           "segmenter.output_stride": 16, "segmenter.crop_size": 64,
                           "predict.scales": [0.5, 1.0]}.items():
            set_dotted(params, key, value)
    return params


def configs(params: dict):
    """The typed sections, read the way the stages read them."""
    from pipeline.params import CamsConfig
    from pipeline.params import ClipConfig, ClipFeaturesConfig
    from pipeline.params import ComputeConfig, section
    from pipeline.params import PredictConfig
    from pipeline.params import SeedsConfig
    from pipeline.params import PromptsConfig
    from pipeline.params import SegmenterConfig

    return {
        "compute": section(params, "compute", ComputeConfig),
        "clip": section(params, "clip", ClipConfig),
        "clip_features": section(params, "clip_features", ClipFeaturesConfig),
        "prompts.cls": section(params, "prompts.cls", PromptsConfig),
        "prompts.seg": section(params, "prompts.seg", PromptsConfig),
        "cams.cls": section(params, "cams.cls", CamsConfig),
        "cams.seg": section(params, "cams.seg", CamsConfig),
        "seeds": section(params, "seeds", SeedsConfig),
        "segmenter": section(params, "segmenter", SegmenterConfig),
        "predict": section(params, "predict", PredictConfig),
    }


# -- synthetic inputs --------------------------------------------------------------------------


def label_map(hw: tuple[int, int], classes, band: bool) -> np.ndarray:
    """A VOC-style label map: one rectangle per class (1-based), optionally VOC's 255 border band."""
    h, w = hw
    label = np.zeros(hw, np.uint8)
    for k, c in enumerate(classes):
        y0, x0 = int(h * (0.1 + 0.35 * k)), int(w * (0.1 + 0.3 * k))
        label[y0: y0 + int(h * 0.5), x0: x0 + int(w * 0.5)] = c + 1
    if band:
        edge = np.zeros(hw, bool)
        edge[1:] |= label[1:] != label[:-1]
        edge[:, 1:] |= label[:, 1:] != label[:, :-1]
        label[edge] = 255
    return label


def write_image(path: Path, hw: tuple[int, int], seed: int) -> None:
    """A JPEG with smooth gradients, noise and a few shapes (decodes like a photo, not like noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    img = np.stack([128 + 80 * np.sin(xx / (30 + 10 * c) + yy / (45 + 5 * c) + c) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    for _ in range(6):
        y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
        img[y0: y0 + rng.integers(10, h // 2), x0: x0 + rng.integers(10, w // 2)] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def quasi_superpixels(hw: tuple[int, int], n: int, seed: int):
    """``n`` rectangle / ellipse masks at random levels, in generator order (wholes first)."""
    from pipeline.sam.quasi_superpixels import QuasiSuperpixels

    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    ry, rx = rng.uniform(8, h / 2, n), rng.uniform(8, w / 2, n)
    dy = (yy[None] - cy[:, None, None]) / ry[:, None, None]
    dx = (xx[None] - cx[:, None, None]) / rx[:, None, None]
    ellipse = (rng.random(n) < 0.5)[:, None, None]
    masks = np.where(ellipse, dy ** 2 + dx ** 2 <= 1, (np.abs(dy) <= 1) & (np.abs(dx) <= 1))
    levels = np.sort(rng.integers(0, 3, n))[::-1].astype(np.uint8)
    boxes = np.zeros((n, 4), np.int64)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if ys.size:
            boxes[i] = xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()
    return QuasiSuperpixels(
        masks=masks, levels=levels, predicted_iou=rng.uniform(0.86, 1, n).astype(np.float32),
        stability_score=rng.uniform(0.92, 1, n).astype(np.float32), bbox_xywh=boxes,
        point_coords=np.stack([cx, cy], 1), crop_box_xywh=np.tile(np.array([0, 0, w, h]), (n, 1)),
    )


# -- measurement -------------------------------------------------------------------------------


def measure(fn, repeats: int, warmup: int, device, memory: PeakMemory) -> dict:
    memory.reset()
    (times,) = interleaved_times([fn], repeats, warmup, lambda: sync(device))
    return {"seconds": statistics.median(times), "runs": times, "memory_gb": memory.read(),
            "memory_kind": memory.kind}


# -- the stages --------------------------------------------------------------------------------


def _clip(cfg, device):
    from pipeline.clip.factory import build_clip

    return build_clip(cfg["clip"].model, cfg["clip"].checkpoint, None, cfg["clip"].seed, str(device))


def _store(path: Path, **attrs):
    from pipeline.store import ImageStore

    return ImageStore.open_for_writing(path, {"fingerprint": "stage_costs", **attrs})


def bench_clip_features(cfg, tmp: Path, hw, device, args) -> list[dict]:
    from pipeline.clip.features import FeaturesTask, features_for_image
    from pipeline.clip.model import inference_size

    clip = _clip(cfg, device)
    fcfg, ccfg = cfg["clip_features"], cfg["clip"]
    image = tmp / "img.jpg"
    write_image(image, hw, 0)
    views, inference = _store(tmp / "train_views.zarr"), _store(tmp / "inference.zarr")
    counter = iter(range(10 ** 6))

    def one_image():  # a new id each call: the stage never rewrites an image
        task = FeaturesTask(f"img{next(counter):05d}", str(image), IMAGE_LABELS[0], 20, str(views.path),
                            str(inference.path), fcfg.n_views, fcfg.seed, fcfg.augment,
                            ccfg.attention_blocks, ccfg.max_side, cfg["compute"].precision)
        features_for_image(clip, task)

    r = measure(one_image, args.repeats, args.warmup, device, PeakMemory(device))
    ih, iw = inference_size(*hw, ccfg.max_side, clip.patch_size)
    return [{**r, "stage": "clip_features", "unit": "image",
             "detail": f"K={fcfg.n_views} views {fcfg.augment.crop}² + inference pass {iw}x{ih} "
                       f"(image {hw[1]}x{hw[0]}; mean attention of the last {ccfg.attention_blocks} "
                       f"blocks), JPEG read, zarr writes"}]


def _split(tmp: Path, hw, n: int, seeds: bool):
    """A train split of ``n`` synthetic images (alternately 2 and 1 classes) with label PNGs."""
    from pipeline.data.datasets import VOC_CLASSES, Record, SplitIndex
    from pipeline.data.imageio import write_palette_png

    records = []
    for i in range(n):
        classes = IMAGE_LABELS[i % 2]
        image = tmp / "images" / f"img{i:05d}.jpg"
        write_image(image, hw, i)
        label = tmp / "labels" / f"img{i:05d}.png"
        write_palette_png(label, label_map(hw, classes, band=True))
        if seeds:
            write_palette_png(tmp / "seeds" / f"img{i:05d}.png", label_map(hw, classes, band=False))
        records.append(Record(f"img{i:05d}", str(image), str(label), hw[0], hw[1], tuple(classes)))
    return SplitIndex("voc", "train_aug", list(VOC_CLASSES), records)


def bench_train_prompts(which: str, cfg, tmp: Path, hw, device, args) -> list[dict]:
    import torch

    from pipeline.prompts.training import segmentation_labels, warmup_cosine_factor
    from pipeline.store import write_group
    from pipeline.clip.features import sample_views, view_rng
    from pipeline.schemas import VIEWS_STORE
    from pipeline.precision import grad_scaler, training_precision
    from pipeline.prompts.training import optimizer_iteration
    from pipeline.prompts.batches import BatchSource
    from pipeline.prompts.checkpoints import build_learner

    pcfg, fcfg = cfg[f"prompts.{which}"], cfg["clip_features"]
    clip = _clip(cfg, device)
    n_images = max(pcfg.batch_size, 2)
    split = _split(tmp, hw, n_images, seeds=True)
    store = _store(tmp / "features" / VIEWS_STORE, class_names=split.class_names)
    rng = np.random.default_rng(0)
    g = clip.patch_size
    tokens_shape = (fcfg.n_views, 1 + (fcfg.augment.crop // g) ** 2, clip.width)
    for r in split.records:  # random tokens in the stored layout: one fp16 chunk per view
        views = sample_views(view_rng(fcfg.seed, r.id), hw, fcfg.n_views, fcfg.augment)
        labels = np.zeros(len(split.class_names), np.uint8)
        labels[list(r.labels)] = 1
        write_group(store.path, r.id, {
            "tokens": rng.normal(0, 0.5, tokens_shape).astype(np.float16),
            "views": np.stack([v.to_array() for v in views]).astype(np.float32), "labels": labels,
        }, attrs={"height": hw[0], "width": hw[1]}, chunks={"tokens": (1, *tokens_shape[1:])})
    learner = build_learner(clip, split.class_names, split.dataset, pcfg)
    source = BatchSource(which, pcfg, split, tmp / "features", tmp / "seeds", fcfg, clip)
    # as pipeline.prompts.loop.train builds them
    optimizer = torch.optim.SGD([learner.ctx], lr=pcfg.lr, momentum=pcfg.momentum,
                                weight_decay=pcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: warmup_cosine_factor(
        it, pcfg.iterations, pcfg.warmup_iterations, pcfg.warmup_lr, pcfg.lr))
    precision = training_precision("fp32", pcfg.amp, device)
    scaler = grad_scaler(device, precision)
    state = {"it": 0, "pairs": []}

    def one_step():  # the body of train()'s loop
        batch = source.batch(state["it"])
        _, labels, crops = batch
        if crops is not None:
            state["pairs"].append(int(segmentation_labels(labels, crops, pcfg.loss_classes).sum()))
        optimizer_iteration(which, pcfg, clip, learner, batch, device, optimizer, scheduler, scaler, precision)
        state["it"] += 1

    r = measure(one_step, args.repeats, args.warmup, device, PeakMemory(device))
    detail = (f"batch {pcfg.batch_size} cached views, {len(learner.names)} prompts x 77 positions, "
              f"precision {precision}")
    if which == "seg":
        detail += f", mean {statistics.mean(state['pairs']):.1f} Grad-CAM pairs/step"
    return [{**r, "stage": f"train_prompts@{which}", "unit": "step", "detail": detail}]


def bench_cams(which: str, cfg, tmp: Path, hw, device, args) -> list[dict]:
    from dataclasses import replace

    import torch

    from pipeline.store import write_group
    from pipeline.cams.inference import CamModel, CamsTask, cams_for_image
    from pipeline.clip.features import inference_features
    from pipeline.prompts.checkpoints import build_learner
    from pipeline.data.datasets import VOC_CLASSES
    from pipeline.data.imageio import read_rgb

    clip = _clip(cfg, device)
    ccfg = cfg["clip"]
    # as build_cam_model: trained prompts (here: initial context), text over all 77 positions
    pcfg = cfg[f"prompts.{which}"]
    learner = build_learner(clip, list(VOC_CLASSES), "voc", replace(pcfg, truncate_text=False))
    with torch.no_grad():
        text = learner.text_features(clip.model)
    res = CamModel(clip, text, learner.n_fg)
    image = tmp / "img.jpg"
    write_image(image, hw, 0)
    x, att, (gh, gw), (ih, iw) = inference_features(clip, read_rgb(image), ccfg.attention_blocks,
                                                    ccfg.max_side, cfg["compute"].precision)
    features = _store(tmp / "inference.zarr")
    write_group(features.path, "img00000", {
        "tokens": x.cpu().numpy(), "attention": att.cpu().numpy().astype(np.float16),
    }, attrs={"height": hw[0], "width": hw[1], "input_height": ih, "input_width": iw,
              "grid_h": gh, "grid_w": gw})
    out = _store(tmp / f"{which}.zarr")
    caa = cfg[f"cams.{which}"].caa
    task = CamsTask("img00000", IMAGE_LABELS[0], str(features.path), str(out.path), caa,
                    cfg["compute"].precision)
    r = measure(lambda: cams_for_image(res, task), args.repeats, args.warmup, device, PeakMemory(device))
    return [{**r, "stage": f"cams@{which}", "unit": "image",
             "detail": f"{len(IMAGE_LABELS[0])} classes, grid {gh}x{gw}, CAA {caa.enabled} "
                       f"(propagate {caa.propagate})"}]


def bench_seeds(which: str, cfg, tmp: Path, hw, device, args) -> list[dict]:
    import torch

    from pipeline.data.imageio import write_palette_png
    from pipeline.clip.model import inference_size
    from pipeline.schemas import open_cams, open_masks
    from pipeline.seeds.image import SeedsTask, seeds_for_image
    from pipeline.store import write_group

    scfg = cfg["seeds"]
    rng = np.random.default_rng(0)
    classes = np.array(IMAGE_LABELS[0], np.int64)
    gh, gw = (s // 16 for s in inference_size(*hw, cfg["clip"].max_side))
    cams = _store(tmp / "cams.zarr")
    cam = rng.normal(size=(len(classes), gh, gw)).astype(np.float32)
    write_group(cams.path, "img00000", {"cam": cam, "fg_cls": classes, "cam_caa": np.abs(cam)},
                attrs={"height": hw[0], "width": hw[1]})
    sam = _store(tmp / "sam_masks.zarr")
    write_group(sam.path, "img00000", quasi_superpixels(hw, args.masks, 0).to_arrays())
    label = tmp / "label.png"
    write_palette_png(label, label_map(hw, classes, band=True))
    stores = (open_cams(cams.path), open_masks(sam.path))  # as the stage opens them
    task = SeedsTask("img00000", hw[0], hw[1], str(label), str(tmp / "seeds" / "img00000.png"),
                     getattr(scfg, which).alpha, scfg.fallback_thresh, tuple(scfg.cam_bg_powers), 21)
    cpu = torch.device("cpu")  # SAMS runs on the CPU whatever the device: its memory is RSS
    r = measure(lambda: seeds_for_image(stores, task), args.repeats, args.warmup, cpu, PeakMemory(cpu))
    return [{**r, "stage": f"seeds@{which}", "unit": "image",
             "detail": f"{args.masks} masks, {len(classes)} classes, PNG + scoring "
                       f"({len(scfg.cam_bg_powers)} bg powers, cam and cam_caa)"}]


def _segmenter(cfg, device):
    from pipeline.segmenter.model import build_segmenter

    s = cfg["segmenter"]
    net = build_segmenter(s.model, 21, s.encoder_weights, None, s.seed, s.output_stride)
    return net.to(device)


def bench_train_segmenter(cfg, tmp: Path, hw, device, args) -> list[dict]:
    from functools import partial

    from pipeline.segmenter.data import IterationSampler, TrainingSamples, collate_training
    from pipeline.segmenter.training import SegmentationAugment, build_optimizer, poly_lr, train_step
    from pipeline.segmenter.fit import load_pair

    s = cfg["segmenter"]
    split = _split(tmp, hw, 4, seeds=True)
    net = _segmenter(cfg, device)
    optimizer = build_optimizer(net, s.lr, s.momentum, s.weight_decay)
    augment = SegmentationAugment(s.crop_size, s.scale_range, s.flip_prob)
    batch = args.segmenter_batch
    samples = TrainingSamples(split.records, partial(load_pair, seeds_dir=tmp / "seeds"), augment, s.seed)
    keys = iter(IterationSampler(len(split.records), batch, s.seed, 0, 10**9))
    state = {"step": 0}

    def one_iteration():  # the body of the stage's loop at loader_workers 0 (without the val pass)
        b = collate_training([samples[k] for k in next(keys)])
        lr = poly_lr(s.lr, state["step"], s.iterations, s.poly_power)
        float(train_step(net, optimizer, b.images, b.labels, lr, sub_batches=1,
                         precision=cfg["compute"].precision))  # the loss read each time: a full step
        state["step"] += 1

    r = measure(one_iteration, args.repeats, args.warmup, device, PeakMemory(device))
    per_sample = {**r, "seconds": r["seconds"] / batch, "runs": [t / batch for t in r["runs"]]}
    detail = (f"{s.model}, crop {s.crop_size}², output stride {s.output_stride}, "
              f"{cfg['compute'].precision}, batch {batch}")
    return [{**r, "stage": "train_segmenter", "unit": f"iteration (batch {batch})", "detail": detail},
            {**per_sample, "stage": "train_segmenter", "unit": "sample", "detail": f"= the row above / {batch}"}]


def bench_predict(cfg, tmp: Path, hw, device, args) -> list[dict]:
    from pipeline.data.datasets import VOC_CLASSES
    from pipeline.segmenter.model import save_segmenter
    from pipeline.store import write_group
    from pipeline.segmenter.evaluate import eval_loader, evaluate
    from pipeline.segmenter.predict import load_resources, prediction_for_image

    p = cfg["predict"]
    split = _split(tmp, hw, 1, seeds=False)
    record = split.records[0]
    model_path = tmp / "segmenter" / "best.pt"
    save_segmenter(model_path, _segmenter(cfg, "cpu"), cfg["segmenter"].model, VOC_CLASSES, {})
    res = load_resources(str(model_path), str(device), None)  # the stage's per-process resource
    sam = _store(tmp / "sam_masks.zarr")
    write_group(sam.path, record.id, quasi_superpixels(hw, args.masks, 0).to_arrays())
    item = {"scales": list(p.scales), "flip": p.flip, "postprocess": p.postprocess, "alpha": p.alpha,
            "alpha_sweep": list(p.alpha_sweep), "out": str(tmp / "predictions"),
            "sam_masks": str(sam.path), "precision": cfg["compute"].precision,
            "id": record.id, "image": record.image, "label": record.label}
    r = measure(lambda: prediction_for_image(res, item), args.repeats, args.warmup, device, PeakMemory(device))
    rows = [{**r, "stage": "predict", "unit": "image",
             "detail": f"scales {p.scales} x flip {p.flip}, SAMS post-processing "
                       f"({args.masks} stored masks, alphas {sorted(set([p.alpha, *p.alpha_sweep]))}), "
                       f"output stride {res['meta']['output_stride']}"}]
    val = eval_loader([record], record.height * record.width)
    v = measure(lambda: evaluate(res["net"], val, 21, cfg["compute"].precision), args.repeats,
                args.warmup, device, PeakMemory(device))
    rows.append({**v, "stage": "train_segmenter (val)", "unit": "val image",
                 "detail": "single scale, no flip: train_segmenter's val pass (evaluate)"})
    return rows


BENCHES = {
    "clip_features": bench_clip_features,
    "train_prompts@cls": lambda *a: bench_train_prompts("cls", *a),
    "train_prompts@seg": lambda *a: bench_train_prompts("seg", *a),
    "cams@cls": lambda *a: bench_cams("cls", *a),
    "cams@seg": lambda *a: bench_cams("seg", *a),
    "seeds@coarse": lambda *a: bench_seeds("coarse", *a),
    "seeds@fine": lambda *a: bench_seeds("fine", *a),
    "train_segmenter": bench_train_segmenter,
    "predict": bench_predict,
}


def run_stage(stage: str, args) -> list[dict]:
    import torch

    from pipeline.device import torch_device

    params = paper_params(args.device, args.clip_checkpoint, args.resnet, args.tiny)
    cfg = configs(params)
    device = torch_device(cfg["compute"].device)
    hw = (H // 5, W // 5) if args.tiny else (H, W)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix=f"stage_costs_{stage.replace('@', '_')}_") as tmp:
        rows = BENCHES[stage](cfg, Path(tmp), hw, device, args)
    return [{**row, "threads": torch.get_num_threads(), "device": str(device)} for row in rows]


# -- totals and the table ----------------------------------------------------------------------


def voc_totals(rows: list[dict]) -> list[tuple[str, str, float]]:
    """(stage, how it is counted, seconds) for a VOC run, from the measured unit costs."""
    from pipeline.profiles import PROFILES

    voc = PROFILES["voc"]
    by = {(r["stage"], r["unit"]): r["seconds"] for r in rows}
    out = []
    for stage in ("clip_features", "cams@cls", "cams@seg", "seeds@coarse", "seeds@fine"):
        if (stage, "image") in by:
            out.append((stage, f"{VOC_TRAIN_AUG:,} train_aug images", VOC_TRAIN_AUG * by[stage, "image"]))
    for which in ("cls", "seg"):
        if (f"train_prompts@{which}", "step") in by:
            n = voc[f"prompts.{which}.iterations"]
            out.append((f"train_prompts@{which}", f"{n:,} steps", n * by[f"train_prompts@{which}", "step"]))
    if ("train_segmenter", "sample") in by:
        n, b = voc["segmenter.iterations"], voc["segmenter.batch_size"]
        out.append(("train_segmenter", f"{n:,} iterations x {b} samples", n * b * by["train_segmenter", "sample"]))
        if ("train_segmenter (val)", "val image") in by:
            every = voc["segmenter.val_every"]
            evals = n // every + (n % every != 0)
            out.append(("train_segmenter (val)", f"{evals} passes x {VOC_VAL:,} val images",
                        evals * VOC_VAL * by["train_segmenter (val)", "val image"]))
    if ("predict", "image") in by:
        out.append(("predict", f"{VOC_VAL:,} val images", VOC_VAL * by["predict", "image"]))
    return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def print_table(rows: list[dict], args) -> None:
    if not rows:
        return
    print(f"\nper-unit cost ({rows[0]['device']}, {rows[0]['threads']} torch threads, median of "
          f"{args.repeats} after {args.warmup} warm-up; memory: RSS = peak resident set of the "
          f"measuring process, CUDA = peak allocated tensors, * = lifetime peak)")
    if args.tiny:
        print("--tiny: embedded tiny models and small inputs; these are NOT the real stages' costs")
    head = f"{'stage':<22} {'unit':<20} {'seconds':>9} {'runs (s)':<20} {'mem GiB':>11}  what"
    print(head)
    print("-" * len(head))
    for r in rows:
        runs = " ".join(f"{t:.3g}" for t in r["runs"])
        mem = f"{r['memory_gb']:.2f} {r['memory_kind']}"
        print(f"{r['stage']:<22} {r['unit']:<20} {r['seconds']:>9.3f} {runs:<20} {mem:>11}  {r['detail']}")
    totals = voc_totals(rows)
    if totals:
        print("\nVOC totals, computed from the measured unit cost (one device, serial; "
              "without SAM, prepare, model loading)")
        for stage, count, seconds in totals:
            print(f"{stage:<22} {count:<34} {_duration(seconds):>10}")
        total = sum(s for _, _, s in totals)
        print(f"{'sum':<22} {'':<34} {_duration(total):>10}")


# -- entry point -------------------------------------------------------------------------------


def weights(folder: Path) -> tuple[str, str]:
    import real_checkpoints

    folder.mkdir(parents=True, exist_ok=True)
    clip = real_checkpoints.open_clip_vit_b16(folder)
    resnet = real_checkpoints.torchvision_resnet101(folder)
    return str(clip.path), str(resnet.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda (| cuda:N)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--weights", type=Path, default=None,
                    help="folder for the random real-format weights (kept; default: a temporary one)")
    ap.add_argument("--masks", type=int, default=60, help="synthetic quasi-superpixels per image")
    ap.add_argument("--segmenter-batch", type=int, default=2)
    ap.add_argument("--tiny", action="store_true",
                    help="embedded tiny models, small images and batches: checks the code path only")
    ap.add_argument("--in-process", action="store_true", help="all stages in this process")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--clip-checkpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--resnet", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("ROWS " + json.dumps(run_stage(args.child, args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="stage_costs_weights_") as tmp_weights:
        if not args.tiny:
            t0 = time.perf_counter()
            args.clip_checkpoint, args.resnet = weights(args.weights or Path(tmp_weights))
            print(f"random real-format weights ready in {time.perf_counter() - t0:.0f} s: "
                  f"{args.clip_checkpoint}, {args.resnet}", flush=True)
        try:
            load = os.getloadavg()
            print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                  f"({os.cpu_count()} CPUs)", flush=True)
        except OSError:
            pass
        rows = []
        for stage in args.stages:
            t0 = time.perf_counter()
            if args.in_process:
                got = run_stage(stage, args)
            else:
                cmd = [sys.executable, __file__, "--child", stage, "--device", args.device,
                       "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                       "--masks", str(args.masks), "--segmenter-batch", str(args.segmenter_batch)]
                cmd += ["--tiny"] if args.tiny else ["--clip-checkpoint", args.clip_checkpoint,
                                                     "--resnet", args.resnet]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("ROWS ")]
                if proc.returncode or not lines:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                    raise SystemExit(f"stage {stage}: the measuring process failed (exit {proc.returncode})")
                got = json.loads(lines[-1][5:])
            for r in got:
                print(f"{r['stage']:<22} {r['seconds']:.3f} s per {r['unit']}  "
                      f"({time.perf_counter() - t0:.0f} s with set-up)", flush=True)
            rows += got
    try:
        load = os.getloadavg()
        print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print_ratio("stage_costs", 1.0, digits=1)


if __name__ == "__main__":
    main()
