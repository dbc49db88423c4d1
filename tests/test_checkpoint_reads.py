"""Each checkpoint hashed once per process and file version, and checked on the very bytes loaded
(issue 30, item 7): a file replaced between the stage's check and a worker's load is refused, never
loaded unverified."""
import hashlib
import io
import os
from collections import OrderedDict

import pytest
import torch

from pipeline import weights
from pipeline.clip.factory import build_clip, clip_kwargs, verify_clip
from pipeline.clip.model import TINY_MODEL, create_clip
from pipeline.errors import PipelineError
from pipeline.params import ClipConfig
from pipeline.sam import pretrained, specs
from pipeline.sam.models import build_sam_predictor, verify_checkpoint
from pipeline.sam.pretrained import SamWeights
from pipeline.segmenter.model import build_segmenter
from stages.resources import WorkerResource, release_resources


class Reads:
    """Full reads and hashes of one file: opens by pipeline.weights, hashes by its hashlib, and
    any torch.load / torch.jit.load given a path instead of checked bytes."""

    def __init__(self, monkeypatch, path):
        self.path, self.opens, self.hashes, self.loads_from_path = str(path), 0, 0, 0
        monkeypatch.setattr(weights, "_DIGESTS", OrderedDict())  # a fresh process
        monkeypatch.setattr(weights, "open", self._open, raising=False)
        monkeypatch.setattr(weights, "hashlib", self)
        for module, name in ((torch, "load"), (torch.jit, "load")):
            monkeypatch.setattr(module, name, self._loader(getattr(module, name)))

    def _open(self, path, *args, **kwargs):
        self.opens += os.path.abspath(path) == os.path.abspath(self.path)
        return open(path, *args, **kwargs)

    def sha256(self, *data):
        self.hashes += 1
        return hashlib.sha256(*data)

    def _loader(self, load):
        def counted(f, *args, **kwargs):
            self.loads_from_path += not isinstance(f, io.BytesIO)
            return load(f, *args, **kwargs)
        return counted

    def counts(self):
        return self.opens, self.hashes, self.loads_from_path


@pytest.fixture(autouse=True)
def _release():
    yield
    release_resources()


def test_a_file_version_is_hashed_once(tmp_path, monkeypatch):
    f = tmp_path / "w.pth"
    f.write_bytes(b"weights v1")
    reads = Reads(monkeypatch, f)
    assert {weights.sha256sum(f) for _ in range(3)} == {hashlib.sha256(b"weights v1").hexdigest()}
    assert reads.counts() == (1, 1, 0)
    f.write_bytes(b"weights v2, longer")  # rewritten: new size and mtime
    assert weights.sha256sum(f) == hashlib.sha256(b"weights v2, longer").hexdigest()
    assert reads.hashes == 2
    f.write_bytes(b"weights v3, longer")  # same size, new mtime
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights.sha256sum(f) == hashlib.sha256(b"weights v3, longer").hexdigest()
    other = tmp_path / "other.pth"
    other.write_bytes(b"weights v4, longer")
    os.utime(other, ns=(st.st_atime_ns, f.stat().st_mtime_ns))
    os.replace(other, f)  # same size and mtime, another inode
    assert weights.sha256sum(f) == hashlib.sha256(b"weights v4, longer").hexdigest()
    assert reads.hashes == 4


# -- SAM (the 2.5 GB ViT-H in real runs): a tiny architecture posing as a checkpointed model ----


@pytest.fixture
def sam_file(tmp_path, monkeypatch):
    monkeypatch.setitem(specs.SPECS.entries, "tiny_ckpt", specs.sam_spec("tiny"))
    monkeypatch.setitem(pretrained.PRETRAINED.entries, "tiny_ckpt", SamWeights("tiny_ckpt.pth", None))
    path = tmp_path / "tiny_ckpt.pth"
    torch.save(_sam_state(1.0), path)
    return path


def _sam_state(shift):
    sam = build_sam_predictor("tiny", None, None).model
    return {k: v + shift if v.is_floating_point() else v for k, v in sam.state_dict().items()}


def _sam_resource(path):
    return WorkerResource.of(build_sam_predictor, files=("checkpoint",), model="tiny_ckpt",
                             checkpoint=str(path), checkpoint_sha256=None, device="cpu")


def _weights_equal(predictor, state):
    got = predictor.model.state_dict()
    return all(torch.equal(got[k], state[k]) for k in state)


