"""``wsss import-cams``: CAMs of another method (one ``<id>.npz`` per image) -> a CAM store.

Each file holds ``cam`` (P, h, w), float, at any resolution (seeding resizes it to the image) and
``fg_cls`` (P,), the strictly ascending 0-based classes of its channels. Every file is validated
before anything is written, so a bad file leaves no half-imported store. The store has the layout
of ``cache/cams/*.zarr`` (``cam`` + ``fg_cls``, ``height``/``width`` attrs from the index), so
``wsss seeds --cams <out>`` seeds it with SAMS.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np
from tqdm.auto import tqdm

from pipeline.data.datasets import DatasetError, Record, load_split
from pipeline.errors import PipelineError
from pipeline.provenance import fingerprint, package_version
from pipeline.store import ImageStore, finish
from stages.params import INDEX_OPTION

log = logging.getLogger("wsss.import_cams")
STAGE = "import_cams"


def _index_records(index_dir: Path, splits: tuple[str, ...]) -> tuple[dict[str, Record], int]:
    """Usable records of the given splits (default: every split of the index) and class count."""
    names = splits or tuple(sorted(p.stem for p in index_dir.glob("*.json")))
    if not names:
        raise PipelineError(f"no split index in {index_dir} (run `wsss prepare` first)")
    records: dict[str, Record] = {}
    n_classes = None
    for name in names:
        try:
            split = load_split(index_dir, name)
        except (DatasetError, ValueError, KeyError) as exc:
            raise PipelineError(f"cannot read index {name!r}: {exc}") from exc
        n_classes = len(split.class_names)
        for r in split.good():
            records.setdefault(r.id, r)
    return records, int(n_classes)


EXPECTED_FORMAT = ("a numpy .npz archive with arrays 'cam' (P, h, w) float and 'fg_cls' (P,) int, "
                   "e.g. np.savez(path, cam=cam, fg_cls=fg_cls)")


def load_cam_file(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cam float32 (P, h, w), fg_cls int64 (P,))`` of one file; PipelineError names the problem."""
    import zipfile

    # np.load guesses the format from the first bytes and reports anything that is not an array
    # file as "pickled data"; an .npz is a zip archive, so ask that first.
    if not zipfile.is_zipfile(path):
        kind = "a single .npy array" if path.read_bytes()[:6] == b"\x93NUMPY" else "not an .npz archive"
        raise PipelineError(f"{path}: {kind}; expected {EXPECTED_FORMAT}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("cam", "fg_cls") if k not in data.files]
            if missing:
                raise PipelineError(f"{path}: missing array {missing[0]!r} (has {', '.join(data.files) or 'none'}); "
                                 f"expected {EXPECTED_FORMAT}")
            cam, fg_cls = data["cam"], data["fg_cls"]
        if not isinstance(cam, np.ndarray) or not isinstance(fg_cls, np.ndarray):
            raise ValueError("members are not .npy arrays")
    except PipelineError:
        raise
    except Exception as exc:  # a corrupt archive or object arrays: one line, not a traceback
        raise PipelineError(f"{path}: unreadable .npz ({type(exc).__name__}); expected {EXPECTED_FORMAT}") from exc
    if cam.ndim != 3 or min(cam.shape[1:], default=0) < 1:
        raise PipelineError(f"{path}: 'cam' must be (P, h, w) with h, w >= 1, got {cam.shape}")
    if not np.issubdtype(cam.dtype, np.floating):
        raise PipelineError(f"{path}: 'cam' must be floating point, got {cam.dtype}")
    if not np.isfinite(cam).all():
        raise PipelineError(f"{path}: 'cam' holds NaN or infinite values")
    if fg_cls.ndim != 1 or fg_cls.shape[0] != cam.shape[0]:
        raise PipelineError(f"{path}: 'fg_cls' must be ({cam.shape[0]},) to match 'cam', "
                            f"got {fg_cls.shape}")
    if fg_cls.size and not np.issubdtype(fg_cls.dtype, np.integer):
        raise PipelineError(f"{path}: 'fg_cls' must be integer class indices, got {fg_cls.dtype}")
    fg_cls = fg_cls.astype(np.int64)
    if fg_cls.size and (np.any(np.diff(fg_cls) <= 0) or fg_cls[0] < 0 or fg_cls[-1] >= n_classes):
        raise PipelineError(f"{path}: 'fg_cls' must be strictly ascending 0-based classes below "
                            f"{n_classes}, got {fg_cls.tolist()}")
    return cam.astype(np.float32), fg_cls


@click.command("import-cams")
@click.argument("cam_dir", type=click.Path(file_okay=False))
@INDEX_OPTION
@click.option("--split", "splits", multiple=True,
              help="Split(s) the ids must belong to (default: every split of the index).")
@click.option("--out", default="cache/cams/imported.zarr", show_default=True,
              type=click.Path(file_okay=False), help="CAM store to write.")
def command(cam_dir: str, index_dir: str, splits: tuple[str, ...], out: str) -> None:
    """Import external CAMs (``<id>.npz`` with ``cam`` and ``fg_cls``) into a CAM store."""
    src = Path(cam_dir)
    if not src.is_dir():
        raise PipelineError(f"CAM directory not found: {src}")
    files = sorted(src.glob("*.npz"))
    if not files:
        raise PipelineError(f"no <id>.npz files in {src}")
    records, n_classes = _index_records(Path(index_dir), splits)
    unknown = [p.stem for p in files if p.stem not in records]
    if unknown:
        raise PipelineError(f"{len(unknown)} CAM file(s) name images not in the index, e.g. "
                            f"{unknown[0]!r} ({src / (unknown[0] + '.npz')})")
    for path in tqdm(files, desc="validate cams", unit="img", dynamic_ncols=True):
        load_cam_file(path, n_classes)
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    attrs = {"stage": STAGE, "source": str(src.resolve()), "n_classes": n_classes,
             "package_version": package_version(), "fingerprint": fingerprint(listing)}
    store = ImageStore.open_for_writing(out, attrs)
    for path in tqdm(files, desc="import cams", unit="img", dynamic_ncols=True):
        cam, fg_cls = load_cam_file(path, n_classes)
        r = records[path.stem]
        store.write(r.id, {"cam": cam, "fg_cls": fg_cls}, {"height": r.height, "width": r.width})
    finish(out)
    log.info("import-cams: %d images from %s into %s (%d indexed images have no CAM file)",
             len(files), src, out, len(records) - len(files))
