import os

import numpy as np
import pytest
import zarr

from pipeline.store import ImageStore, LegacyLayoutError, StoreError, finish, write_group


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
    # one file per image, whatever its number of arrays: a zip holding the image's zarr group
    assert sorted(p.name for p in store.path.iterdir()) == ["img_a.zip", "img_b.zip", "zarr.json"]
    with zarr.storage.ZipStore(store.image_path("img_b"), mode="r") as zs:
        group = zarr.open_group(store=zs, mode="r")
        assert dict(group.attrs) == {"height": 7}
        np.testing.assert_array_equal(group["masks"][...], _arrays(1)["masks"])
    np.testing.assert_array_equal(store.read_array("img_b", "big", (slice(2, 4),)), _arrays(1)["big"][2:4])


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
    partial = path.with_name("s.zarr.partial") / "x.123.zip"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"PK\x03\x04half")
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


def test_disk_full_midway_through_an_image_keeps_its_previous_version(tmp_path, monkeypatch):
    import errno
    import zipfile

    path = tmp_path / "s.zarr"
    store = ImageStore.open_for_writing(path, {"fingerprint": "f1"})
    store.write("a", _arrays(1))
    before = store.image_path("a").read_bytes()
    real, written = zipfile.ZipFile.writestr, []

    def fills_up(self, info, data, *args, **kwargs):
        if len(written) == 3:  # the disk fills up at the fourth member of the zip
            raise OSError(errno.ENOSPC, "No space left on device", self.filename)
        written.append(info)
        return real(self, info, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", fills_up)
    with pytest.raises(OSError, match="No space left"):
        store.write("a", _arrays(2))
    monkeypatch.setattr(zipfile.ZipFile, "writestr", real)
    assert len(written) == 3
    assert store.image_path("a").read_bytes() == before  # the complete old image, untouched
    assert list((tmp_path / "s.zarr.partial").iterdir()) == []
    assert store.ids() == ["a"]
    np.testing.assert_array_equal(store.read("a")["big"], _arrays(1)["big"])
    finish(path)


_KILLED_WRITER = """
import sys
import numpy as np
from pipeline.store import ImageStore
store = ImageStore.open_for_writing(sys.argv[1], {"fingerprint": "f"})
for i in range(1000):
    rng = np.random.default_rng(i)
    store.write(f"img{i:04d}", {"x": rng.random((64, 256, 256)).astype(np.float32)})
"""


def test_a_writer_killed_mid_store_leaves_complete_images_and_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "s.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.time() + 120
    while time.time() < deadline and len(list(path.glob("*.zip"))) < 2:
        time.sleep(0.01)
    time.sleep(0.05)  # most likely in the middle of an image
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = ImageStore(path).ids()
    assert 2 <= len(kept) < 1000
    for image_id in kept:  # every image in the store is complete
        expected = np.random.default_rng(int(image_id[3:])).random((64, 256, 256)).astype(np.float32)
        np.testing.assert_array_equal(ImageStore(path).read(image_id)["x"], expected)
    store = ImageStore.open_for_writing(path, {"fingerprint": "f"})  # the lock died with it
    assert store.ids() == kept  # resumed, and the killed writer's temporary file is gone
    assert not (tmp_path / "s.zarr.partial").exists()
    finish(path)


_RACING_WRITER = """
import sys
import numpy as np
from pipeline.store import write_group
for i in range(40):
    write_group(sys.argv[1], f"img{i % 10}", {"x": np.full((100, 100), i % 10, np.int32)},
                attrs={"writer": sys.argv[2]})
"""


def test_two_processes_writing_the_same_images_never_leave_a_mixed_image(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "s.zarr"
    ImageStore.open_for_writing(path, {"fingerprint": "f"})
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", _RACING_WRITER, str(path), w], env=env)
             for w in ("one", "two")]
    assert [p.wait() for p in procs] == [0, 0]
    store = ImageStore(path)
    assert store.ids() == [f"img{i}" for i in range(10)]
    for i in range(10):  # whichever writer won, each image is one writer's complete version
        np.testing.assert_array_equal(store.read(f"img{i}")["x"], np.full((100, 100), i, np.int32))
        assert store.read_attrs(f"img{i}")["writer"] in ("one", "two")
    finish(path)


def test_dask_workers_write_their_own_images_byte_identical_to_a_serial_run(tmp_path):
    from dask.distributed import Client, LocalCluster

    serial, parallel = tmp_path / "serial.zarr", tmp_path / "parallel.zarr"
    for p in (serial, parallel):
        ImageStore.open_for_writing(p, {"fingerprint": "f"})
    ids = [f"img{i}" for i in range(8)]
    for i, image_id in enumerate(ids):
        write_group(serial, image_id, _arrays(i), {"i": i}, chunks={"big": (10, 30)})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        futures = [client.submit(write_group, str(parallel), image_id, _arrays(i), {"i": i},
                                 {"big": (10, 30)}, pure=False) for i, image_id in enumerate(ids)]
        client.gather(futures)
    assert ImageStore(parallel).ids() == ids
    for image_id in ids:
        assert ImageStore(serial).image_path(image_id).read_bytes() == \
            ImageStore(parallel).image_path(image_id).read_bytes()
    for p in (serial, parallel):
        finish(p)


def _legacy_store(path):
    """A store written by the previous layout's own code (kept in benchmarks/stores.py)."""
    import importlib.util
    import sys

    bench_dir = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    sys.path.insert(0, bench_dir)
    try:
        spec = importlib.util.spec_from_file_location("bench_stores", os.path.join(bench_dir, "stores.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(bench_dir)
    module.legacy.create(path, {"fingerprint": "f1", "stage": "sam_masks"})
    for i in range(3):
        module.legacy.write_group(path, f"img{i}", _arrays(i), {"i": i}, chunks={"big": (10, 30)})
    return module


def test_a_store_in_the_old_layout_is_refused_in_one_line_and_migrates(tmp_path):
    from click.testing import CliRunner

    from stages.cli import main

    path = tmp_path / "old.zarr"
    bench = _legacy_store(path)
    for open_it in (lambda: ImageStore(path),
                    lambda: ImageStore.open_for_writing(path, {"fingerprint": "f1"})):
        with pytest.raises(LegacyLayoutError) as info:
            open_it()
        message = str(info.value)
        assert "\n" not in message and "old store layout" in message
        assert f"wsss migrate-store {path}" in message and f"rm -r {path}" in message
    finish(path)
    assert sorted(p.name for p in path.iterdir()) == ["img0", "img1", "img2", "zarr.json"]  # untouched

    res = CliRunner().invoke(main, ["migrate-store", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    store = ImageStore(path)
    assert store.attrs == {"fingerprint": "f1", "stage": "sam_masks"} and store.ids() == ["img0", "img1", "img2"]
    assert sorted(p.name for p in path.iterdir()) == ["img0.zip", "img1.zip", "img2.zip", "zarr.json"]
    for i in range(3):
        back = store.read(f"img{i}")
        for k, v in _arrays(i).items():
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
        assert store.read_attrs(f"img{i}") == {"i": i}
    # chunk shapes and bytes kept: a fresh write of the same image gives the migrated file
    fresh = tmp_path / "fresh.zarr"
    ImageStore.open_for_writing(fresh, {"fingerprint": "f1"}).write("img1", _arrays(1), {"i": 1})
    write_group(fresh, "img1", _arrays(1), {"i": 1}, chunks={"big": (10, 30)})
    assert ImageStore(fresh).image_path("img1").read_bytes() == store.image_path("img1").read_bytes()
    assert ImageStore.open_for_writing(path, {"fingerprint": "f1"}).ids() == store.ids()  # resumable
    finish(path)
    finish(fresh)
    assert CliRunner().invoke(main, ["migrate-store", str(path)]).exit_code == 0  # already done
    assert bench.legacy is not None


# -- images are data to validate (issue 24) ------------------------------------------------------


def _tampered(tmp_path, edit):
    """A store with one image whose zip members went through ``edit(members)`` (a dict
    name -> bytes, changed in place); the file is replaced, as a DVC pull would replace it."""
    import zipfile

    from pipeline.store import _write_zip

    store = ImageStore.open_for_writing(tmp_path / "s.zarr", {"fingerprint": "f"})
    store.write("img", _arrays(1))
    path = store.image_path("img")
    store.read("img")  # checked once; the replaced file below must be checked again
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    edit(members)
    tmp = tmp_path / "replacement.zip"
    _write_zip(tmp, members)
    os.replace(tmp, path)
    return store, path


def _meta(members, name):
    import json

    return json.loads(members[f"{name}/zarr.json"])


def _set_meta(members, name, meta):
    import json

    members[f"{name}/zarr.json"] = json.dumps(meta).encode()


def _one_line_naming(exc_info, path, member):
    message = str(exc_info.value)
    assert "\n" not in message and message.startswith(f"{path}: member {member!r}"), message


@pytest.mark.parametrize("member", ["payload.pkl", "levels/c/0/../../x", "__pycache__/zarr.json",
                                    "masks/data.npy", "levels/c/x"])
def test_an_unexpected_member_name_stops_the_reader(tmp_path, member):
    store, path = _tampered(tmp_path, lambda m: m.update({member: b"\x80\x04K\x01."}))
    for read in (lambda: store.read("img"), lambda: store.read_array("img", "levels"),
                 lambda: store.read_attrs("img")):
        with pytest.raises(StoreError) as err:
            read()
        _one_line_naming(err, path, member)


def test_a_chunk_of_the_wrong_size_stops_the_reader(tmp_path):
    # "levels" (3,) uint8 is stored raw: 3 bytes
    store, path = _tampered(tmp_path, lambda m: m.update({"levels/c/0": b"\x00\x01\x02\x03"}))
    with pytest.raises(StoreError, match="has 4 bytes, its uint8 chunk \\[3\\] has 3") as err:
        store.read_array("img", "levels")
    _one_line_naming(err, path, "levels/c/0")


def test_a_compressed_chunk_of_another_size_stops_the_reader(tmp_path):
    # "big" (40, 30) float32 is blosc-compressed: swap in the chunk of a (20, 30) array
    other = tmp_path / "other.zarr"
    ImageStore.open_for_writing(other, {"fingerprint": "g"}).write(
        "img", {"big": np.random.default_rng(0).random((20, 30)).astype(np.float32)})
    import zipfile

    with zipfile.ZipFile(ImageStore(other).image_path("img")) as zf:
        smaller = zf.read("big/c/0/0")
    store, path = _tampered(tmp_path, lambda m: m.update({"big/c/0/0": smaller}))
    with pytest.raises(StoreError, match="decodes to 2400 bytes") as err:
        store.read("img")
    _one_line_naming(err, path, "big/c/0/0")


def test_a_chunk_outside_the_grid_stops_the_reader(tmp_path):
    store, path = _tampered(tmp_path, lambda m: m.update({"levels/c/1": m["levels/c/0"]}))
    with pytest.raises(StoreError, match="not a chunk of the array's grid") as err:
        store.read_array("img", "levels")
    _one_line_naming(err, path, "levels/c/1")


@pytest.mark.parametrize("change, reason", [
    (lambda meta: meta.update(data_type="string"), "data type 'string'"),
    (lambda meta: meta.update(codecs=[{"name": "bytes"}, {"name": "numcodecs.pickle"}]), "codecs"),
    (lambda meta: meta.update(storage_transformers=[{"name": "x"}]), "storage transformers"),
    (lambda meta: meta.update(shape=[3, 1]), "not a regular grid"),
])
def test_array_metadata_this_code_does_not_write_stops_the_reader(tmp_path, change, reason):
    def edit(members):
        meta = _meta(members, "levels")
        change(meta)
        _set_meta(members, "levels", meta)

    store, path = _tampered(tmp_path, edit)
    with pytest.raises(StoreError, match=reason) as err:
        store.read_array("img", "masks")  # any read of the image checks all of it
    _one_line_naming(err, path, "levels/zarr.json")


def test_the_reader_checks_the_arrays_it_expects(tmp_path):
    path = tmp_path / "s.zarr"
    ImageStore.open_for_writing(path, {"fingerprint": "f"}).write(
        "img", {"cam": np.zeros((2, 3, 4), np.float32), "fg_cls": np.array([0, 2])})
    expected = {"cam": ("float32", 3), "fg_cls": ("int64", 1), "cam_caa": ("float32", 3)}
    store = ImageStore(path, arrays=expected)
    assert store.read("img")["fg_cls"].tolist() == [0, 2]  # cam_caa is optional
    with pytest.raises(StoreError, match="has dtype float32 and 3 dimensions, expected float16 and 3") as err:
        ImageStore(path, arrays={**expected, "cam": ("float16", 3)}).read_array("img", "fg_cls")
    _one_line_naming(err, store.image_path("img"), "cam/zarr.json")
    with pytest.raises(StoreError, match="unexpected array") as err:
        ImageStore(path, arrays={"cam": ("float32", 3)}).read("img")
    _one_line_naming(err, store.image_path("img"), "fg_cls/zarr.json")
