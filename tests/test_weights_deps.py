"""Weights DVC can see (issue 30, item 4): every checkpoint file a stage loads is a dep of that
stage in dvc.yaml, so a file replaced at the same path reruns exactly the stages that load it;
a model without weights holds the committed placeholder ``pipeline/no_checkpoint.txt`` (DVC
cannot list null), which the library reads exactly as "no checkpoint"."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml
from dvc_project import dvc_env, make_project, ran_stages, sh

from pipeline.config import ConfigError, to_dict
from pipeline.params import NO_CHECKPOINT, ClipConfig, SamConfig, SegmenterConfig, no_checkpoint, section
from pipeline.weights import CheckpointError, sha256sum

REPO = Path(__file__).resolve().parents[1]
KEYS = {"sam": "checkpoint", "clip": "checkpoint", "segmenter": "encoder_weights"}
CONFIGS = {"sam": SamConfig, "clip": ClipConfig, "segmenter": SegmenterConfig}
# Which stage loads which checkpoint file. predict loads the trained segmenter from
# cache/segmenter and reads the stored masks (SAM runs only on `--images`, outside the graph).
LOADS = {
    "sam_masks": "${sam.checkpoint}",
    "clip_features": "${clip.checkpoint}",
    "train_prompts": "${clip.checkpoint}",
    "cams": "${clip.checkpoint}",
    "train_segmenter": "${segmenter.encoder_weights}",
}


def _params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_placeholder_is_no_checkpoint():
    assert (REPO / NO_CHECKPOINT).is_file()
    for same in (NO_CHECKPOINT, f"./{NO_CHECKPOINT}", Path(NO_CHECKPOINT), str(REPO / NO_CHECKPOINT), None):
        assert no_checkpoint(same) is None, same
    for other in ("weights/clip.pt", "no_checkpoint.txt", "pipeline/demo/weights/clip_demo.pt"):
        assert no_checkpoint(other) == other


@pytest.mark.parametrize("name", sorted(KEYS))
def test_placeholder_and_null_give_the_same_config_fingerprint_and_provenance(name):
    """The embedded default's fingerprints cannot change: the placeholder is None before any
    fingerprint or provenance sees it."""
    import stages.sam_masks as sam_masks_stage

    params = _params()
    if name != "sam":  # sam: the embedded default's world-oracle
        params[name]["model"] = "tiny"  # a model without weights
    params[name][KEYS[name]] = NO_CHECKPOINT
    placeholder = section(params, name, CONFIGS[name])
    params[name][KEYS[name]] = None
    null = section(params, name, CONFIGS[name])
    assert getattr(placeholder, KEYS[name]) is None
    assert placeholder == null and to_dict(placeholder) == to_dict(null)
    if name == "sam":
        for cfg in (placeholder, null):
            assert cfg.model == "world-oracle"
        assert sam_masks_stage.store_attrs(placeholder, "fp32", 0) == sam_masks_stage.store_attrs(null, "fp32", 0)
        tiny = [dataclasses.replace(c, model="tiny") for c in (placeholder, null)]
        assert sam_masks_stage.store_attrs(*tiny[:1], "fp32") == sam_masks_stage.store_attrs(*tiny[1:], "fp32")
    if name == "clip":
        assert placeholder.result_identity() == null.result_identity()
    if name == "segmenter":
        assert placeholder.training_fingerprint("d", "fp32", "c") == null.training_fingerprint("d", "fp32", "c")


def test_a_model_that_needs_weights_given_the_placeholder_fails_as_with_null():
    from pipeline.sam.maskers import verify_weights
    from pipeline.segmenter.model import build_segmenter

    errors = {}
    for value in (None, NO_CHECKPOINT):
        with pytest.raises(ConfigError) as clip:
            ClipConfig(model="ViT-B-16", checkpoint=value)
        with pytest.raises(CheckpointError) as sam:
            verify_weights(SamConfig(model="vit_h", checkpoint=value))
        cfg = SegmenterConfig(model="deeplabv3plus_r101", encoder_weights=value)
        with pytest.raises(CheckpointError) as seg:
            build_segmenter(cfg.model, 21, cfg.encoder_weights, cfg.encoder_weights_sha256)
        errors[value] = [str(e.value) for e in (clip, sam, seg)]
    assert errors[None] == errors[NO_CHECKPOINT]
    assert all(len(m.splitlines()) == 1 for m in errors[None])
    assert "clip.checkpoint is null" in errors[None][0]
    assert "'sam.checkpoint'" in errors[None][1] and "'segmenter.encoder_weights'" in errors[None][2]


def test_params_yaml_names_a_file_for_every_checkpoint():
    """DVC fails ("unexpected error") on a null dep: the params file dvc.yaml reads holds paths."""
    params = _params()
    for name, key in KEYS.items():
        value = params[name][key]
        assert value is not None and (REPO / value).is_file(), f"{name}.{key}: {value!r}"
    assert params["sam"]["checkpoint"] == NO_CHECKPOINT  # world-oracle loads no weights


def test_dvc_yaml_lists_the_checkpoints_each_stage_loads_and_no_other():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, spec in stages.items():
        deps = spec.get("do", spec)["deps"]
        listed = [d for d in deps if d in set(LOADS.values())]
        assert listed == ([LOADS[stage]] if stage in LOADS else []), f"{stage}: {listed}"


# -- through DVC ---------------------------------------------------------------------------------

SMALL = {
    "dataset": {"demo": {"n_train": 4, "n_val": 2, "seed": 0}},
    "compute": {"scheduler": "local", "device": "cpu"},
    # the user's own CLIP file at a path of their own: unpinned (its checksum goes to provenance)
    "clip": {"checkpoint": "weights/clip.pt", "checkpoint_sha256": None},
    "clip_features": {"n_views": 2},
    "prompts": {"cls": {"iterations": 3, "warmup_iterations": 1, "batch_size": 4, "checkpoint_every": 2}},
}
CLIP_STAGES = {"clip_features", "train_prompts@cls", "cams@cls"}


def _other_weights(src: Path, dst: Path, seed: int) -> None:
    """Weights of the same architecture, other values, saved in the same format (a state dict of
    the same keys and dtypes), written over ``dst`` (replaced, not edited in place)."""
    import torch

    state = torch.load(src, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(seed)
    other = {k: (v + 0.01 * torch.randn(v.shape, generator=gen).to(v.dtype)) if v.is_floating_point() else v
             for k, v in state.items()}
    tmp = dst.with_suffix(".tmp")
    torch.save(other, tmp)
    os.replace(tmp, dst)


def _set(repo: Path, name: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[name][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_a_replaced_clip_checkpoint_reruns_the_stages_that_load_it(tmp_path):
    env = dvc_env(tmp_path / "home")
    repo = tmp_path / "repo"
    make_project(repo, env, SMALL, stages=("prepare", "clip_features", "train_prompts", "cams"))
    weights = repo / "weights" / "clip.pt"
    weights.parent.mkdir()
    weights.write_bytes((REPO / "pipeline" / "demo" / "weights" / "clip_demo.pt").read_bytes())
    out = sh("dvc", "repro", "cams@cls", cwd=repo, env=env)
    assert ran_stages(out) == {"prepare", *CLIP_STAGES}, out
    assert "up to date" in sh("dvc", "status", "--with-deps", "cams@cls", cwd=repo, env=env)

    # other weights at the same path: exactly the stages that load them are changed, and rerun
    _other_weights(weights, weights, seed=1)
    status = sh("dvc", "status", "--with-deps", "cams@cls", cwd=repo, env=env)
    changed = {line.rstrip(":") for line in status.splitlines() if line and not line[0].isspace()}
    assert changed == CLIP_STAGES, status
    assert "modified:           weights/clip.pt" in status
    out = sh("dvc", "repro", "cams@cls", cwd=repo, env=env)
    assert ran_stages(out) == CLIP_STAGES, out
    assert "clip_features: 4 images computed, 0 resumed" in out, out  # new weights, new fingerprint
    assert "up to date" in sh("dvc", "status", "--with-deps", "cams@cls", cwd=repo, env=env)

    # pinned, then replaced: the stage that loads it stops in one line naming the file and the key
    _set(repo, "clip", "checkpoint_sha256", sha256sum(weights))
    _other_weights(weights, weights, seed=2)
    out = sh("dvc", "repro", "cams@cls", cwd=repo, env=env, check=False)
    assert "failed to reproduce 'clip_features'" in out, out
    lines = [line for line in out.splitlines() if "weights/clip.pt" in line]
    assert len(lines) == 1 and "clip.checkpoint_sha256" in lines[0], out
    assert ran_stages(out) == {"clip_features"}, out
