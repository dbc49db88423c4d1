"""Checkpoint checks shared by every model: missing, empty, pinned checksum, torchvision's name rule."""
import pytest

from pipeline.weights import CheckpointError, name_hash_prefix, resolve_checkpoint, sha256sum


def _file(path, data=b"weights"):
    path.write_bytes(data)
    return path


def test_torchvision_style_names_carry_a_checksum_prefix(tmp_path):
    probe = _file(tmp_path / "probe.pth")
    sha = sha256sum(probe)
    good = _file(tmp_path / f"resnet101-{sha[:8]}.pth")
    assert name_hash_prefix(good) == sha[:8]
    assert resolve_checkpoint(good, None, "ResNet-101", "torchvision", "segmenter.encoder_weights") == good
    bad = _file(tmp_path / "resnet101-63fe2227.pth")  # the official name, other bytes
    with pytest.raises(CheckpointError, match="its name says it starts with 63fe2227") as info:
        resolve_checkpoint(bad, None, "ResNet-101", "torchvision", "segmenter.encoder_weights")
    assert f"'segmenter.encoder_weights_sha256: {sha}'" in str(info.value)
    # a pinned checksum wins over the name, and a plain name is not checked
    assert resolve_checkpoint(bad, sha, "ResNet-101", "torchvision", "segmenter.encoder_weights") == bad
    plain = _file(tmp_path / "my_backbone.pth")
    assert name_hash_prefix(plain) is None
    assert resolve_checkpoint(plain, None, "ResNet-101", "torchvision", "segmenter.encoder_weights") == plain


def test_empty_file_is_named(tmp_path):
    empty = _file(tmp_path / "resnet101-63fe2227.pth", b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        resolve_checkpoint(empty, None, "ResNet-101", "torchvision", "segmenter.encoder_weights")
