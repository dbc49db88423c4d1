"""Per-image artifact stores: one zarr v3 group per image, written atomically.

A store is a directory ``<name>.zarr`` holding one group per image id. A group is first written
complete under ``<name>.zarr.partial/<random>`` (same filesystem) and then renamed into place, so
a killed run leaves only complete images and readers never see half an image. Store-level
attributes record provenance; ``fingerprint`` identifies the parameters an image depends on, and a
store whose fingerprint differs from the current one is reset rather than silently mixed.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import zarr
from zarr.codecs import BloscCodec

_COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
# Below this size an array is stored raw: a compressor's header and its metadata cost more than
# it saves on per-mask vectors of a few dozen entries.
_MIN_COMPRESSED_BYTES = 1024
# Compact metadata: per-image groups hold several small arrays, and zarr's default indented
# zarr.json made metadata the larger part of a typical image's bytes.
_ZARR_CONFIG = {"json_indent": None}


class StoreError(RuntimeError):
    """A store exists but cannot be used as asked (wrong producer, unreadable, busy)."""


class StoreBusyError(StoreError):
    """Another process is writing the store."""


# Writer locks held by this process: store path -> open file descriptor (flock is released by the
# kernel when the process ends, however it ends).
_WRITER_LOCKS: dict[str, int] = {}


class ImageStore:
    """A zarr v3 directory store with one group of arrays per image id."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"no store at {self.path} (run the stage that produces it first)")
        self._root = zarr.open_group(str(self.path), mode="r")

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def open_for_writing(cls, path: str | os.PathLike, attrs: Mapping[str, Any]) -> "ImageStore":
        """Open ``path`` for (resumed) writing with the given store attributes.

        ``attrs['fingerprint']`` must identify everything the stored images depend on. If the
        store exists with the same fingerprint, its complete images are kept (resume); otherwise
        it is recreated empty.
        """
        path = Path(path)
        attrs = _jsonable(dict(attrs))
        _lock_for_writing(path)
        if (path / "zarr.json").exists():
            old = dict(zarr.open_group(str(path), mode="r").attrs)
            if old.get("fingerprint") == attrs.get("fingerprint"):
                if old != attrs:
                    zarr.open_group(str(path), mode="r+").attrs.put(attrs)
                shutil.rmtree(_partial_dir(path), ignore_errors=True)
                return cls(path)
            shutil.rmtree(path)
        shutil.rmtree(_partial_dir(path), ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with zarr.config.set(_ZARR_CONFIG):
            root = zarr.open_group(str(path), mode="w", zarr_format=3)
            root.attrs.put(attrs)
        return cls(path)

    # -- reading ----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self._root.attrs)

    def ids(self) -> list[str]:
        """Ids of the complete images, sorted."""
        return sorted(
            p.name for p in self.path.iterdir() if p.is_dir() and (p / "zarr.json").exists()
        )

    def __contains__(self, image_id: str) -> bool:
        return (self.path / _check_id(image_id) / "zarr.json").exists()

    def __len__(self) -> int:
        return len(self.ids())

    def read(self, image_id: str, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """The image's arrays (only ``names`` when given: large arrays stay unread)."""
        group = self._group(image_id)
        if names is None:
            return {name: arr[...] for name, arr in group.arrays()}
        return {name: group[name][...] for name in names}

    def read_array(self, image_id: str, name: str, index: Any = None) -> np.ndarray:
        """Array ``name`` of one image, or only ``array[index]``: a store written with one chunk
        per leading index (``write_group(..., chunks=...)``) then reads and decompresses just
        that chunk. Opens the array directly (no group listing), the cheapest read per call."""
        if image_id not in self:
            raise KeyError(f"image {image_id!r} is not in {self.path}")
        arr = zarr.open_array(str(self.path / image_id / name), mode="r")
        return arr[...] if index is None else arr[index]

    def read_attrs(self, image_id: str) -> dict:
        return dict(self._group(image_id).attrs)

    def _group(self, image_id: str) -> zarr.Group:
        if image_id not in self:
            raise KeyError(f"image {image_id!r} is not in {self.path}")
        return zarr.open_group(str(self.path / image_id), mode="r")

    # -- writing ----------------------------------------------------------------------------
    def write(
        self, image_id: str, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None
    ) -> None:
        """Write one image's arrays atomically (replacing an existing group of that id)."""
        write_group(self.path, image_id, arrays, attrs)


def write_group(
    store_path: str | os.PathLike,
    image_id: str,
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any] | None = None,
    chunks: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Write ``arrays`` as group ``image_id`` of the store at ``store_path``, atomically.

    Each array is one chunk unless ``chunks`` gives its chunk shape (e.g. one chunk per cached
    view, so a reader of one view decompresses only that one). A function of paths only, so
    dask workers in other processes can call it.
    """
    store_path = Path(store_path)
    final = store_path / _check_id(image_id)
    tmp = _partial_dir(store_path) / f"{image_id}.{uuid.uuid4().hex}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_tmp_group(tmp, arrays, attrs, chunks or {})
    except BaseException:
        # Disk full, read-only, killed: nothing half-written stays behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _write_tmp_group(tmp: Path, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None,
                     chunks: Mapping[str, tuple[int, ...]]) -> None:
    with zarr.config.set(_ZARR_CONFIG):
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        if attrs:
            group.attrs.put(_jsonable(dict(attrs)))
        for name, value in arrays.items():
            value = np.asarray(value)  # not ascontiguousarray: it turns 0-d scalars into (1,)
            if not value.flags.c_contiguous:
                value = value.copy(order="C")
            compress = value.ndim > 0 and value.nbytes >= _MIN_COMPRESSED_BYTES
            # One chunk per array by default: images are read whole, and one file per array keeps
            # stores small.
            arr = group.create_array(
                name,
                shape=value.shape,
                dtype=value.dtype,
                chunks=tuple(chunks.get(name, value.shape)) if value.ndim else (),
                compressors=[_COMPRESSOR] if compress else None,
            )
            arr[...] = value


def finish(store_path: str | os.PathLike) -> None:
    """Remove the temporary directory of a store once a stage has completed; release its lock."""
    store_path = Path(store_path)
    shutil.rmtree(_partial_dir(store_path), ignore_errors=True)
    fd = _WRITER_LOCKS.pop(_lock_key(store_path), None)
    if fd is not None:
        # The lock file goes too: a store may sit inside a DVC output (clip_features/), whose
        # hash must not see it.
        _lock_path(store_path).unlink(missing_ok=True)
        os.close(fd)


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _lock_key(path: Path) -> str:
    return str(path.resolve())


def _lock_for_writing(path: Path) -> None:
    """Take the store's writer lock (``<store>.lock`` beside it), or raise StoreBusyError.

    Two processes filling one store would both compute every image (and a stage orphaned by a
    killed ``dvc repro`` would race its rerun); the second one is refused with the holder's pid.
    Workers of a stage write groups without the lock: the stage's process holds it for them.
    """
    import fcntl

    key = _lock_key(path)
    if key in _WRITER_LOCKS:
        return
    lock_path = _lock_path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StoreBusyError(
            f"{path} is being written by {holder}; wait for it to finish or stop it, then rerun"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}".encode())
    _WRITER_LOCKS[key] = fd


def _partial_dir(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _check_id(image_id: str) -> str:
    if not image_id or "/" in image_id or "\\" in image_id or image_id.startswith((".", "__")):
        raise ValueError(f"invalid image id {image_id!r} (no slashes, no leading '.' or '__')")
    return image_id


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in store attributes")
