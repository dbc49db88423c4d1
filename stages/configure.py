"""``wsss configure voc|coco|custom``: switch params.yaml from the embedded default to a real setup.

Writes the paper's values (algorithms.md) for the chosen dataset, the dataset root and the model
checkpoints, after checking that every path exists. Comments and layout of params.yaml are kept;
every changed key is printed as ``key: old -> new``. ``git checkout params.yaml`` returns to the
embedded default.
"""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.atomic import atomic_path
from pipeline.config import get_dotted, set_dotted
from pipeline.errors import PipelineError
from pipeline.profiles import (
    EMBEDDED_MODELS, PROFILES, REAL_MODELS, SAM_MODELS, VOC_SEGMENTER_ITERATIONS, plan,
)


#: The word that marks a params.yaml value as the embedded demo's (in its end-of-line comment).
DEMO_MARK = "demo"


def _eol_comment(parent, key) -> str | None:
    token = parent.ca.items.get(key, [None, None, None, None])[2] if hasattr(parent, "ca") else None
    return token.value if token is not None else None


def _mark_configured(parent, key, profile: str) -> None:
    """A comment that called the old value "demo" now says where the new one comes from."""
    old = _eol_comment(parent, key)
    if old is None or DEMO_MARK not in old:
        return
    token = parent.ca.items[key][2]
    parent.yaml_add_eol_comment(f"# wsss configure {profile} (paper's setting)", key,
                                column=token.column)


@click.command("configure")
@click.argument("profile", type=click.Choice(sorted(PROFILES)))
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--root", help="Dataset root folder.")
@click.option("--models", type=click.Choice([REAL_MODELS, EMBEDDED_MODELS]), default=REAL_MODELS, show_default=True,
              help="real: the paper's models from local checkpoints; demo: keep the embedded tiny "
                   "models (offline, minutes) and set only the dataset and its method settings.")
@click.option("--sam-model", type=click.Choice(SAM_MODELS), default="vit_h", show_default=True,
              help="SAM variant of --sam-checkpoint (the paper: vit_h).")
@click.option("--sam-checkpoint", help="SAM checkpoint (sam_vit_h_4b8939.pth for vit_h).")
@click.option("--sam-sha256", help="SHA-256 of your own SAM checkpoint (default: the official file's).")
@click.option("--clip-checkpoint", help="CLIP ViT-B/16 OpenAI weights (open_clip_pytorch_model.bin or ViT-B-16.pt).")
@click.option("--clip-sha256", help="SHA-256 to pin for the CLIP file.")
@click.option("--backbone-weights", help="ResNet-101 ImageNet-1k weights for DeepLabV3+ (resnet101-63fe2227.pth).")
@click.option("--backbone-sha256", help="SHA-256 to pin for the ResNet-101 file.")
@click.option("--class-names", help="custom: class list file (one name per line).")
@click.option("--labels-file", help="custom: CSV or JSON, image id -> class names.")
@click.option("--dry-run", is_flag=True, help="Print the changes without writing.")
def command(profile, params_path, root, models, sam_model, sam_checkpoint, sam_sha256, clip_checkpoint,
            clip_sha256, backbone_weights, backbone_sha256, class_names, labels_file, dry_run) -> None:
    """Switch params.yaml to the paper's setup for VOC, COCO or a custom dataset."""
    from ruamel.yaml import YAML

    path = Path(params_path)
    if not path.is_file():
        raise PipelineError(f"parameter file not found: {path}")
    yaml = YAML()
    yaml.preserve_quotes = True
    tree = yaml.load(path.read_text())
    try:
        current_sam_model = get_dotted(tree, "sam.model")
    except (KeyError, TypeError):
        current_sam_model = None
    changes = plan(profile, root, models, sam_model, sam_checkpoint, clip_checkpoint, backbone_weights,
                   class_names, labels_file, sam_sha256, clip_sha256, backbone_sha256,
                   current_sam_model)
    for key, value in changes.items():
        try:
            old = get_dotted(tree, key)
        except (KeyError, TypeError):
            raise PipelineError(f"{path} has no key {key!r}; is it from another version of the pipeline?")
        if old != value:
            click.echo(f"{key}: {old} -> {value}")
            set_dotted(tree, key, value)
            *parents, last = key.split(".")
            _mark_configured(get_dotted(tree, ".".join(parents)) if parents else tree, last, profile)
    if dry_run:
        click.echo("(dry run: nothing written)")
        return
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.dump(tree, f)
    if models == EMBEDDED_MODELS and "sam.model" in changes and changes["sam.model"] != current_sam_model:
        click.echo(f"note: sam.model {current_sam_model} answers with the demo world's own masks and "
                   f"knows no other images; the random {changes['sam.model']} SAM takes its place "
                   "(its masks check plumbing only)")
    if profile == "custom" and models == REAL_MODELS:
        click.echo(f"note: segmenter.iterations is VOC's 80 epochs of 10,582 images at batch 16 "
                   f"({VOC_SEGMENTER_ITERATIONS}); for 80 epochs of N training images set it to ceil(80 * N / 16)")
    click.echo(f"wrote {path}; run `dvc repro` (or `dvc status` to see what reruns)")
