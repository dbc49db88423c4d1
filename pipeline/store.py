"""Per-image artifact stores: one zip file per image holding its zarr v3 group, written atomically.

A store is a directory ``<name>.zarr`` holding ``zarr.json`` (the store attributes) and one file
``<image_id>.zip`` per image: a zarr v3 group (its arrays, chunks and attributes) packed in an
uncompressed zip, readable with ``zarr.open_group(zarr.storage.ZipStore(path))``. One file per
image and store, whatever the number of arrays or chunks, because DVC hashes, links and pushes
every file on its own (docs/stores.md has the measured cost). An image is first written
complete as ``<name>.zarr.partial/<random>.zip`` (same filesystem) and then renamed into place, so
a killed run leaves only complete images and readers never see half an image; a rewrite replaces
the file (never writes into it), so DVC's hardlinked or symlinked cache is never modified.
Store-level attributes record provenance; ``fingerprint`` identifies the parameters an image
depends on, and a store whose fingerprint differs from the current one is reset rather than
silently mixed. A store in the previous layout (one folder per image) is refused with one line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import MemoryStore, ZipStore

from pipeline.atomic import atomic_path, write_bytes_atomic
from pipeline.errors import PipelineError

_COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
# Below this size an array is stored raw: a compressor's header and its metadata cost more than
# it saves on per-mask vectors of a few dozen entries.
_MIN_COMPRESSED_BYTES = 1024
# Compact metadata: per-image groups hold several small arrays, and zarr's default indented
# zarr.json made metadata the larger part of a typical image's bytes.
_ZARR_CONFIG = {"json_indent": None}
#: Layout of the stores this code writes, recorded in the store's root attributes (under
#: ``_LAYOUT_KEY``, hidden from ``ImageStore.attrs``). Stores without it have the previous layout.
LAYOUT = "zip-per-image/1"
_LAYOUT_KEY = "wsss_store_layout"
IMAGE_SUFFIX = ".zip"
#: Group attribute of an image: the digest of what it was computed from (``ImageStore.todo``).
INPUTS_KEY = "inputs"
#: Group attribute of an image: the store fingerprint its task computed it for (``ImageStore.todo``).
FINGERPRINT_KEY = "store_fingerprint"
# Fixed member timestamps: the same arrays give the same bytes, so DVC hashes of a rerun (or of
# a dask run) equal those of the first run.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def with_inputs(attrs: Mapping[str, Any], inputs: str | None) -> dict:
    """An image's group attributes with the digest of its inputs (``INPUTS_KEY``) when known."""
    return {**attrs, INPUTS_KEY: inputs} if inputs is not None else dict(attrs)


class StoreRecord(NamedTuple):
    """What an image of a store records it was computed from."""

    inputs: str | None
    """The digest of its own inputs (``INPUTS_KEY``)."""
    fingerprint: str | None
    """The store fingerprint its task computed it for (``FINGERPRINT_KEY``)."""


class StoreError(PipelineError, RuntimeError):
    """A store exists but cannot be used as asked (wrong producer, unreadable, busy)."""


class StaleResultError(StoreError):
    """A task's result is for another store fingerprint than the store now has (the store was
    reset for new parameters while the task ran): it is not written."""


class StoreBusyError(StoreError):
    """Another process is writing the store."""


class LegacyLayoutError(StoreError):
    """The store has the previous layout (one folder of zarr files per image)."""


# Writer locks held by this process: store path -> open file descriptor (flock is released by the
# kernel when the process ends, however it ends).
_WRITER_LOCKS: dict[str, int] = {}


