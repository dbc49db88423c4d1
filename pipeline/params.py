"""The params schema: one typed config per section of ``params.yaml`` (and its sub-sections).

Every stage reads its sections through :func:`section`, which validates them once and names the
offending key in its error. The top-level sections are the fields of :class:`Params`, so the list
of known sections cannot drift from the schema. Library users build these configs directly
(``SeedsConfig(coarse=SeedVariant(0.6), fine=SeedVariant(0.7), cam_bg_powers=(1.0,))``); nothing
here reads a file.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, TypeVar

from pipeline.clip.pretrained import CLIP_SOURCE
from pipeline.config import ConfigError, from_mapping, param, to_dict
from pipeline.precision import PRECISIONS
from pipeline.provenance import fingerprint

T = TypeVar("T")

#: The committed placeholder a checkpoint param holds for a model without weights (sam.model
#: tiny or world-oracle, clip.model tiny, segmenter.model tiny). dvc.yaml lists each checkpoint a
#: stage loads as a dep (``${clip.checkpoint}``), and DVC cannot list null; the configs read
#: the placeholder as None (:func:`no_checkpoint`), so it enters no fingerprint or provenance.
NO_CHECKPOINT = "pipeline/no_checkpoint.txt"


def no_checkpoint(path: str | os.PathLike | None) -> str | os.PathLike | None:
    """``path``, or None when it is null or :data:`NO_CHECKPOINT` (relative, as params.yaml holds
    it, or any absolute path ending in it: no file is read)."""
    if path is None:
        return None
    norm = os.path.normpath(os.fspath(path))
    if norm == NO_CHECKPOINT or (os.path.isabs(norm) and norm.endswith(os.sep + NO_CHECKPOINT)):
        return None
    return path


# sam: params that choose the model rather than configure the generator.
_SAM_MODEL_KEYS = ("model", "checkpoint", "checkpoint_sha256", "mask_threshold")


def sam_generator_names() -> tuple[str, ...]:
    # the registry (plain data): validating a name must not import the generators
    from pipeline.sam.generators import generator_names

    return generator_names()


def dataset_names() -> tuple[str, ...]:
    # the registry (plain data): validating a name must not import the index builders
    from pipeline.data.registry import source_names

    return source_names()


def _one_of(names, first: str) -> str:
    """``a, b, c or d``, ``first`` (the default) leading."""
    ordered = [first, *(n for n in names if n != first)]
    return ", ".join(ordered[:-1]) + " or " + ordered[-1]


def segmenter_archs() -> dict:
    # the registry (plain data): validating a name must not import the networks
    from pipeline.segmenter.archs import registered_archs

    return registered_archs()


@dataclass(frozen=True)
class DemoConfig:
    n_train: int = param(32, ge=1)
    n_val: int = param(24, ge=1)
    seed: int = 0


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "demo"
    """demo | voc | coco | custom"""
    root: str = "pipeline/data"
    train_split: str = "train"
    eval_split: str = "val"
    on_bad_image: str = "fail"
    """fail: stop with the id and path; skip: record the image as skipped and go on."""
    class_names: str | None = None
    labels_file: str | None = None
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self):
        names = dataset_names()
        if self.name not in names:
            raise ConfigError(f"dataset.name must be {_one_of(names, DatasetConfig.name)}, "
                              f"got {self.name!r}")
        if self.on_bad_image not in ("fail", "skip"):
            raise ConfigError(f"dataset.on_bad_image must be fail or skip, got {self.on_bad_image!r}")


@dataclass(frozen=True)
class ComputeConfig:
    scheduler: str = "local"
    """``local`` (this process), ``local-cluster`` (dask LocalCluster), or a scheduler address."""
    workers: int | None = param(None, ge=1)
    """Worker processes for ``local-cluster``; None: one per visible GPU when ``device`` is CUDA,
    else 2."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""
    precision: str = "fp32"
    """``fp32`` (reference) or ``bf16`` (autocast of the network forward passes and of prompt
    training; meant for CUDA, refused on a CUDA device without bfloat16 support; no GradScaler).
    The reference's fp16 AMP of prompt training is ``prompts.<which>.amp`` (with fp32 here).
    Unlike the rest of ``compute``, it changes results, so it is a DVC param of the stages that
    run networks and part of their fingerprints."""

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"compute.precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")


