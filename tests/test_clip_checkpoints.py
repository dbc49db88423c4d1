"""CLIP weights files: both formats researchers download, and the errors a bad file gives."""
import logging

import pytest
import torch

from pipeline.clip.model import TINY_MODEL, create_clip
from pipeline.clip import pretrained
from pipeline.clip.pretrained import OPENAI_FILES
from pipeline.weights import CheckpointError, sha256sum
from pipeline.params import ClipConfig
from pipeline.clip.factory import build_clip, clip_kwargs, verify_clip
from pipeline.errors import PipelineError


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def trained():
    return create_clip("tiny", seed=11).model.float().eval()


def _archive(model, path):
    """OpenAI distributes ViT-B-16.pt as a TorchScript archive; a traced model stands in for it."""
    image, text = torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(model, (image, text), strict=False, check_trace=False)
    traced.save(str(path))
    return path


@pytest.fixture(scope="module")
def archive(trained, tmp_path_factory):
    return _archive(trained, tmp_path_factory.mktemp("archive") / "tiny_openai_format.pt")


def test_state_dict_file_and_torchscript_archive_load_the_same_weights(trained, archive, tmp_path):
    plain = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(trained.state_dict(), plain)
    # a state dict loads unpinned (tensors only); the archive (code) once its checksum is pinned
    for path, pinned in ((plain, None), (archive, sha256sum(archive))):
        loaded = create_clip(TINY_MODEL, checkpoint=path, checkpoint_sha256=pinned)
        assert not loaded.untrained and _same_weights(loaded.model, trained), path.name
    assert not _same_weights(create_clip("tiny", seed=0).model, trained)


def _no_code_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load ran on an unverified file")

    monkeypatch.setattr(torch.jit, "load", refuse)


def test_an_unpinned_unknown_torchscript_archive_is_refused_in_one_line(archive, monkeypatch):
    _no_code_runs(monkeypatch)
    sha = sha256sum(archive)
    for load in (lambda: create_clip(TINY_MODEL, checkpoint=archive),
                 lambda: build_clip(**clip_kwargs(ClipConfig(model=TINY_MODEL, checkpoint=str(archive)), "cpu")),
                 lambda: verify_clip(ClipConfig(model=TINY_MODEL, checkpoint=str(archive)))):
        with pytest.raises(CheckpointError, match="is a TorchScript archive") as info:
            load()
        msg = str(info.value)
        assert "\n" not in msg and str(archive) in msg
        assert f"'clip.checkpoint_sha256: {sha}'" in msg and "convert it to a state dict" in msg


def test_a_pinned_torchscript_archive_loads_and_its_checksum_is_the_provenance(trained, archive):
    sha = sha256sum(archive)
    cfg = ClipConfig(model=TINY_MODEL, checkpoint=str(archive), checkpoint_sha256=sha)
    assert verify_clip(cfg) == sha
    assert _same_weights(build_clip(**clip_kwargs(cfg, "cpu")).model, trained)
    other = ClipConfig(model=TINY_MODEL, checkpoint=str(archive), checkpoint_sha256="ab" * 32)
    with pytest.raises(CheckpointError, match="expected " + "ab" * 32):
        build_clip(**clip_kwargs(other, "cpu"))


def test_a_known_file_is_known_by_its_content_not_its_name(trained, archive, tmp_path, monkeypatch, caplog):
    sha = sha256sum(archive)
    # an archive whose checksum is a known file's loads unpinned, under any name
    monkeypatch.setattr(pretrained, "known_files", lambda: {TINY_MODEL: ("official_tiny.pt", sha)})
    renamed = tmp_path / "renamed.pt"
    renamed.write_bytes(archive.read_bytes())
    with caplog.at_level(logging.WARNING, logger="wsss"):
        assert verify_clip(ClipConfig(model=TINY_MODEL, checkpoint=str(renamed))) == sha
    assert "not verified" not in caplog.text
    assert _same_weights(create_clip(TINY_MODEL, checkpoint=renamed).model, trained)
    # a file named like the known one, with other content (another archive), is not it
    monkeypatch.undo()
    _no_code_runs(monkeypatch)
    impostor = _archive(create_clip("tiny", seed=5).model.float().eval(), tmp_path / OPENAI_FILES["ViT-B-16"][0])
    with pytest.raises(CheckpointError, match="is a TorchScript archive") as info:
        create_clip(TINY_MODEL, checkpoint=impostor)
    assert "named ViT-B-16.pt, but its content is not that known file's" in str(info.value)
    with pytest.raises(CheckpointError, match=f"expected {OPENAI_FILES['ViT-B-16'][1]}"):
        verify_clip(ClipConfig(model="ViT-B-16", checkpoint=str(impostor)))


def test_truncated_and_foreign_files_are_one_line(trained, tmp_path):
    cut = tmp_path / "cut.bin"
    torch.save(trained.state_dict(), cut)
    cut.write_bytes(cut.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        create_clip(TINY_MODEL, checkpoint=cut)
    assert "\n" not in str(info.value) and str(cut) in str(info.value)
    other = tmp_path / "other.bin"
    torch.save({"visual.proj": torch.zeros(3, 3)}, other)
    with pytest.raises(CheckpointError, match="does not fit this architecture"):
        create_clip(TINY_MODEL, checkpoint=other)


def test_the_official_openai_file_is_verified_and_other_files_are_recorded(trained, tmp_path, caplog):
    name, sha = OPENAI_FILES["ViT-B-16"]
    fake = tmp_path / name
    fake.write_bytes(b"not OpenAI's file")
    with pytest.raises(PipelineError) as info:
        verify_clip(ClipConfig(model="ViT-B-16", checkpoint=str(fake)))
    assert sha in str(info.value) and "'clip.checkpoint_sha256" in str(info.value)
    # one's own checksum replaces the published one
    assert verify_clip(ClipConfig(model="ViT-B-16", checkpoint=str(fake),
                                  checkpoint_sha256=sha256sum(fake))) == sha256sum(fake)
    conversion = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(trained.state_dict(), conversion)
    with caplog.at_level(logging.WARNING, logger="wsss"):
        got = verify_clip(ClipConfig(model=TINY_MODEL, checkpoint=str(conversion)))
    assert got == sha256sum(conversion) and "not verified" in caplog.text
