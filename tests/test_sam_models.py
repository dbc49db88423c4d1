import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from pipeline.sam import models as sam_models
from pipeline.sam import pretrained, specs
from pipeline.sam.models import build_sam_predictor, sam_provenance
from pipeline.sam.pretrained import SamWeights, pretrained_weights
from pipeline.weights import CheckpointError, sha256sum


def _checkpointed_tiny(monkeypatch, name: str, file_name: str, sha256: str | None = None) -> None:
    """The tiny architecture registered as ``name``, a model with a checkpoint ``file_name``."""
    monkeypatch.setitem(specs.SPECS.entries, name, specs.sam_spec("tiny"))
    monkeypatch.setitem(pretrained.PRETRAINED.entries, name, SamWeights(file_name, sha256))


def _state(predictor):
    return {k: v.clone() for k, v in predictor.model.state_dict().items()}


def test_tiny_builds_deterministically_without_touching_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_sam_predictor("tiny", None, None)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    b = build_sam_predictor("tiny", None, None)
    sa, sb = _state(a), _state(b)
    assert isinstance(a, SamPredictor)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.model.image_encoder.img_size == 256
    assert a.transform.target_length == 256
    assert not a.model.training


def test_tiny_predicts_three_masks_per_point():
    predictor = build_sam_predictor("tiny", None, None, device="cpu", mask_threshold=0.0)
    image = np.random.RandomState(0).randint(0, 256, (90, 130, 3), dtype=np.uint8)
    predictor.set_image(image)
    assert predictor.original_size == (90, 130)
    assert predictor.input_size == (177, 256)  # long side resized to the tiny encoder's 256
    points = np.array([[5.0, 7.0], [100.0, 60.0], [129.0, 89.0], [64.0, 45.0]])
    coords = torch.as_tensor(predictor.transform.apply_coords(points, (90, 130)), dtype=torch.float)
    labels = torch.ones(len(points), dtype=torch.int)
    logits, iou, low_res = predictor.predict_torch(
        coords[:, None, :], labels[:, None], multimask_output=True, return_logits=True
    )
    assert logits.shape == (4, 3, 90, 130) and logits.dtype == torch.float32
    assert iou.shape == (4, 3)
    assert low_res.shape == (4, 3, 64, 64)  # 4x the 16x16 image embedding
    assert torch.isfinite(logits).all() and torch.isfinite(iou).all()
    masks, _, _ = predictor.predict(points[:1], np.array([1]), multimask_output=True)
    assert masks.shape == (3, 90, 130) and masks.dtype == bool
    np.testing.assert_array_equal(masks, (logits[0] > 0.0).numpy())


def test_mask_threshold_is_set_on_the_model():
    assert build_sam_predictor("tiny", None, None, mask_threshold=0.5).model.mask_threshold == 0.5


def test_missing_checkpoint_names_file_checksum_param_and_source(tmp_path):
    missing = tmp_path / "weights" / "sam_vit_h_4b8939.pth"
    with pytest.raises(CheckpointError) as info:
        build_sam_predictor("vit_h", str(missing), None)
    msg = str(info.value)
    assert str(missing) in msg
    assert "'sam.checkpoint'" in msg
    assert "sam_vit_h_4b8939.pth" in msg
    assert pretrained_weights("vit_h").sha256 in msg
    assert "github.com/facebookresearch/segment-anything" in msg
    with pytest.raises(CheckpointError, match="'sam.checkpoint'"):
        build_sam_predictor("vit_b", None, None)


def test_wrong_checksum_is_rejected(tmp_path):
    bogus = tmp_path / "sam_vit_b_01ec64.pth"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        build_sam_predictor("vit_b", str(bogus), None)
    msg = str(info.value)
    assert sha256sum(bogus) in msg and pretrained_weights("vit_b").sha256 in msg
    with pytest.raises(CheckpointError, match="expected " + "0" * 64):
        build_sam_predictor("vit_b", str(bogus), "0" * 64)