class ImageStore:
    """A directory of per-image zip files, each holding one zarr v3 group of arrays.

    Images are checked on open (:func:`check_image`): every zip member must be a zarr key of
    this layout, every array of a plain numeric dtype with this code's codecs, every chunk of the
    size its metadata implies; ``arrays`` (name -> (dtype, ndim)), when given, is what the reader
    expects each image to hold, and any other array, dtype or rank is refused. A file that fails
    raises StoreError naming it and the member. Stores travel through DVC remotes: their files
    are data to validate, not to trust.
    """

    def __init__(self, path: str | os.PathLike,
                 arrays: Mapping[str, tuple[str, int]] | None = None):
        self.path = Path(path)
        self._attrs = _read_root(self.path)
        self.arrays = None if arrays is None else {k: (str(np.dtype(d)), int(n))
                                                    for k, (d, n) in arrays.items()}

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def open_for_writing(cls, path: str | os.PathLike, attrs: Mapping[str, Any]) -> "ImageStore":
        """Open ``path`` for (resumed) writing with the given store attributes.

        ``attrs['fingerprint']`` must identify everything the stored images depend on. If the
        store exists with the same fingerprint, its complete images are kept (resume); otherwise
        it is recreated empty. A store of the previous layout raises :class:`LegacyLayoutError`
        (it may hold days of SAM masks: converting it is the user's call, see its message).
        """
        path = Path(path)
        attrs = _jsonable(dict(attrs))
        _lock_for_writing(path)
        old = None
        if (path / "zarr.json").exists():
            try:
                old = _read_root(path)
            except LegacyLayoutError:
                raise
            except StoreError:
                old = None  # unreadable root: not a store this code can resume, reset it
        if old is not None and old.get("fingerprint") == attrs.get("fingerprint"):
            if old != attrs:
                _write_root(path, attrs)
            shutil.rmtree(_partial_dir(path), ignore_errors=True)
            return cls(path)
        if path.exists():
            shutil.rmtree(path)
        shutil.rmtree(_partial_dir(path), ignore_errors=True)
        path.mkdir(parents=True)
        _write_root(path, attrs)
        return cls(path)

    # -- reading ----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    def image_path(self, image_id: str) -> Path:
        """The file holding image ``image_id`` (whether or not it exists yet)."""
        return self.path / f"{_check_id(image_id)}{IMAGE_SUFFIX}"

    def ids(self) -> list[str]:
        """Ids of the complete images, sorted."""
        n = len(IMAGE_SUFFIX)
        with os.scandir(self.path) as entries:
            return sorted(e.name[:-n] for e in entries
                          if e.name.endswith(IMAGE_SUFFIX) and e.is_file())

    def __contains__(self, image_id: str) -> bool:
        return self.image_path(image_id).is_file()

    def __len__(self) -> int:
        return len(self.ids())

    def read(self, image_id: str, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """The image's arrays (only ``names`` when given: large arrays stay unread)."""
        with self._open(image_id) as store:
            group = zarr.open_group(store=store, mode="r")
            if names is None:
                names = tuple(name for name, _ in group.arrays())
            return {name: self._decode(image_id, name, lambda: group[name][...]) for name in names}

    def read_array(self, image_id: str, name: str, index: Any = None) -> np.ndarray:
        """Array ``name`` of one image, or only ``array[index]``: a store written with one chunk
        per leading index (``write_group(..., chunks=...)``) then reads and decompresses just
        that chunk (one zip member). Opens the array directly (no group listing)."""
        with self._open(image_id) as store:
            arr = zarr.open_array(store=store, path=name, mode="r")
            return self._decode(image_id, name, lambda: arr[...] if index is None else arr[index])

    def _decode(self, image_id: str, name: str, read) -> np.ndarray:
        """``read()``, with a chunk that does not decode (corrupt compressed bytes) as StoreError."""
        try:
            return read()
        except (ValueError, RuntimeError, TypeError) as exc:
            raise StoreError(f"{self.image_path(image_id)}: array {name!r} does not decode "
                             f"({_first_line(exc)}); {_RECOMPUTE}") from exc

    def recorded_inputs(self, image_id: str) -> str | None:
        """The digest of what image ``image_id`` was computed from (its group attribute
        ``inputs``, see :meth:`todo`); None when it recorded none. Reads one zip member."""
        return self.record(image_id).inputs

    def record(self, image_id: str) -> StoreRecord:
        """What image ``image_id`` records it was computed from (its inputs' digest and the
        store fingerprint of its task; None where it recorded none). Reads one zip member."""
        path = self.image_path(image_id)
        try:
            with zipfile.ZipFile(path) as zf:
                doc = json.loads(zf.read("zarr.json"))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise StoreError(f"cannot read {path}: {exc} (delete the file and rerun the stage "
                             "to recompute this image)") from exc
        attributes = doc.get("attributes", {}) if isinstance(doc, dict) else {}
        inputs, fp = attributes.get(INPUTS_KEY), attributes.get(FINGERPRINT_KEY)
        return StoreRecord(inputs if isinstance(inputs, str) else None,
                           fp if isinstance(fp, str) else None)

    def todo(self, inputs: Mapping[str, str]) -> list[str]:
        """The ids of ``inputs`` (image id -> digest of what the image is computed from) that
        this store lacks or holds computed from other inputs or for another store fingerprint:
        what a resumed stage computes.

        The store fingerprint covers what all images share (parameters, models, code); the
        per-image digest covers what is the image's own (its content, its labels, the upstream
        artifact it reads), so an image replaced under the same id is recomputed, not served
        stale, and only the images whose inputs changed are. Each image also records the store
        fingerprint its task was given (``FINGERPRINT_KEY``): a result that a task started before
        a reset wrote afterwards (a dask task cannot be cancelled once running) is recomputed,
        never kept; so is an image that records none.
        """
        stored = set(self.ids())
        current = self._attrs.get("fingerprint")
        todo = []
        for i, digest in inputs.items():
            if i not in stored:
                todo.append(i)
                continue
            record = self.record(i)
            if record.inputs != digest or (current is not None and record.fingerprint != current):
                todo.append(i)
        return todo

    def read_attrs(self, image_id: str) -> dict:
        with self._open(image_id) as store:
            return dict(zarr.open_group(store=store, mode="r").attrs)

    @contextmanager
    def _open(self, image_id: str) -> Iterator[ZipStore]:
        path = self.image_path(image_id)
        if not path.is_file():
            raise KeyError(f"image {image_id!r} is not in {self.path}")
        store = ZipStore(path, mode="r")
        try:
            store._sync_open()
        except (OSError, zipfile.BadZipFile) as exc:
            raise StoreError(f"cannot read {path}: {exc} ({_RECOMPUTE})") from exc
        try:
            check_image(path, store._zf, self.arrays)
            yield store
        finally:
            store.close()

    # -- writing ----------------------------------------------------------------------------
    def write(
        self, image_id: str, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None
    ) -> None:
        """Write one image's arrays atomically (replacing an existing image of that id)."""
        write_group(self.path, image_id, arrays, attrs)


_RECOMPUTE = "delete the file and rerun the stage to recompute this image"
_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                     "uint64", "float16", "float32", "float64"})
"""The data types a store array may have: plain numbers (no strings, objects or structs)."""
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_MEMBER = re.compile(rf"zarr\.json|(?P<array>{_NAME})/(?:zarr\.json|c(?P<chunk>(?:/\d+)*))")
_BLOSC_HEADER = 16
# Image files already checked in this process, by (path, inode, size, mtime, expected arrays):
# files are only ever replaced, never edited, so a replaced file is checked again.
_CHECKED: dict[tuple, None] = {}
_CHECKED_MAX = 1 << 16


