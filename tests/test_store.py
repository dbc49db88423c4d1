import os

import numpy as np
import pytest

from pipeline.store import ImageStore, StoreError, finish, write_group


def _arrays(seed):
    rng = np.random.default_rng(seed)
    return {"masks": rng.random((3, 7, 5)) > 0.5, "levels": np.array([2, 1, 0], np.uint8),
            "score": rng.random(3).astype(np.float32), "scalar": np.float32(seed),
            "big": rng.random((40, 30)).astype(np.float32), "strided": np.arange(12.0)[::2]}


def test_write_read_roundtrip(tmp_path):
    store = ImageStore.open_for_writing(tmp_path / "s.zarr", {"fingerprint": "f1", "stage": "t"})
    store.write("img_b", _arrays(1), {"height": 7})
    store.write("img_a", _arrays(2))
    assert store.ids() == ["img_a", "img_b"]
    back = store.read("img_b")
    for k, v in _arrays(1).items():
        assert back[k].dtype == v.dtype and back[k].shape == np.shape(v) and np.array_equal(back[k], v)
    assert store.read_attrs("img_b") == {"height": 7}
    assert store.attrs == {"fingerprint": "f1", "stage": "t"}
    assert "img_a" in store and "img_c" not in store
    with pytest.raises(KeyError, match="img_c"):
        store.read("img_c")


def test_same_fingerprint_resumes_other_resets(tmp_path):
    path = tmp_path / "s.zarr"
    ImageStore.open_for_writing(path, {"fingerprint": "f1"}).write("a", _arrays(0))
    assert ImageStore.open_for_writing(path, {"fingerprint": "f1", "extra": 1}).ids() == ["a"]
    assert ImageStore(path).attrs["extra"] == 1
    assert ImageStore.open_for_writing(path, {"fingerprint": "f2"}).ids() == []


def test_partial_write_is_invisible(tmp_path):
    path = tmp_path / "s.zarr"
    store = ImageStore.open_for_writing(path, {"fingerprint": "f"})
    # A killed writer leaves its temporary group behind; readers must not see it.
    partial = path.with_name("s.zarr.partial") / "x.123"
    partial.mkdir(parents=True)
    (partial / "zarr.json").write_text("{}")
    assert store.ids() == []
    finish(path)
    assert not path.with_name("s.zarr.partial").exists()


def test_write_group_replaces_and_is_deterministic(tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for p in (a, b):
        ImageStore.open_for_writing(p, {"fingerprint": "f"})
        write_group(p, "x", _arrays(5))
    write_group(a, "x", _arrays(5))  # rewrite replaces, not merges
    files_a = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    files_b = sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
    assert files_a == files_b
    for f in files_a:
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_missing_store_and_bad_ids(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        ImageStore(tmp_path / "none.zarr")
    store = ImageStore.open_for_writing(tmp_path / "s.zarr", {"fingerprint": "f"})
    for bad in ("a/b", ".hidden", "__x", ""):
        with pytest.raises(ValueError):
            store.write(bad, _arrays(0))


def test_a_second_writer_process_is_refused_until_the_first_finishes(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "s.zarr"
    store = ImageStore.open_for_writing(path, {"fingerprint": "f1"})
    ImageStore.open_for_writing(path, {"fingerprint": "f1"})  # the same process may reopen it
    code = ("import sys; from pipeline.store import ImageStore, StoreBusyError\n"
            "try:\n    ImageStore.open_for_writing(sys.argv[1], {'fingerprint': 'f2'})\n"
            "except StoreBusyError as e:\n    print('BUSY', e)\nelse:\n    print('OPENED')")
    run = lambda: subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                                 text=True, check=True).stdout
    out = run()
    assert out.startswith("BUSY") and f"pid {os.getpid()}" in out
    store.write("a", _arrays(1))
    assert ImageStore(path).ids() == ["a"]  # the refused writer did not reset the store
    finish(path)
    assert not (tmp_path / "s.zarr.lock").exists()  # nothing left beside a finished store
    assert run().startswith("OPENED")


def test_a_failed_write_leaves_no_partial_group(tmp_path, monkeypatch):
    import errno

    import zarr

    path = tmp_path / "s.zarr"
    ImageStore.open_for_writing(path, {"fingerprint": "f1"})
    real = zarr.Array.__setitem__

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    with pytest.raises(OSError, match="No space left"):
        write_group(path, "a", _arrays(1))
    monkeypatch.setattr(zarr.Array, "__setitem__", real)
    partial = tmp_path / "s.zarr.partial"
    assert not partial.exists() or list(partial.iterdir()) == []
    assert "a" not in ImageStore(path)
    write_group(path, "a", _arrays(1))
    assert "a" in ImageStore(path)
    finish(path)