def test_checkpoint_is_loaded_after_verification(tmp_path, monkeypatch):
    # A tiny architecture posing as a checkpointed model exercises the real loading path.
    source = build_sam_predictor("tiny", None, None)
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(1.0)
    path = tmp_path / "tiny_trained.pth"
    torch.save(source.model.state_dict(), path)
    _checkpointed_tiny(monkeypatch, "tiny_trained", "tiny_trained.pth", sha256sum(path))
    loaded = build_sam_predictor("tiny_trained", str(path), None)
    a, b = _state(source), _state(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sam_provenance("tiny_trained", str(path), None) == {
        "model": "tiny_trained", "checkpoint": str(path), "sha256": sha256sum(path),
        "untrained": False,
    }


def test_provenance():
    assert sam_provenance("tiny", "ignored.pth", None) == {
        "model": "tiny", "checkpoint": None, "sha256": "random-init", "untrained": True,
    }
    assert sam_provenance("vit_h", "w/sam_vit_h_4b8939.pth", None) == {
        "model": "vit_h", "checkpoint": "w/sam_vit_h_4b8939.pth",
        "sha256": "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        "untrained": False,
    }
    assert sam_provenance("vit_l", "x.pth", "ab" * 32)["sha256"] == "ab" * 32


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown SAM model 'vit_x'"):
        build_sam_predictor("vit_x", None, None)
    assert sam_models.expected_sha256("tiny", None) is None


@pytest.mark.parametrize("content, message", [
    (b"", r"is empty \(0 bytes\): the download did not finish"),
    (None, "cannot be read"),
])
def test_empty_or_truncated_checkpoint_is_one_clear_error(tmp_path, monkeypatch, content, message):
    source = build_sam_predictor("tiny", None, None)
    path = tmp_path / "tiny_trained.pth"
    torch.save(source.model.state_dict(), path)
    if content is None:  # cut off half-way, checksum pinned to the cut file (a user's own file)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    _checkpointed_tiny(monkeypatch, "tiny_trained", "tiny_trained.pth")
    with pytest.raises(CheckpointError, match=message) as info:
        build_sam_predictor("tiny_trained", str(path), sha256sum(path) if content is None else None)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_own_checkpoint_checksum_replaces_the_pinned_one(tmp_path, monkeypatch):
    """A fine-tuned SAM: the official checksum is the default, `sam.checkpoint_sha256` replaces it."""
    source = build_sam_predictor("tiny", None, None)
    path = tmp_path / "my_finetuned_sam.pth"
    torch.save(source.model.state_dict(), path)
    _checkpointed_tiny(monkeypatch, "tiny_official", "official.pth", "ab" * 32)
    with pytest.raises(CheckpointError) as info:
        build_sam_predictor("tiny_official", str(path), None)
    assert f"'sam.checkpoint_sha256: {sha256sum(path)}'" in str(info.value)
    build_sam_predictor("tiny_official", str(path), sha256sum(path))  # accepted


def test_checkpoint_of_another_architecture_is_named(tmp_path, monkeypatch):
    path = tmp_path / "other.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, path)
    _checkpointed_tiny(monkeypatch, "tiny_other", "other.pth")
    with pytest.raises(CheckpointError, match="does not fit the tiny_other architecture"):
        build_sam_predictor("tiny_other", str(path), sha256sum(path))


def test_positional_encoding_stays_float32_under_bf16_autocast():
    sam = build_sam_predictor("tiny", None, None, device="cpu").model
    pe = sam.prompt_encoder.pe_layer
    coords = torch.rand(1, 37, 2, generator=torch.Generator().manual_seed(0)) * 256
    size = (256, 256)
    reference_points = pe.forward_with_coords(coords, size)
    reference_dense = sam.prompt_encoder.get_dense_pe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        points = pe.forward_with_coords(coords, size)
        dense = sam.prompt_encoder.get_dense_pe()
        # what stock's encoding gives under the same autocast: the matmul in bfloat16
        stock = torch.matmul(2 * (coords / 256) - 1, pe.positional_encoding_gaussian_matrix)
    assert stock.dtype == torch.bfloat16  # the autocast does reach this matmul
    assert points.dtype == dense.dtype == torch.float32
    assert torch.equal(points, reference_points) and torch.equal(dense, reference_dense)


def test_sam_generators_are_a_registry_with_the_demos_registered():
    from pipeline.errors import PipelineError
    from pipeline.registry import resolve
    from pipeline.sam.generators import SAM_NETWORK, generator_names, sam_generator

    assert generator_names() == ("vit_h", "vit_l", "vit_b", "tiny", "demo", "world-oracle")
    for name in generator_names():
        entry = sam_generator(name)
        for ref in (entry.masker, entry.provenance, entry.verify):
            assert ref is None or callable(resolve(ref)), (name, ref)
    assert all(sam_generator(n) == SAM_NETWORK for n in ("vit_h", "vit_l", "vit_b", "tiny"))
    # The demo SAM is a SAM network whose architecture lives in the demo's registry.
    assert sam_generator("demo").masker == SAM_NETWORK.masker
    assert sam_generator("demo").code_modules == ("pipeline.demo.registry",)
    oracle = sam_generator("world-oracle")
    assert oracle.oracle and oracle.world_seed and oracle.dataset == "demo" and oracle.verify is None
    assert not any(sam_generator(n).oracle for n in generator_names() if n != "world-oracle")
    with pytest.raises(PipelineError, match=r"unknown sam.model 'vit_x' \(known: vit_h, vit_l, "
                                            r"vit_b, tiny, demo, world-oracle\)"):
        sam_generator("vit_x")


def test_known_weights_are_apart_from_architectures():
    assert pretrained_weights("tiny") is None  # random init: no checkpoint
    assert pretrained_weights("vit_b").file_name == "sam_vit_b_01ec64.pth"
    assert pretrained_weights("demo") == SamWeights("sam_demo.pth", None)  # registered by the demo
    assert specs.sam_spec("demo").image_encoder == "clip_vit"
    assert specs.spec_names() == ("vit_h", "vit_l", "vit_b", "tiny", "demo")


def test_validating_sam_model_names_imports_no_generator():
    import subprocess
    import sys

    code = ("import sys; from pipeline.params import SamConfig; SamConfig(model='world-oracle'); "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.sam.') "
            "or m.startswith('pipeline.demo.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted(["pipeline.sam.generators", "pipeline.sam.pretrained",
                                      "pipeline.sam.specs", "pipeline.demo.registry"]))