def test_a_local_run_reads_a_checkpoint_twice_and_a_worker_once(sam_file, monkeypatch):
    reads = Reads(monkeypatch, sam_file)
    verify_checkpoint("tiny_ckpt", str(sam_file), None)  # the stage's check, before any work
    resource = _sam_resource(sam_file)                    # the model's key: a cache hit
    assert _weights_equal(resource.get(), _sam_state(1.0))  # loaded from the bytes it hashed
    assert reads.counts() == (2, 2, 0)
    release_resources()
    monkeypatch.setattr(weights, "_DIGESTS", OrderedDict())  # a dask worker: another process
    resource.get()
    assert reads.counts() == (3, 3, 0)


def test_a_checkpoint_replaced_after_the_stage_hashed_it_is_refused(sam_file, tmp_path):
    resource = _sam_resource(sam_file)
    other = tmp_path / "other.pth"
    torch.save(_sam_state(2.0), other)
    os.replace(other, sam_file)
    with pytest.raises(PipelineError, match=f"{sam_file} is not the file the stage started with") as info:
        resource.get()
    assert "\n" not in str(info.value)


def test_the_bytes_checked_are_the_bytes_loaded(sam_file, tmp_path, monkeypatch):
    """The file is swapped the moment the loader hashes it: what loads is what was hashed."""
    resource = _sam_resource(sam_file)
    other = tmp_path / "other.pth"
    torch.save(_sam_state(2.0), other)

    class SwapWhileHashing:
        @staticmethod
        def sha256(*data):
            if data and other.exists():  # the loader hashes the bytes it read
                os.replace(other, sam_file)
            return hashlib.sha256(*data)

    monkeypatch.setattr(weights, "hashlib", SwapWhileHashing)
    assert _weights_equal(resource.get(), _sam_state(1.0))
    assert not other.exists()  # the swap did happen
    release_resources()
    assert _weights_equal(_sam_resource(sam_file).get(), _sam_state(2.0))  # the new file, rehashed


def test_a_rewrite_the_digest_cache_cannot_see_is_caught_on_the_bytes(sam_file):
    """Rewritten in place with the same size and mtime: the cache still says the old digest, the
    bytes loaded do not."""
    resource = _sam_resource(sam_file)
    st = sam_file.stat()
    data = bytearray(sam_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a bit flip in some weight
    with open(sam_file, "r+b") as f:  # same inode, same size
        f.write(data)
    os.utime(sam_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.sha256sum(sam_file) == dict(resource.digests)["checkpoint"]  # stale, by design
    with pytest.raises(PipelineError, match="is not the file the stage started with"):
        resource.get()


# -- CLIP: a TorchScript archive swapped under a pinned checksum never runs ---------------------


def _archive(seed, path):
    model = create_clip("tiny", seed=seed).model.float().eval()
    image, text = torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
    with torch.no_grad():
        torch.jit.trace(model, (image, text), strict=False, check_trace=False).save(str(path))
    return path


def test_a_swapped_torchscript_archive_is_refused_before_it_runs(tmp_path, monkeypatch):
    path = _archive(1, tmp_path / "clip.pt")
    cfg = ClipConfig(model=TINY_MODEL, checkpoint=str(path), checkpoint_sha256=weights.sha256sum(path))
    reads = Reads(monkeypatch, path)
    verify_clip(cfg)
    resource = WorkerResource.of(build_clip, files=("checkpoint",), **clip_kwargs(cfg, "cpu"))
    resource.get()
    assert reads.counts() == (2, 2, 0)
    release_resources()
    runs = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: runs.append(a))
    os.replace(_archive(2, tmp_path / "other.pt"), path)
    with pytest.raises(PipelineError, match="is not the file the stage started with"):
        resource.get()
    assert runs == []


def test_segmenter_encoder_weights_are_read_once(tmp_path, monkeypatch):
    net = build_segmenter("tiny", 3)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(net.encoder.state_dict(), path)
    reads = Reads(monkeypatch, path)
    loaded = build_segmenter("tiny", 3, encoder_weights=path)
    assert reads.counts() == (1, 1, 0)
    assert weights.sha256sum(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert reads.counts() == (1, 1, 0)  # the loader's digest is the file's, cached
    assert all(torch.equal(a, b) for a, b in zip(loaded.encoder.state_dict().values(),
                                                 net.encoder.state_dict().values()))