@dataclass(frozen=True)
class SamConfig:
    """Section ``sam`` of params.yaml (algorithms.md §1); generator settings map 1:1."""

    model: str = "vit_h"
    """vit_h | vit_l | vit_b | demo (trained on the demo world) | tiny (random weights, offline
    demo) | world-oracle (the demo world's own masks, a stand-in for a trained demo SAM)."""
    checkpoint: str | None = None
    """Path of the official checkpoint (ignored by tiny and world-oracle); null or
    :data:`NO_CHECKPOINT`: none (read as None)."""
    checkpoint_sha256: str | None = None
    """Expected SHA-256; None: the published checksum of the official file."""
    points_per_side: int = param(32, ge=1)
    points_per_batch: int = param(256, ge=1)
    pred_iou_thresh: float = param(0.86, ge=0)
    stability_score_thresh: float = param(0.92, ge=0, le=1)
    stability_score_offset: float = param(1.0, ge=0)
    mask_threshold: float = 0.0
    """Logit threshold that binarises SAM's masks."""
    box_nms_thresh: float = param(0.7, gt=0, le=1)
    crop_n_layers: int = param(1, ge=0)
    crop_nms_thresh: float = param(0.7, gt=0, le=1)
    crop_overlap_ratio: float = param(512 / 1500, ge=0, lt=1)
    crop_n_points_downscale_factor: int = param(2, ge=1)
    min_mask_region_area: int = param(100, ge=0)
    score_thresh_offset: tuple[float, float, float] = (0.0, 0.0, 0.1)
    score_nms_offset: tuple[float, float, float] = (0.0, 0.0, 1.0)
    stability_score_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    occupation_thresh: float = param(0.3, ge=0, le=1)
    max_batch_memory_mb: int | Literal["auto"] | None = param("auto", ge=1)
    """Working memory (MiB) of one prompt batch through SAM's mask decoder: the batch is the
    largest that fits, at most points_per_batch. ``auto`` (or empty): half the free memory of a
    CUDA device, measured per crop after the image encoder, else 1024 MiB. Results do not
    depend on it (not in the store fingerprint, not a DVC param of the stage); peak memory and
    speed do."""

    def __post_init__(self):
        object.__setattr__(self, "checkpoint", no_checkpoint(self.checkpoint))
        names = sam_generator_names()
        if self.model not in names:
            raise ConfigError(f"sam.model must be one of {', '.join(names)}, got {self.model!r}")

    def generator_settings(self) -> dict:
        return {k: v for k, v in to_dict(self).items() if k not in _SAM_MODEL_KEYS}


@dataclass(frozen=True)
class ClipConfig:
    """Section ``clip`` of params.yaml: the frozen CLIP model (algorithms.md §2)."""

    model: str = "ViT-B-16"
    """open_clip architecture (``ViT-B-16`` in the paper) or ``tiny`` (random, embedded default)."""
    checkpoint: str | None = None
    """Local file with the OpenAI weights for ``model`` (verified by SHA-256 when pinned); null or
    :data:`NO_CHECKPOINT`: none (read as None)."""
    checkpoint_sha256: str | None = None
    """Expected SHA-256 of ``checkpoint``; null: not pinned."""
    pretrained_tag: str | None = None
    """Instead of a file, an open_clip pretrained tag (``openai``); open_clip may download it,
    so only set it where downloads are allowed."""
    seed: int = 0
    """Seed of the random initialisation (tiny model)."""
    attention_blocks: int = param(8, ge=1)
    """How many final blocks the CAA attention is averaged over (8 in the paper)."""
    max_side: int | None = param(512, ge=16)
    """Inference images whose long side exceeds this are scaled down to it before CLIP (then
    each side up to a multiple of 16); CAMs are mapped back to the original size downstream.
    Not in the reference (which ran VOC at native size, long side <= 500: unaffected by 512);
    memory and the cache grow with the square of the pixel count without it. null: native."""

    def __post_init__(self):
        object.__setattr__(self, "checkpoint", no_checkpoint(self.checkpoint))
        if self.model != "tiny" and self.checkpoint is None and self.pretrained_tag is None:
            raise ConfigError(
                f"clip.checkpoint is null (or {NO_CHECKPOINT}: no weights) for clip.model "
                f"{self.model!r}; set it to the "
                f"OpenAI weights file (get it from {CLIP_SOURCE}) or use clip.model: tiny"
            )

    def result_identity(self) -> dict:
        """What results depend on, for fingerprints: everything but the checkpoint's location
        (its checksum is fingerprinted separately; teammates keep weights in different places)."""
        return {k: v for k, v in to_dict(self).items() if k != "checkpoint"}

    def model_identity(self) -> dict:
        """The model alone (not the inference settings): what prompt training depends on."""
        return {k: v for k, v in self.result_identity().items()
                if k not in ("attention_blocks", "max_side")}


