"""The paper's setups per dataset (algorithms.md §1-§9): what ``wsss configure voc|coco|custom``
writes into params.yaml, as dotted keys and values.

:data:`METHOD` is what the method does differently per dataset, :data:`SCALE` the paper's models
and run lengths; :func:`plan` validates the user's paths and returns the keys to set.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.sam.generators import generator_names, sam_generator


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

# VOC's segmentation prompts (§2): class-specific context, the class name first, context-only
# background prompts (the embedded demo uses COCO's form, which its tiny CLIP reads better).
_VOC_SEG_PROMPTS = {
    "prompts.seg.shared_context": False,
    "prompts.seg.class_position": "front",
    "prompts.seg.background": "empty",
    "prompts.seg.init_std": 0.0125,
    "prompts.seg.init": "random",
}

# What the method does differently per dataset (algorithms.md §2, §4, §5, §7): written whatever
# models run, so `--models demo` tries the dataset's recipe with the embedded tiny models.
METHOD: dict[str, dict[str, Any]] = {
    "voc": {
        "dataset.name": "voc",
        "dataset.train_split": "train_aug",
        "dataset.eval_split": "val",
        "seeds.coarse.alpha": 0.6,
        "seeds.fine.alpha": 0.7,
        "cams.cls.caa.enabled": True,
        "cams.cls.caa.t_box": 0.4,
        "cams.cls.caa.propagate": "score",
        "cams.seg.caa.enabled": True,
        "cams.seg.caa.t_box": 0.5,
        "cams.seg.caa.propagate": "cam",
        **_VOC_SEG_PROMPTS,
    },
    "coco": {
        "dataset.name": "coco",
        "dataset.train_split": "train",
        "dataset.eval_split": "val",
        "clip_features.augment.long_side_range": [318, 530],
        "prompts.seg.loss_classes": "image",
        # COCO uses the classification-style prompts for both sets (§2).
        "prompts.seg.shared_context": True,
        "prompts.seg.class_position": "end",
        "prompts.seg.background": "names",
        "prompts.seg.init_std": 0.015,
        "prompts.seg.init": "random",
        "cams.cls.caa.enabled": True,
        "cams.cls.caa.t_box": 0.6,
        "cams.cls.caa.propagate": "cam",
        "cams.seg.caa.enabled": False,
        # §5: COCO coarse alpha is chosen in 0.3-0.5 on train ground truth; 0.4 is the middle.
        "seeds.coarse.alpha": 0.4,
        "seeds.fine.alpha": 1.0,
    },
    # Own data: the VOC recipe (CAA on, VOC's segmentation prompts).
    "custom": {
        "dataset.name": "custom",
        "cams.cls.caa.enabled": True,
        "cams.seg.caa.enabled": True,
        **_VOC_SEG_PROMPTS,
    },
}

# The paper's models and run lengths (§1, §7, §9): written with `--models real` (the default).
REAL_SCALE = {
    "compute.device": "auto",
    "sam.model": "vit_h",
    "sam.points_per_side": 32,
    "sam.pred_iou_thresh": 0.86,
    "sam.stability_score_thresh": 0.92,
    "clip.model": "ViT-B-16",
    "clip.attention_blocks": 8,
    # the reference ran CLIP inference at native size (VOC: long side <= 500)
    "clip.max_side": None,
    # the paper's context: 16 vectors from a random start (params.yaml may start from words,
    # prompts.cls.init: "a photo of a"; docs/demo.md has what that does on the demo)
    "prompts.cls.n_ctx": 16,
    "prompts.seg.n_ctx": 16,
    "prompts.cls.init": "random",
    "prompts.cls.lr": 1e-3,
    "prompts.seg.lr": 1e-3,
    "prompts.cls.iterations": 1800,
    "prompts.seg.iterations": 17000,
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

SCALE: dict[str, dict[str, Any]] = {
    "voc": dict(REAL_SCALE),
    "coco": {
        **REAL_SCALE,
        "prompts.cls.iterations": 20500,
        "prompts.cls.warmup_iterations": 1000,
        # 16 samples per step, split for memory as the reference did (§7)
        "prompts.cls.sub_batches": 4,
        "prompts.seg.iterations": 75000,
        "prompts.seg.warmup_iterations": 1000,
        "prompts.seg.sub_batches": 8,
        # the authors' COCO CAMs come from intermediate checkpoints of these schedules (§7)
        "prompts.cls.cam_iteration": 6150,
        "prompts.seg.cam_iteration": 45000,
        "segmenter.iterations": COCO_SEGMENTER_ITERATIONS,
        # val2014 has 40,504 images: a single-scale pass every 10k iterations (10 candidates).
        "segmenter.val_every": 10000,
    },
    # segmenter.iterations: the VOC schedule (80 epochs of 10,582 images); the command says how to
    # scale it to the user's image count.
    "custom": dict(REAL_SCALE),
}

PROFILES: dict[str, dict[str, Any]] = {p: {**METHOD[p], **SCALE[p]} for p in METHOD}
"""Everything `configure <profile>` writes with the paper's models."""