def check_image(path: Path, zf: zipfile.ZipFile,
                arrays: Mapping[str, tuple[str, int]] | None = None) -> None:
    """Raise StoreError (one line naming ``path`` and the member) unless the image file holds
    only what this code writes: ``zarr.json`` and, per array, ``<name>/zarr.json`` (zarr v3, a
    dtype of :data:`_DTYPES`, a regular chunk grid, the codecs ``bytes`` [+ ``blosc``]) and
    chunks ``<name>/c/<i>/...`` inside the grid whose size (raw, or the blosc header's decoded
    size) is what the metadata implies. ``arrays``: name -> (dtype, ndim) the caller expects.
    Uses the zip directory already read and the members' metadata; a file is checked once per
    process (until it is replaced)."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns,
           None if arrays is None else tuple(sorted(arrays.items())))
    if key in _CHECKED:
        return
    infos = zf.infolist()

    def bad(member: str, reason: str) -> StoreError:
        return StoreError(f"{path}: member {member!r} {reason}; {_RECOMPUTE}")

    chunks: dict[str, list[zipfile.ZipInfo]] = {}
    names = {info.filename for info in infos}
    if "zarr.json" not in names:
        raise bad("zarr.json", "is missing (not an image group of this store)")
    for info in infos:
        match = _MEMBER.fullmatch(info.filename)
        if match is None or info.filename.startswith("__"):
            raise bad(info.filename, "is not a zarr key of this layout (zarr.json, <array>/zarr.json, "
                      "<array>/c/...)")
        if info.compress_type != zipfile.ZIP_STORED:
            raise bad(info.filename, "is compressed in the zip (this layout stores members as they are)")
        if match["array"] is not None:
            chunks.setdefault(match["array"], [])
            if match["chunk"] is not None:
                chunks[match["array"]].append(info)
    root = _member_json(path, zf, "zarr.json", bad)
    if root.get("zarr_format") != 3 or root.get("node_type") != "group":
        raise bad("zarr.json", "is not a zarr v3 group")
    for name, chunk_infos in chunks.items():
        meta_key = f"{name}/zarr.json"
        if meta_key not in names:
            raise bad(chunk_infos[0].filename, f"has no array metadata ({meta_key})")
        meta = _member_json(path, zf, meta_key, bad)
        dtype, shape, chunk_shape, compressed = _array_meta(meta, lambda r: bad(meta_key, r))
        if arrays is not None:
            if name not in arrays:
                raise bad(meta_key, f"is an unexpected array (expected {', '.join(sorted(arrays))})")
            want = arrays[name]
            if (dtype, len(shape)) != want:
                raise bad(meta_key, f"has dtype {dtype} and {len(shape)} dimensions, expected "
                          f"{want[0]} and {want[1]}")
        grid = [-(-n // c) if c else 0 for n, c in zip(shape, chunk_shape)]
        raw = int(np.prod(chunk_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        for info in chunk_infos:
            index = [int(i) for i in info.filename.split("/")[2:]]
            if len(index) != len(shape) or any(i >= g for i, g in zip(index, grid)):
                raise bad(info.filename, f"is not a chunk of the array's grid {grid}")
            if not compressed:
                if info.file_size != raw:
                    raise bad(info.filename, f"has {info.file_size} bytes, its {dtype} chunk "
                              f"{list(chunk_shape)} has {raw}")
                continue
            with zf.open(info) as f:
                header = f.read(_BLOSC_HEADER)
            decoded = int.from_bytes(header[4:8], "little") if len(header) == _BLOSC_HEADER else -1
            stored = int.from_bytes(header[12:16], "little") if len(header) == _BLOSC_HEADER else -1
            if decoded != raw or stored != info.file_size:
                raise bad(info.filename, f"decodes to {decoded} bytes in {info.file_size} (blosc "
                          f"header says {stored}), its {dtype} chunk {list(chunk_shape)} has {raw}")
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[key] = None


def _member_json(path: Path, zf: zipfile.ZipFile, member: str, bad) -> dict:
    info = zf.getinfo(member)
    if info.file_size > 1 << 20:  # metadata is a few hundred bytes; attributes a few kB
        raise bad(member, f"is {info.file_size} bytes, too large for zarr metadata")
    try:
        doc = json.loads(zf.read(info))
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise bad(member, f"is not JSON ({_first_line(exc)})") from exc
    if not isinstance(doc, dict):
        raise bad(member, "is not a JSON object")
    return doc


def _array_meta(meta: dict, bad) -> tuple[str, tuple[int, ...], tuple[int, ...], bool]:
    """(dtype, shape, chunk shape, blosc-compressed) of an array's zarr.json, as this code
    writes it; anything else raises ``bad(reason)``."""
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise bad("is not zarr v3 array metadata")
    dtype = meta.get("data_type")
    if dtype not in _DTYPES:
        raise bad(f"has data type {dtype!r}, not one of {', '.join(sorted(_DTYPES))}")
    shape, grid = meta.get("shape"), meta.get("chunk_grid") or {}
    chunk_shape = (grid.get("configuration") or {}).get("chunk_shape")
    if (grid.get("name") != "regular" or not _int_list(shape) or not _int_list(chunk_shape)
            or len(shape) != len(chunk_shape)):
        raise bad(f"has shape {shape!r} and chunk grid {grid!r}, not a regular grid of the shape")
    encoding = meta.get("chunk_key_encoding") or {}
    if (encoding.get("name") != "default"
            or (encoding.get("configuration") or {}).get("separator", "/") != "/"):
        raise bad(f"has chunk key encoding {encoding!r} (this layout: default, '/')")
    if meta.get("storage_transformers"):
        raise bad("has storage transformers (this layout has none)")
    codecs = [c.get("name") if isinstance(c, dict) else c for c in meta.get("codecs") or []]
    if codecs not in (["bytes"], ["bytes", "blosc"]):
        raise bad(f"has codecs {codecs!r} (this layout: bytes, optionally blosc)")
    endian = ((meta["codecs"][0] if isinstance(meta["codecs"][0], dict) else {})
              .get("configuration") or {}).get("endian", "little")
    if endian != "little":
        raise bad(f"has {endian}-endian bytes (this layout: little)")
    return dtype, tuple(shape), tuple(chunk_shape), codecs[-1] == "blosc"


def _int_list(value) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def write_group(
    store_path: str | os.PathLike,
    image_id: str,
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any] | None = None,
    chunks: Mapping[str, tuple[int, ...]] | None = None,
    fingerprint: str | None = None,
) -> None:
    """Write ``arrays`` as image ``image_id`` of the store at ``store_path``, atomically.

    Each array is one chunk unless ``chunks`` gives its chunk shape (e.g. one chunk per cached
    view, so a reader of one view decompresses only that one). The group is encoded in memory,
    written as one zip file under the store's ``.partial`` folder and renamed into place. A
    function of paths only, so dask workers in other processes can call it.

    ``fingerprint``: the store fingerprint the task computed the image for. It is recorded with
    the image (``FINGERPRINT_KEY``), and when the store's fingerprint is another one by the time
    the image is complete (the store was reset for new parameters while the task ran), nothing
    is written and :class:`StaleResultError` is raised. A rename racing a reset is still caught:
    the image then records the old fingerprint, and :meth:`ImageStore.todo` recomputes it.
    """
    store_path = Path(store_path)
    final = store_path / f"{_check_id(image_id)}{IMAGE_SUFFIX}"
    if fingerprint is not None:
        attrs = {**(attrs or {}), FINGERPRINT_KEY: fingerprint}
    members = _encode_group(arrays, attrs, chunks or {})
    # Disk full, read-only, killed: nothing half-written stays behind.
    with atomic_path(final, _partial_dir(store_path) / f"{image_id}.{uuid.uuid4().hex}{IMAGE_SUFFIX}") as tmp:
        _write_zip(tmp, members)
        if fingerprint is not None:
            current = _read_root(store_path).get("fingerprint")
            if current != fingerprint:
                raise StaleResultError(
                    f"image {image_id} was computed for store fingerprint {fingerprint} but "
                    f"{store_path} now has {current} (reset while the task ran): not written")


def _encode_group(arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None,
                  chunks: Mapping[str, tuple[int, ...]]) -> dict[str, bytes]:
    """The zarr v3 group of one image as {key: bytes}: exactly what zarr writes to a directory."""
    buffers: dict = {}
    with zarr.config.set(_ZARR_CONFIG):
        group = zarr.open_group(store=MemoryStore(buffers), mode="w", zarr_format=3)
        if attrs:
            group.attrs.put(_jsonable(dict(attrs)))
        for name, value in arrays.items():
            value = np.asarray(value)  # not ascontiguousarray: it turns 0-d scalars into (1,)
            if not value.flags.c_contiguous:
                value = value.copy(order="C")
            compress = value.ndim > 0 and value.nbytes >= _MIN_COMPRESSED_BYTES
            # One chunk per array by default: images are read whole.
            arr = group.create_array(
                name,
                shape=value.shape,
                dtype=value.dtype,
                chunks=tuple(chunks.get(name, value.shape)) if value.ndim else (),
                compressors=[_COMPRESSOR] if compress else None,
            )
            arr[...] = value
    return {key: buf.to_bytes() for key, buf in buffers.items()}


def _write_zip(path: Path, members: Mapping[str, bytes]) -> None:
    # Stored, not deflated: chunks are compressed already, and the zip then holds exactly the
    # bytes zarr would have written to a directory (``unzip`` gives a plain zarr group).
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in sorted(members):
            info = zipfile.ZipInfo(key, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, members[key])


def _read_root(path: Path) -> dict:
    """The store attributes of ``path`` (layout marker removed), or StoreError in one line."""
    root = path / "zarr.json"
    if not root.is_file():
        raise StoreError(f"no store at {path} (run the stage that produces it first)")
    try:
        attributes = json.loads(root.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise StoreError(f"cannot read {root}: {exc}") from exc
    layout = attributes.pop(_LAYOUT_KEY, None)
    if layout is None:
        raise LegacyLayoutError(
            f"{path} has the old store layout (one folder per image): convert it in place with "
            f"`wsss migrate-store {path}` (keeps every image), or delete it (rm -r {path}) and "
            "rerun `dvc repro`")
    if layout != LAYOUT:
        raise StoreError(f"{path} has store layout {layout!r}, this code reads {LAYOUT!r}: "
                         "update the code, or delete the store and rerun `dvc repro`")
    return attributes


def _write_root(path: Path, attrs: Mapping[str, Any]) -> None:
    """The store's ``zarr.json`` (a zarr v3 group holding the attributes), replaced atomically:
    under DVC's hardlink/symlink cache the old file is the cache's copy and must not be edited."""
    doc = {"zarr_format": 3, "node_type": "group",
           "attributes": {**attrs, _LAYOUT_KEY: LAYOUT}}
    tmp = _partial_dir(path) / f"zarr.json.{uuid.uuid4().hex}"
    write_bytes_atomic(path / "zarr.json", json.dumps(doc).encode(), tmp)
    try:
        tmp.parent.rmdir()  # nothing of the store's temporary folder stays when it is empty
    except OSError:
        pass


def migrate_legacy(path: str | os.PathLike) -> int:
    """Convert a store of the previous layout (one folder per image) to this one, in place.

    Each image's arrays, chunk shapes and attributes are rewritten as its zip (same codecs, so
    the same bytes per chunk), then its folder is removed; the layout marker is written last, so
    a killed migration is resumed by running it again. Returns the number of images converted.
    """
    path = Path(path)
    _lock_for_writing(path)
    try:
        _read_root(path)
        return 0  # already in this layout
    except LegacyLayoutError:
        pass
    attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    converted = 0
    for entry in sorted(p for p in path.iterdir() if p.is_dir()):
        if (entry / "zarr.json").is_file():
            group = zarr.open_group(str(entry), mode="r")
            arrays = {name: arr[...] for name, arr in group.arrays()}
            chunks = {name: arr.chunks for name, arr in group.arrays()
                      if arr.ndim and arr.chunks != arr.shape}
            write_group(path, entry.name, arrays, dict(group.attrs), chunks)
            converted += 1
        shutil.rmtree(entry)
    _write_root(path, attrs)
    return converted


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