@dataclass(frozen=True)
class AugmentConfig:
    """§7 augmentation of a training view (``pipeline.prompts.augment.sample_view`` arguments)."""

    long_side_range: tuple[int, int] = param((288, 480), ge=1)
    """Random long side (VOC 288–480, COCO 318–530)."""
    crop: int = param(224, ge=16)
    """Side of the square crop; a multiple of the patch size (16), so the view is a token grid."""
    flip_p: float = param(0.5, ge=0, le=1)
    jitter_p: float = param(0.5, ge=0, le=1)
    brightness: float = param(25.0, ge=0)
    contrast: tuple[float, float] = param((0.6, 1.4), ge=0)
    saturation: tuple[float, float] = param((0.5, 1.5), ge=0)
    hue: float = param(25.0, ge=0)
    """Max |hue offset| on OpenCV's 0–255 (HSV_FULL) hue scale."""

    def __post_init__(self):
        if self.crop % 16:
            raise ConfigError(f"clip_features.augment.crop must be a multiple of the "
                             f"patch size 16, got {self.crop}")


@dataclass(frozen=True)
class ClipFeaturesConfig:
    """Section ``clip_features`` of params.yaml."""

    n_views: int = 16
    """Augmented views cached per train image. The authors drew a fresh view every step
    (cls: 1,800 × 16 ≈ 2.7 views per VOC image, seg: 17,000 × 16 ≈ 26); K views make the cached
    path sample from K per image."""
    seed: int = 0
    """Seed of the view sampling (combined with each image id)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class PromptsConfig:
    """Section ``prompts.cls`` / ``prompts.seg`` of params.yaml (§2 prompt layout, §7 recipe)."""

    n_ctx: int = param(16, ge=1)
    """Learned context tokens per prompt."""
    shared_context: bool = True
    """One context for all prompts (cls; COCO seg) or one per prompt (VOC seg)."""
    class_position: Literal["end", "front"] = "end"
    """Class name after the context (cls) or before it (VOC seg)."""
    background: Literal["names", "empty"] = "names"
    """Background prompts with the real names, or context + "." only (VOC seg)."""
    init_std: float = param(0.015, ge=0)
    """Std of the context initialisation (cls 0.015, VOC seg 0.0125)."""
    init: str = "random"
    """``random``: N(0, init_std²) contexts (the reference). A phrase (``"a photo of a"``): its
    word embeddings fill the context positions next to the class name, the rest stays random
    (CoOp's initialisation from words; not in the paper). seg only, ``cls``: the trained
    classification context (a warm start, not in the paper; needs the cls prompts' layout:
    shared context, class at the end, the same background names, as COCO's seg prompts have)."""
    iterations: int = param(1800, ge=1)
    """Optimizer steps, one per iteration (VOC cls 1,800, seg 17,000; COCO 20,500 / 75,000)."""
    warmup_iterations: int = param(500, ge=0)
    """Iterations at the constant ``warmup_lr`` before the cosine schedule."""
    warmup_lr: float = param(1e-5, ge=0)
    lr: float = param(1e-3, gt=0)
    momentum: float = param(0.9, ge=0)
    weight_decay: float = param(5e-4, ge=0)
    batch_size: int = param(16, ge=1)
    """Samples per optimizer step (16: the effective batch of every reference run)."""
    sub_batches: int = param(1, ge=1)
    """Pieces each batch is split into, for memory; their gradients are accumulated into one
    step and equal the full-batch gradient (COCO: cls 4, seg 8, as the reference splits)."""
    cam_iteration: int | None = param(None, ge=1)
    """Also keep the context after this iteration; ``cams`` uses it instead of the final one
    (COCO: cls 6,150 of 20,500, seg 45,000 of 75,000; VOC: null = final). Training still runs
    to ``iterations`` (the cosine schedule depends on it)."""
    loss_classes: Literal["crop", "image"] = "crop"
    """seg only: the classes L_CAL explains per view: present in the augmented seed crop (VOC,
    the reference default) or the image-level labels (COCO)."""
    truncate_text: bool = False
    """Run the text encoder only up to the last EOS while training (exact in mathematics, ~1e-6
    relative rounding; see pipeline.prompts.learner). False: all 77 positions, the reference.
    CAMs always use all 77 positions."""
    path: Literal["cached", "exact"] = "cached"
    """cached: last block on cached views; exact: full encoder, fresh views each step."""
    amp: bool = False
    """The reference's mixed precision on CUDA: fp16 autocast with a GradScaler (precision
    ``fp16-amp``). False: ``compute.precision`` decides (fp32, or bf16 autocast, which needs no
    scaler). Only with ``compute.precision: fp32``; a CPU run ignores it (fp32), with a log line."""
    checkpoint_every: int = param(500, ge=1)
    """Iterations between resumable checkpoints."""
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.init, str) or not self.init.strip():
            raise ConfigError("prompts.*.init must be random, cls (seg only) or a phrase such as "
                              "'a photo of a'")
        if self.warmup_iterations > self.iterations:
            raise ConfigError("prompts.*.warmup_iterations must be in [0, iterations]")
        if self.sub_batches > self.batch_size:
            raise ConfigError(f"prompts.*.sub_batches ({self.sub_batches}) must be <= "
                             f"batch_size ({self.batch_size})")
        if self.cam_iteration is not None and self.cam_iteration > self.iterations:
            raise ConfigError(f"prompts.*.cam_iteration ({self.cam_iteration}) must be "
                             f"<= iterations ({self.iterations}) or null")


@dataclass(frozen=True)
class CaaConfig:
    """Class-aware attention affinity (§4) settings of one CAM set."""

    enabled: bool = True
    """COCO segmentation CAMs run without CAA."""
    n_sinkhorn: int = param(1, ge=0)
    """Alternating column/row normalisations of the attention (CLIP-ES: 3)."""
    n_power: int = param(2, ge=0)
    """Matrix power of the symmetrised affinity."""
    t_box: float = param(0.4, ge=0, le=1)
    """Box threshold as a fraction of the 8-bit score maximum (VOC cls 0.4, seg 0.5, COCO cls 0.6)."""
    propagate: Literal["score", "cam"] = "score"
    """Propagate the min–max score (VOC cls) or the raw CAM (VOC seg, COCO cls)."""


@dataclass(frozen=True)
class CamsConfig:
    """Section ``cams.cls`` / ``cams.seg`` of params.yaml."""

    caa: CaaConfig = field(default_factory=CaaConfig)


@dataclass(frozen=True)
class SeedVariant:
    """One seed set (``seeds.coarse`` or ``seeds.fine``)."""

    alpha: float = param(gt=0)
    """Background exponent of ``(1 - max score) ** alpha`` (§5). Paper runs: VOC coarse 0.6,
    VOC fine 0.7 (the paper's text says 0.6), COCO coarse 0.3-0.5, COCO fine 1.0."""


@dataclass(frozen=True)
class SeedsConfig:
    """Section ``seeds`` of params.yaml."""

    coarse: SeedVariant
    fine: SeedVariant
    cam_bg_powers: tuple[float, ...] = param(gt=0)
    """Background powers p of ``(1 - max score) ** p`` tried when scoring the CAMs (§8)."""
    fallback_thresh: float = param(0.5, ge=0, le=1)
    """Images without quasi-superpixels: background where the best CAM score is below this.
    Not in the reference (which paints nothing there); a project deviation."""


@dataclass(frozen=True)
class SegmenterConfig:
    model: str = "tiny"
    """``deeplabv3plus_r101`` (paper), ``tiny`` (DeepLabV3+ ResNet-18, random init) or
    ``demo_clip_vit`` (embedded default: the demo CLIP's vision tower and a small head)."""
    encoder_weights: str | None = None
    """Path of the pretrained encoder: the ImageNet ResNet-101 state dict (required for
    deeplabv3plus_r101) or the demo CLIP file (required for demo_clip_vit); null or
    :data:`NO_CHECKPOINT`: none (read as None)."""
    encoder_weights_sha256: str | None = None
    """Expected SHA-256 of ``encoder_weights`` (null: not checked)."""
    output_stride: Literal[8, 16] = 8
    """Encoder output stride (§9 ``d3p-r1d8``: 8; 16 is cheaper, about 1.7x on the tiny model;
    demo_clip_vit, a ViT with patch 16: 16 only)."""
    iterations: int = param(60, ge=1)
    """Optimizer steps (§9 VOC: 80 epochs of train_aug at batch 16 = 52,910)."""
    batch_size: int = param(4, ge=1)
    """Samples per optimizer step (§9: 16)."""
    sub_batches: int = param(1, ge=1)
    """Split each batch into this many forward/backward passes before the one step (gradient
    accumulation; same effective batch, about 1/sub_batches of the activation memory). Not the
    reference when > 1: BatchNorm normalises each sub-batch on its own statistics."""
    lr: float = param(0.01, gt=0)
    momentum: float = param(0.9, ge=0, lt=1)
    weight_decay: float = param(5e-4, ge=0)
    poly_power: float = param(0.9, ge=0)
    crop_size: int = param(512, ge=16)
    scale_range: tuple[float, float] = param((0.5, 2.0), gt=0)
    flip_prob: float = param(0.5, ge=0, le=1)
    val_every: int = param(20, ge=0)
    """Evaluate on the eval split every this many iterations (0: only at the end); the
    evaluated iterations are the candidates for the best checkpoint."""
    checkpoint_every: int = param(20, ge=1)
    """Save a resumable checkpoint every this many iterations."""
    seed: int = 0
    loader_workers: int = param(2, ge=0)
    """DataLoader worker processes that decode and augment batches (0: in the training loop's
    thread). Results do not depend on it, so it is not part of the training fingerprint."""

    def __post_init__(self):
        object.__setattr__(self, "encoder_weights", no_checkpoint(self.encoder_weights))
        ARCHS = segmenter_archs()
        if self.model not in ARCHS:
            raise ConfigError(f"segmenter.model must be one of {sorted(ARCHS)}, got {self.model!r}")
        strides = ARCHS[self.model].output_strides
        if self.output_stride not in strides:
            raise ConfigError(f"segmenter.output_stride of {self.model} must be "
                             f"{' or '.join(map(str, strides))}, got {self.output_stride}")
        # BatchNorm in the ASPP image-pooling branch sees one value per channel per image, so
        # every forward pass needs at least 2 images.
        if self.batch_size < 2:
            raise ConfigError(f"segmenter.batch_size must be at least 2, got {self.batch_size}")
        if self.sub_batches < 1 or self.batch_size % self.sub_batches or self.batch_size // self.sub_batches < 2:
            raise ConfigError(
                f"segmenter.sub_batches must divide segmenter.batch_size ({self.batch_size}) "
                f"into sub-batches of at least 2 images, got {self.sub_batches}"
            )
        for key in ("iterations", "crop_size", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"segmenter.{key} must be positive, got {getattr(self, key)}")
        if self.val_every < 0:
            raise ConfigError(f"segmenter.val_every must be >= 0, got {self.val_every}")

    def training_fingerprint(self, data_digest: str, precision: str, code: str) -> str:
        """What the trained weights and the choice of the best depend on: every key but the
        checkpoint cadence (``val_every`` decides which iterations are best candidates) and the
        loader's worker count, the data (train seeds and val ground truth),
        ``compute.precision`` and the code (``code``: :func:`pipeline.provenance.code_digest` of the
        modules that train)."""
        relevant = {k: v for k, v in self.__dict__.items() if k not in ("checkpoint_every", "loader_workers")}
        return fingerprint(relevant, data_digest, {"precision": precision}, code)


@dataclass(frozen=True)
class PredictConfig:
    checkpoint: Literal["best", "last"] = "best"
    """Which trained segmenter: ``best`` (highest single-scale val mIoU during training, §9) or
    ``last`` (the final iteration). Note that §9's best is chosen on the split it is scored on."""
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    """Multi-scale inference factors (§9)."""
    flip: bool = True
    """Also average horizontally flipped views."""
    postprocess: bool = True
    """Apply SAMS post-processing (§5) to the prediction."""
    alpha: float = param(3.0, gt=0)
    """Background exponent of the post-processing (§9: swept 1-5 on val, 3 used for test)."""
    alpha_sweep: list[float] = param([], gt=0)
    """Extra alphas evaluated in the metrics (empty: none)."""

    def __post_init__(self):
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(
                f"predict.scales must be a non-empty list of positive factors, got {self.scales}"
            )


@dataclass(frozen=True)
class Params:
    """The whole of ``params.yaml``: its top-level sections, in file order."""

    dataset: DatasetConfig
    compute: ComputeConfig
    sam: SamConfig
    clip: ClipConfig
    clip_features: ClipFeaturesConfig
    prompts: dict
    """``prompts.cls`` and ``prompts.seg``: :class:`PromptsConfig` each."""
    cams: dict
    """``cams.cls`` and ``cams.seg``: :class:`CamsConfig` each."""
    seeds: SeedsConfig
    segmenter: SegmenterConfig
    predict: PredictConfig


SECTIONS = tuple(f.name for f in dataclasses.fields(Params))
"""The top-level sections of params.yaml; anything else is a typo and stops every stage."""


def check_sections(params: Mapping[str, Any], source: str = "params.yaml") -> None:
    """Stop on a top-level section the schema does not know (a typo would otherwise be ignored)."""
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")


def section(params: Mapping[str, Any], key: str, cls: type[T]) -> T:
    """The typed config of dotted section ``key`` (e.g. ``seeds.fine``); errors name the key."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"missing parameter section {key!r} in params.yaml")
        node = node[part]
    try:
        return from_mapping(cls, node, key)
    except ConfigError as exc:
        raise ConfigError(f"params.yaml: {exc}") from exc