SAM_MODELS = ("vit_h", "vit_l", "vit_b")

#: ``--models`` choices: the paper's models from local checkpoints, or the embedded ones.
REAL_MODELS, EMBEDDED_MODELS = "real", "demo"

#: ``--models demo`` keeps the embedded models, but ``sam.model: world-oracle`` is no model: it
#: answers with the demo world's own masks and knows no other images. The random tiny SAM (with
#: the thresholds its meaningless predicted IoUs need) takes its place on real data.
OFF_WORLD_SAM: dict[str, Any] = {
    "sam.model": "tiny", "sam.pred_iou_thresh": 0.0, "sam.stability_score_thresh": 0.0,
}


def _require_file(path: str | None, option: str) -> str | None:
    if path is not None and not Path(path).is_file():
        raise PipelineError(f"{option}: file not found: {path}")
    return path


def _sha256(value: str | None, option: str) -> str | None:
    if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
        raise PipelineError(f"{option}: a SHA-256 is 64 hex digits, got {value!r}")
    return value.lower() if value else None


def plan(profile: str, root: str | None, models: str = "real", sam_model: str = "vit_h",
         sam_checkpoint: str | None = None, clip_checkpoint: str | None = None,
         backbone_weights: str | None = None, class_names: str | None = None,
         labels_file: str | None = None, sam_sha256: str | None = None,
         clip_sha256: str | None = None, backbone_sha256: str | None = None,
         current_sam_model: str | None = None) -> dict[str, Any]:
    """The dotted keys to set for ``profile``, after validating every given path.

    ``models``: ``real`` (the paper's models, local checkpoints required) or ``demo`` (keep the
    embedded trained tiny models and the demo's run lengths; only the dataset and the dataset's
    method settings change: try one's own data offline first). ``current_sam_model``: the
    params' ``sam.model`` now (``--models demo`` replaces the demo world's oracle).
    """
    if root is None or not Path(root).is_dir():
        raise PipelineError(f"--root: dataset folder not found: {root}")
    changes = dict(METHOD[profile]) if models == EMBEDDED_MODELS else dict(PROFILES[profile])
    changes["dataset.root"] = str(root)
    if profile == "custom":
        if class_names is None or labels_file is None:
            raise PipelineError("custom data needs --class-names and --labels-file")
        changes["dataset.class_names"] = _require_file(class_names, "--class-names")
        changes["dataset.labels_file"] = _require_file(labels_file, "--labels-file")
    if models == EMBEDDED_MODELS:
        given = [o for o, v in (("--sam-checkpoint", sam_checkpoint), ("--clip-checkpoint", clip_checkpoint),
                                ("--backbone-weights", backbone_weights)) if v is not None]
        if given:
            raise PipelineError(f"{given[0]} is for --models real; --models demo keeps the embedded models")
        # A generator that knows one dataset only (the demo world's oracle) cannot segment this one.
        if current_sam_model in generator_names() and \
                sam_generator(current_sam_model).dataset not in (None, changes["dataset.name"]):
            changes.update(OFF_WORLD_SAM)
        return changes
    changes["sam.model"] = sam_model
    for value, key, option in (
        (sam_checkpoint, "sam.checkpoint", "--sam-checkpoint"),
        (clip_checkpoint, "clip.checkpoint", "--clip-checkpoint"),
        (backbone_weights, "segmenter.encoder_weights", "--backbone-weights"),
    ):
        if value is None:
            raise PipelineError(f"{option} is required with --models real: runs load local weights only "
                             "(see README, or --models demo to try the embedded models)")
        changes[key] = _require_file(value, option)
    # Empty: the published checksum of the official file (SAM), or the file's name rule / its
    # checksum recorded in provenance (CLIP, ResNet-101); set for one's own checkpoints.
    changes["sam.checkpoint_sha256"] = _sha256(sam_sha256, "--sam-sha256")
    changes["clip.checkpoint_sha256"] = _sha256(clip_sha256, "--clip-sha256")
    changes["segmenter.encoder_weights_sha256"] = _sha256(backbone_sha256, "--backbone-sha256")
    return changes
