import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages.cli import main
from pipeline.profiles import PROFILES

REPO = Path(__file__).resolve().parents[1]


def _get(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_key_exists_in_params(profile):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key in PROFILES[profile]:
        _get(params, key)  # KeyError names the stale key


def _files(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    root.mkdir(parents=True)
    paths = {}
    for name in ("sam_vit_h_4b8939.pth", "clip.bin", "resnet101.pth", "classes.txt", "labels.csv"):
        (tmp_path / name).write_bytes(b"x")
        paths[name] = str(tmp_path / name)
    return root, paths


def test_configure_voc_rewrites_params_keeping_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    root, p = _files(tmp_path)
    result = CliRunner().invoke(main, [
        "configure", "voc", "--params", str(params), "--root", str(root),
        "--sam-checkpoint", p["sam_vit_h_4b8939.pth"], "--clip-checkpoint", p["clip.bin"],
        "--backbone-weights", p["resnet101.pth"]])
    assert result.exit_code == 0, result.output
    assert "sam.model: world-oracle -> vit_h" in result.output
    assert "dataset.name: demo -> voc" in result.output
    text = params.read_text()
    assert "# Every hyper-parameter of the pipeline." in text  # comments kept
    tree = yaml.safe_load(text)
    assert tree["dataset"]["root"] == str(root) and tree["dataset"]["train_split"] == "train_aug"
    assert tree["sam"]["checkpoint"] == p["sam_vit_h_4b8939.pth"]
    assert tree["sam"]["pred_iou_thresh"] == 0.86 and tree["sam"]["stability_score_thresh"] == 0.92
    assert tree["prompts"]["cls"]["iterations"] == 1800 and tree["prompts"]["seg"]["iterations"] == 17000
    assert tree["seeds"]["fine"]["alpha"] == 0.7
    # §9: DeepLabV3+ R101 at output stride 8, 80 epochs of train_aug (10,582 images) at batch 16,
    # 512 crops, the best checkpoint on val, alpha 3 with the 1-5 sweep in the metrics.
    seg = tree["segmenter"]
    assert (seg["model"], seg["output_stride"], seg["batch_size"], seg["crop_size"]) == ("deeplabv3plus_r101", 8, 16, 512)
    assert seg["iterations"] == 52910 == 80 * 10582 // 16 and seg["sub_batches"] == 1
    assert seg["encoder_weights"] == p["resnet101.pth"]
    assert tree["predict"]["checkpoint"] == "best" and tree["predict"]["alpha"] == 3
    assert tree["predict"]["alpha_sweep"] == [1, 2, 3, 4, 5]
    assert "segmenter.iterations: 300 -> 52910" in result.output
    assert "segmenter.model: demo_clip_vit -> deeplabv3plus_r101" in result.output
    assert seg["encoder_weights_sha256"] is None  # the demo CLIP's pin does not follow the ResNet
    assert tree["prompts"]["seg"]["init"] == "random"  # the paper's initialisation
    assert tree["prompts"]["cls"]["init"] == "random"  # whatever the demo starts from
    assert tree["prompts"]["cls"]["n_ctx"] == tree["prompts"]["seg"]["n_ctx"] == 16
    # the demo's point grid gets the paper's; untouched keys stay as they were
    original = yaml.safe_load((REPO / "params.yaml").read_text())
    assert tree["sam"]["points_per_side"] == 32
    assert tree["sam"]["points_per_batch"] == original["sam"]["points_per_batch"]


def test_configure_coco_and_custom(tmp_path):
    root, p = _files(tmp_path)
    common = ["--root", str(root), "--sam-checkpoint", p["sam_vit_h_4b8939.pth"],
              "--clip-checkpoint", p["clip.bin"], "--backbone-weights", p["resnet101.pth"]]
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    result = CliRunner().invoke(main, ["configure", "coco", "--params", str(params), *common])
    assert result.exit_code == 0, result.output
    tree = yaml.safe_load(params.read_text())
    assert tree["cams"]["seg"]["caa"]["enabled"] is False and tree["seeds"]["fine"]["alpha"] == 1.0
    assert tree["clip_features"]["augment"]["long_side_range"] == [318, 530]
    # COCO: §9 gives no DeepLabV3+ schedule; ours is 100k iterations, val every 10k (40,504 images).
    assert tree["segmenter"]["iterations"] == 100_000 and tree["segmenter"]["val_every"] == 10_000
    assert tree["segmenter"]["output_stride"] == 8 and tree["predict"]["alpha"] == 3
    shutil.copy(REPO / "params.yaml", params)
    result = CliRunner().invoke(main, ["configure", "custom", "--params", str(params), *common,
                                       "--class-names", p["classes.txt"], "--labels-file", p["labels.csv"]])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(params.read_text())["dataset"]["labels_file"] == p["labels.csv"]
    assert yaml.safe_load(params.read_text())["segmenter"]["iterations"] == 52910
    assert "ceil(80 * N / 16)" in result.output


@pytest.mark.parametrize("drop, message", [
    ("--root", "--root: dataset folder not found"),
    ("--sam-checkpoint", "--sam-checkpoint: file not found"),
])
def test_configure_validates_paths(tmp_path, drop, message):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text()
    root, p = _files(tmp_path)
    args = {"--root": str(root), "--sam-checkpoint": p["sam_vit_h_4b8939.pth"],
            "--clip-checkpoint": p["clip.bin"], "--backbone-weights": p["resnet101.pth"]}
    args[drop] = str(tmp_path / "missing")
    result = CliRunner().invoke(main, ["configure", "voc", "--params", str(params),
                                       *[x for kv in args.items() for x in kv]])
    assert result.exit_code != 0 and message in result.output
    assert params.read_text() == before


def _demo_marked_keys(path):
    """Dotted keys whose line comment in params.yaml calls the value "demo"."""
    from ruamel.yaml import YAML

    found = []

    def walk(node, prefix):
        for key, value in node.items():
            token = node.ca.items.get(key, [None, None, None, None])[2]
            if token is not None and "demo" in token.value.split("\n")[0]:
                found.append(prefix + key)
            if hasattr(value, "items"):
                walk(value, prefix + key + ".")

    walk(YAML().load(path.read_text()), "")
    return found


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_demo_value_gets_the_papers_value(profile):
    """A real run never keeps a value params.yaml marks as the demo's (a new demo key must get its
    paper value in pipeline/profiles.py)."""
    marked = _demo_marked_keys(REPO / "params.yaml")
    assert marked, "params.yaml marks its demo values"
    demo_only = {k for k in marked if k.startswith("dataset.demo")}
    assert sorted(set(marked) - demo_only - set(PROFILES[profile]) - {"dataset.root", "dataset.name"}) == []


def _run(params, *args):
    return CliRunner().invoke(main, ["configure", *args, "--params", str(params)])


def test_configure_rewrites_demo_comments_and_takes_sam_variant_and_checksums(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    root, p = _files(tmp_path)
    sha = "ab" * 32
    res = _run(params, "voc", "--root", str(root), "--sam-model", "vit_b", "--sam-checkpoint",
               p["sam_vit_h_4b8939.pth"], "--sam-sha256", sha.upper(), "--clip-checkpoint", p["clip.bin"],
               "--backbone-weights", p["resnet101.pth"])
    assert res.exit_code == 0, res.output
    tree = yaml.safe_load(params.read_text())
    assert tree["sam"]["model"] == "vit_b" and tree["sam"]["checkpoint_sha256"] == sha
    assert tree["clip"]["checkpoint_sha256"] is None
    assert _demo_marked_keys(params) == [k for k in _demo_marked_keys(REPO / "params.yaml")
                                         if k.startswith("dataset.demo")]
    assert "# wsss configure voc (paper's setting)" in params.read_text()
    bad = _run(params, "voc", "--root", str(root), "--sam-checkpoint", p["sam_vit_h_4b8939.pth"],
               "--sam-sha256", "1234", "--clip-checkpoint", p["clip.bin"], "--backbone-weights", p["resnet101.pth"])
    assert bad.exit_code == 1 and "--sam-sha256: a SHA-256 is 64 hex digits" in bad.output


def test_configure_custom_with_the_demo_models(tmp_path):
    """Own images, embedded models: no checkpoints, the demo's models and run lengths kept."""
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    root, p = _files(tmp_path)
    before = yaml.safe_load(params.read_text())
    res = _run(params, "custom", "--models", "demo", "--root", str(root), "--class-names", p["classes.txt"],
               "--labels-file", p["labels.csv"])
    assert res.exit_code == 0, res.output
    tree = yaml.safe_load(params.read_text())
    assert tree["dataset"]["name"] == "custom" and tree["dataset"]["labels_file"] == p["labels.csv"]
    # (the demo world's SAM oracle gives way to the tiny SAM: the next test)
    for section, key in (("sam", "checkpoint"), ("clip", "model"), ("clip", "checkpoint"),
                         ("segmenter", "model"), ("prompts", "cls")):
        assert tree[section][key] == before[section][key], (section, key)
    assert before["sam"]["model"] == "world-oracle" and tree["sam"]["model"] == "tiny"
    res = _run(params, "voc", "--models", "demo", "--root", str(root), "--sam-checkpoint", p["sam_vit_h_4b8939.pth"])
    assert res.exit_code == 1 and "--sam-checkpoint is for --models real" in res.output


@pytest.mark.parametrize("profile", ["voc", "custom"])
def test_configure_never_leaves_the_demo_worlds_oracle_on_other_data(tmp_path, profile):
    """The oracle answers with the demo world's own masks: --models demo puts the random tiny
    SAM (and the thresholds it needs) in its place; --models real writes a real variant."""
    from pipeline.profiles import OFF_WORLD_SAM

    root, p = _files(tmp_path)
    extra = ["--class-names", p["classes.txt"], "--labels-file", p["labels.csv"]] if profile == "custom" else []
    for models, checkpoints in (("demo", []), ("real", ["--sam-checkpoint", p["sam_vit_h_4b8939.pth"],
                                                        "--clip-checkpoint", p["clip.bin"],
                                                        "--backbone-weights", p["resnet101.pth"]])):
        params = tmp_path / f"{models}.yaml"
        params.write_text((REPO / "params.yaml").read_text())  # the embedded default runs the oracle
        assert yaml.safe_load(params.read_text())["sam"]["model"] == "world-oracle"
        res = _run(params, profile, "--models", models, "--root", str(root), *checkpoints, *extra)
        assert res.exit_code == 0, res.output
        tree = yaml.safe_load(params.read_text())
        if models == "demo":
            for key, value in OFF_WORLD_SAM.items():
                assert _get(tree, key) == value, key
            assert "note: sam.model world-oracle answers with the demo world's own masks" in res.output
        else:
            assert tree["sam"]["model"] == "vit_h"
            # The sam.model choices (world-oracle among them) stay listed.
            assert "| world-oracle" in params.read_text()
