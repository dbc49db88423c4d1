"""CLIP weights files: both formats researchers download, and the errors a bad file gives."""
import logging

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.clip.model import TINY_MODEL, create_clip
from pipeline.clip.pretrained import OPENAI_FILES
from pipeline.weights import CheckpointError, sha256sum
from pipeline.params import ClipConfig
from pipeline.clip.factory import verify_clip
from pipeline.errors import PipelineError


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def trained():
    return create_clip("tiny", seed=11).model.float().eval()


def test_state_dict_file_and_torchscript_archive_load_the_same_weights(trained, tmp_path):
    plain = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(trained.state_dict(), plain)
    # OpenAI distributes ViT-B-16.pt as a TorchScript archive; a traced model stands in for it.
    image, text = torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(trained, (image, text), strict=False, check_trace=False)
    archive = tmp_path / "tiny_openai_format.pt"
    traced.save(str(archive))
    for path in (plain, archive):
        loaded = create_clip(TINY_MODEL, checkpoint=path)
        assert not loaded.untrained and _same_weights(loaded.model, trained), path.name
    assert not _same_weights(create_clip("tiny", seed=0).model, trained)


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
