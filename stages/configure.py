"""``wsss configure voc|coco|custom``: switch params.yaml from the embedded default to a real setup.

Writes the paper's values (algorithms.md) for the chosen dataset, the dataset root and the model
checkpoints, after checking that every path exists. Comments and layout of params.yaml are kept;
every changed key is printed as ``key: old -> new``. ``git checkout params.yaml`` returns to the
embedded default.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from stages.common import StageError


def epochs_to_iterations(epochs: int, images: int, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``images`` at ``batch_size`` (rounded up)."""
    return math.ceil(epochs * images / batch_size)


#: §9: 80 epochs of VOC train_aug (10,582 images) at batch 16 = 52,910 iterations.
VOC_SEGMENTER_ITERATIONS = epochs_to_iterations(80, 10_582, 16)
#: COCO: §9 gives no DeepLabV3+ schedule. Our choice: 100,000 iterations at batch 16 (about 19
#: epochs of the 82,783 train2014 images), the authors' own COCO budget for their other
#: segmenter (Mask2Former: 80k VOC / 100k COCO) and between mmsegmentation's 80k and 160k
#: DeepLabV3+ R101-d8 512x512 COCO-Stuff164k schedules.
COCO_SEGMENTER_ITERATIONS = 100_000

# The paper's settings shared by every real run (algorithms.md §1, §7, §9).
_REAL = {
    "compute.device": "auto",
    "sam.model": "vit_h",
    "sam.pred_iou_thresh": 0.86,
    "sam.stability_score_thresh": 0.92,
    "clip.model": "ViT-B-16",
    "prompts.cls.warmup_iterations": 500,
    "prompts.seg.warmup_iterations": 500,
    "prompts.cls.checkpoint_every": 500,
    "prompts.seg.checkpoint_every": 500,
    "clip_features.n_views": 16,
    # §9: DeepLabV3+ R101 at output stride 8 ("d3p-r1d8"), batch 16, 512 crops, best on val.
    "segmenter.model": "deeplabv3plus_r101",
    "segmenter.output_stride": 8,
    "segmenter.crop_size": 512,
    "segmenter.batch_size": 16,
    "segmenter.iterations": VOC_SEGMENTER_ITERATIONS,
    "segmenter.val_every": 2000,
    "segmenter.checkpoint_every": 1000,
    "predict.checkpoint": "best",
    # §9: alpha swept 1-5 on val (predict.alpha_sweep stays in the metrics), 3 used for test.
    "predict.alpha": 3.0,
    "predict.alpha_sweep": [1.0, 2.0, 3.0, 4.0, 5.0],
}

PROFILES: dict[str, dict[str, Any]] = {
    "voc": {
        **_REAL,
        "dataset.name": "voc",
        "dataset.train_split": "train_aug",
        "dataset.eval_split": "val",
        # the reference ran CLIP inference at native size (VOC: long side <= 500)
        "clip.max_side": None,
        "prompts.cls.iterations": 1800,
        "prompts.seg.iterations": 17000,
        "seeds.coarse.alpha": 0.6,
        "seeds.fine.alpha": 0.7,
        "cams.cls.caa.enabled": True,
        "cams.cls.caa.t_box": 0.4,
        "cams.cls.caa.propagate": "score",
        "cams.seg.caa.enabled": True,
        "cams.seg.caa.t_box": 0.5,
        "cams.seg.caa.propagate": "cam",
    },
    "coco": {
        **_REAL,
        "dataset.name": "coco",
        "dataset.train_split": "train",
        "dataset.eval_split": "val",
        "clip_features.augment.long_side_range": [318, 530],
        "clip.max_side": None,  # native size, as the reference (COCO: long side <= 640)
        "prompts.cls.iterations": 20500,
        "prompts.cls.warmup_iterations": 1000,
        # 16 samples per step, split for memory as the reference did (§7)
        "prompts.cls.sub_batches": 4,
        "prompts.seg.iterations": 75000,
        "prompts.seg.warmup_iterations": 1000,
        "prompts.seg.sub_batches": 8,
        # the authors' COCO CAMs come from intermediate checkpoints (§7)
        "prompts.cls.cam_iteration": 6150,
        "prompts.seg.cam_iteration": 45000,
        "prompts.seg.loss_classes": "image",
        # COCO uses the classification-style prompts for both sets (§2).
        "prompts.seg.shared_context": True,
        "prompts.seg.class_position": "end",
        "prompts.seg.background": "names",
        "prompts.seg.init_std": 0.015,
        "cams.cls.caa.enabled": True,
        "cams.cls.caa.t_box": 0.6,
        "cams.cls.caa.propagate": "cam",
        "cams.seg.caa.enabled": False,
        # §5: COCO coarse alpha is chosen in 0.3-0.5 on train ground truth; 0.4 is the middle.
        "seeds.coarse.alpha": 0.4,
        "seeds.fine.alpha": 1.0,
        "segmenter.iterations": COCO_SEGMENTER_ITERATIONS,
        # val2014 has 40,504 images: a single-scale pass every 10k iterations (10 candidates).
        "segmenter.val_every": 10000,
    },
    "custom": {
        **_REAL,
        "dataset.name": "custom",
        "prompts.cls.iterations": 1800,
        "prompts.seg.iterations": 17000,
        # segmenter.iterations: the VOC schedule (80 epochs of 10,582 images); the command says
        # how to scale it to the user's image count.
    },
}


def _get(tree, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(tree, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[last] = value


def _require_file(path: str | None, option: str) -> str | None:
    if path is not None and not Path(path).is_file():
        raise StageError(f"{option}: file not found: {path}")
    return path


def plan(profile: str, root: str | None, sam_checkpoint: str | None, clip_checkpoint: str | None,
         backbone_weights: str | None, class_names: str | None, labels_file: str | None) -> dict[str, Any]:
    """The dotted keys to set for ``profile``, after validating every given path."""
    if root is None or not Path(root).is_dir():
        raise StageError(f"--root: dataset folder not found: {root}")
    changes = dict(PROFILES[profile])
    changes["dataset.root"] = str(root)
    if profile == "custom":
        changes["dataset.class_names"] = _require_file(class_names, "--class-names")
        changes["dataset.labels_file"] = _require_file(labels_file, "--labels-file")
        if class_names is None or labels_file is None:
            raise StageError("custom data needs --class-names and --labels-file")
    for value, key, option in (
        (sam_checkpoint, "sam.checkpoint", "--sam-checkpoint"),
        (clip_checkpoint, "clip.checkpoint", "--clip-checkpoint"),
        (backbone_weights, "segmenter.encoder_weights", "--backbone-weights"),
    ):
        if value is None:
            raise StageError(f"{option} is required: real runs load local weights only (see README)")
        changes[key] = _require_file(value, option)
    return changes


@click.command("configure")
@click.argument("profile", type=click.Choice(sorted(PROFILES)))
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--root", help="Dataset root folder.")
@click.option("--sam-checkpoint", help="SAM ViT-H checkpoint (sam_vit_h_4b8939.pth).")
@click.option("--clip-checkpoint", help="CLIP ViT-B/16 OpenAI weights (open_clip format).")
@click.option("--backbone-weights", help="ResNet-101 ImageNet-1k weights for DeepLabV3+.")
@click.option("--class-names", help="custom: class list file (one name per line).")
@click.option("--labels-file", help="custom: CSV or JSON, image id -> class names.")
@click.option("--dry-run", is_flag=True, help="Print the changes without writing.")
def command(profile, params_path, root, sam_checkpoint, clip_checkpoint, backbone_weights,
            class_names, labels_file, dry_run) -> None:
    """Switch params.yaml to the paper's setup for VOC, COCO or a custom dataset."""
    from ruamel.yaml import YAML

    path = Path(params_path)
    if not path.is_file():
        raise StageError(f"parameter file not found: {path}")
    changes = plan(profile, root, sam_checkpoint, clip_checkpoint, backbone_weights, class_names, labels_file)
    yaml = YAML()
    yaml.preserve_quotes = True
    tree = yaml.load(path.read_text())
    for key, value in changes.items():
        try:
            old = _get(tree, key)
        except (KeyError, TypeError):
            raise StageError(f"{path} has no key {key!r}; is it from another version of the pipeline?")
        if old != value:
            click.echo(f"{key}: {old} -> {value}")
            _set(tree, key, value)
    if dry_run:
        click.echo("(dry run: nothing written)")
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        yaml.dump(tree, f)
    tmp.replace(path)
    if profile == "custom":
        click.echo(f"note: segmenter.iterations is VOC's 80 epochs of 10,582 images at batch 16 "
                   f"({VOC_SEGMENTER_ITERATIONS}); for 80 epochs of N training images set it to ceil(80 * N / 16)")
    click.echo(f"wrote {path}; run `dvc repro` (or `dvc status` to see what reruns)")
