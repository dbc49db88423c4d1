"""Benchmark of the per-image store layout at dataset scale: one zip file per image and store
(``pipeline/store.py``) against the previous layout, one folder of zarr files per image (its
write and read code kept below as ``legacy``, as ``benchmarks/sam_masks.py`` keeps stock AMG).

N synthetic images (``--images``) are written into three stores per layout, with the stages' own
writers for the new layout (``pipeline.schemas.write_masks``, ``write_views`` and ``write_cams``)
and the legacy ``write_group`` for the old one, over the same arrays, chunks and codecs:

- ``sam_masks.zarr``: 40 quasi-superpixels per 375x500 image (filled ellipses, unique per image)
  with the stage's seven arrays;
- ``train_views.zarr``: K views (``--views``, 16 as for VOC) of 197 tokens x D fp16 (``--width``;
  the default 64 is the embedded tiny CLIP's, 768 is ViT-B/16's: 4.8 MB per image), one chunk per
  view, plus the view parameters and labels;
- ``cams.zarr``: ``cam`` and ``cam_caa`` for 2 classes on a 24x32 grid, ``fg_cls``.

Each layout then goes into its own fresh git + DVC project (``tests/dvc_project.py``'s, without
the graph: the repository's ``.dvc/config``, so the same cache link type for both) and is timed:
``dvc add`` of the three stores (hashing and committing to the cache), a no-op ``dvc status``,
``dvc push`` to a local-directory remote and ``dvc pull`` into an empty cache and workspace. Reads
are timed on the written stores (page cache warm, medians, the two layouts interleaved call by
call over the same random images, since the machine may be shared): one whole image of
``sam_masks`` (its seven arrays) and one view of ``train_views`` (one tokens chunk). A spot check
asserts that every chunk and metadata file of the legacy group is byte-identical to the same
member of the new image's zip.

Prints, per layout: files (and folders) per image, bytes on disk per image (allocated blocks, as
``du``; apparent size beside), seconds of each DVC operation (total and per image), read times,
and the files and DVC times projected (computed, not measured) to VOC train_aug + val and COCO
2014 train + val. Last lines: ``RATIO <name>=<legacy/new>`` (above 1: the new layout is smaller or
faster), ending with ``RATIO store_files`` and ``RATIO dvc_push``.

Run: ``.venv/bin/python benchmarks/stores.py --images 500`` (default 50).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from harness import REPO, dvc_env, make_project, ratio_line, sh, time_interleaved

STORES = ("sam_masks.zarr", "train_views.zarr", "cams.zarr")
HEIGHT, WIDTH, N_MASKS, GRID = 375, 500, 40, (24, 32)
#: Image counts the per-image figures are projected to (every image counted in all three stores:
#: an upper bound, as eval images have SAM masks but no train views or CAMs).
DATASETS = {"VOC train_aug + val": 10_582 + 1_449, "COCO 2014 train + val": 82_783 + 40_504}


# -- legacy: the previous layout, pipeline/store.py before the zip-per-image change -----------------
class legacy:  # noqa: N801  (a namespace, named as the issue and the README call it)
    """One zarr v3 group folder per image, one file per array chunk and per zarr.json."""

    @staticmethod
    def _config():
        import zarr
        from zarr.codecs import BloscCodec

        return zarr, BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), {"json_indent": None}

    @staticmethod
    def create(path: Path, attrs: Mapping[str, Any]) -> None:
        zarr, _, config = legacy._config()
        path.parent.mkdir(parents=True, exist_ok=True)
        with zarr.config.set(config):
            root = zarr.open_group(str(path), mode="w", zarr_format=3)
            root.attrs.put(dict(attrs))

    @staticmethod
    def write_group(store_path, image_id: str, arrays: Mapping[str, np.ndarray],
                    attrs: Mapping[str, Any] | None = None,
                    chunks: Mapping[str, tuple[int, ...]] | None = None) -> None:
        zarr, compressor, config = legacy._config()
        store_path = Path(store_path)
        final = store_path / image_id
        tmp = store_path.with_name(store_path.name + ".partial") / f"{image_id}.{uuid.uuid4().hex}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        chunks = chunks or {}
        try:
            with zarr.config.set(config):
                group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
                if attrs:
                    group.attrs.put(json.loads(json.dumps(dict(attrs))))
                for name, value in arrays.items():
                    value = np.asarray(value)
                    if not value.flags.c_contiguous:
                        value = value.copy(order="C")
                    compress = value.ndim > 0 and value.nbytes >= 1024
                    arr = group.create_array(
                        name, shape=value.shape, dtype=value.dtype,
                        chunks=tuple(chunks.get(name, value.shape)) if value.ndim else (),
                        compressors=[compressor] if compress else None)
                    arr[...] = value
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    @staticmethod
    def read(store_path, image_id: str) -> dict[str, np.ndarray]:
        zarr, _, _ = legacy._config()
        if not (Path(store_path) / image_id / "zarr.json").exists():
            raise KeyError(image_id)
        group = zarr.open_group(str(Path(store_path) / image_id), mode="r")
        return {name: arr[...] for name, arr in group.arrays()}

    @staticmethod
    def read_array(store_path, image_id: str, name: str, index: Any = None) -> np.ndarray:
        zarr, _, _ = legacy._config()
        if not (Path(store_path) / image_id / "zarr.json").exists():
            raise KeyError(image_id)
        arr = zarr.open_array(str(Path(store_path) / image_id / name), mode="r")
        return arr[...] if index is None else arr[index]


# -- synthetic images ------------------------------------------------------------------------------
def sam_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """40 filled ellipses on a 375x500 image with the stage's seven arrays (unique per image)."""
    masks = np.zeros((N_MASKS, HEIGHT, WIDTH), bool)
    boxes = np.zeros((N_MASKS, 4), np.int64)
    for s in range(N_MASKS):
        ry, rx = rng.integers(6, 120, size=2)
        cy, cx = rng.integers(0, HEIGHT), rng.integers(0, WIDTH)
        y0, y1, x0, x1 = max(cy - ry, 0), min(cy + ry + 1, HEIGHT), max(cx - rx, 0), min(cx + rx + 1, WIDTH)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        masks[s, y0:y1, x0:x1] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        boxes[s] = (x0, y0, x1 - 1 - x0, y1 - 1 - y0)
    return {
        "masks": masks, "levels": np.sort(rng.integers(0, 3, N_MASKS).astype(np.uint8))[::-1].copy(),
        "predicted_iou": rng.random(N_MASKS, dtype=np.float32),
        "stability_score": rng.random(N_MASKS, dtype=np.float32), "bbox_xywh": boxes,
        "point_coords": rng.random((N_MASKS, 2)) * (WIDTH, HEIGHT),
        "crop_box_xywh": np.tile(np.array([0, 0, WIDTH, HEIGHT], np.int64), (N_MASKS, 1)),
    }


def view_arrays(rng: np.random.Generator, k: int, width: int) -> dict[str, np.ndarray]:
    labels = np.zeros(20, np.uint8)
    labels[rng.choice(20, 2, replace=False)] = 1
    return {"tokens": (rng.standard_normal((k, 197, width)) * 0.5).astype(np.float16),
            "views": rng.random((k, 18), dtype=np.float32), "labels": labels}


def cam_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"cam": rng.random((2, *GRID), dtype=np.float32),
            "fg_cls": np.sort(rng.choice(20, 2, replace=False)).astype(np.int64),
            "cam_caa": rng.random((2, *GRID), dtype=np.float32)}


def write_stores(root: Path, layout: str, n: int, k: int, width: int, seed: int = 0) -> float:
    """The three stores of N images under ``root`` in ``layout`` ('legacy' or 'new'); seconds."""
    from pipeline.sam.quasi_superpixels import QuasiSuperpixels
    from pipeline.store import ImageStore, finish
    from pipeline.schemas import write_cams, write_views
    from pipeline.schemas import write_masks

    paths = {name: root / name for name in STORES}
    for name, path in paths.items():
        attrs = {"stage": "benchmark", "fingerprint": name}
        legacy.create(path, attrs) if layout == "legacy" else ImageStore.open_for_writing(path, attrs)
    rng = np.random.default_rng(seed)
    size = {"height": HEIGHT, "width": WIDTH}
    spent = 0.0
    for i in range(n):
        image_id = f"img_{i:06d}"
        sam, views, cams = sam_arrays(rng), view_arrays(rng, k, width), cam_arrays(rng)
        start = time.perf_counter()
        if layout == "legacy":
            legacy.write_group(paths["sam_masks.zarr"], image_id, sam, size)
            legacy.write_group(paths["train_views.zarr"], image_id, views, size,
                               chunks={"tokens": (1, *views["tokens"].shape[1:])})
            legacy.write_group(paths["cams.zarr"], image_id, cams, size)
        else:
            write_masks(str(paths["sam_masks.zarr"]), image_id, QuasiSuperpixels(**sam), HEIGHT, WIDTH)
            write_views(str(paths["train_views.zarr"]), image_id, views["tokens"], views["views"],
                        views["labels"], HEIGHT, WIDTH)
            write_cams(str(paths["cams.zarr"]), image_id, cams, HEIGHT, WIDTH)
        spent += time.perf_counter() - start
    for path in paths.values():
        if layout == "legacy":
            shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)
        else:
            finish(path)
    return spent


def same_bytes(legacy_root: Path, new_root: Path, image_id: str) -> bool:
    """Every file of the legacy group equals the same-named member of the new image's zip."""
    from pipeline.store import ImageStore

    for name in STORES:
        group = legacy_root / name / image_id
        files = {str(p.relative_to(group)): p.read_bytes() for p in group.rglob("*") if p.is_file()}
        with zipfile.ZipFile(ImageStore(new_root / name).image_path(image_id)) as zf:
            members = {m: zf.read(m) for m in zf.namelist()}
        if files != members:
            return False
    return True


def disk_use(root: Path) -> dict[str, int]:
    """Files, folders, allocated bytes (st_blocks, as du) and apparent bytes under ``root``."""
    files = dirs = blocks = apparent = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirs += len(dirnames)
        blocks += os.lstat(dirpath).st_blocks * 512
        for f in filenames:
            st = os.lstat(os.path.join(dirpath, f))
            files += 1
            blocks += st.st_blocks * 512
            apparent += st.st_size
    return {"files": files, "dirs": dirs, "disk": blocks, "apparent": apparent}


# -- DVC ---------------------------------------------------------------------------------------------
def _run(args, cwd: Path, env: dict) -> float:
    """Seconds of one command, which must succeed."""
    start = time.perf_counter()
    sh(*args, cwd=cwd, env=env, timeout=None)
    return time.perf_counter() - start


def dvc_times(project: Path, remote: Path, env: dict) -> dict[str, float]:
    """add (hash + commit), no-op status, push to ``remote``, pull into an empty cache and
    workspace: seconds each."""
    stores = [f"stores/{name}" for name in STORES]
    times = {"add": _run(["dvc", "add", *stores], project, env)}
    times["status"] = _run(["dvc", "status"], project, env)
    _run(["dvc", "remote", "add", "-d", "bench", remote], project, env)
    times["push"] = _run(["dvc", "push"], project, env)
    shutil.rmtree(project / ".dvc" / "cache")
    for store in stores:
        shutil.rmtree(project / store)
    times["pull"] = _run(["dvc", "pull"], project, env)
    return times


def read_times(workdir: Path, ids: list[str], k: int, reads: int) -> dict[str, dict[str, float]]:
    """Median seconds of reading one whole image of sam_masks and one view of train_views, both
    layouts timed interleaved (the same random images and views, load changes hit both alike)."""
    from pipeline.store import ImageStore

    rng = np.random.default_rng(1)
    picks = [(ids[int(i)], int(j)) for i, j in zip(rng.integers(0, len(ids), reads),
                                                   rng.integers(0, k, reads))]
    step = {"n": 0}

    def pick():
        return picks[step["n"] % len(picks)]

    old, new = workdir / "legacy" / "stores", workdir / "new" / "stores"
    sam, views = ImageStore(new / "sam_masks.zarr"), ImageStore(new / "train_views.zarr")

    def advance():
        step["n"] += 1

    fns = [
        lambda: legacy.read(old / "sam_masks.zarr", pick()[0]),
        lambda: sam.read(pick()[0]),
        lambda: legacy.read_array(old / "train_views.zarr", pick()[0], "tokens", pick()[1]),
        lambda: (views.read_array(pick()[0], "tokens", pick()[1]), advance()),
    ]
    t = time_interleaved(fns, reads, warmup=2)
    return {"legacy": {"image": t[0], "view": t[2]}, "new": {"image": t[1], "view": t[3]}}


def run(n: int, k: int, width: int, reads: int, workdir: Path) -> dict:
    results = {}
    for layout in ("legacy", "new"):
        project = workdir / layout
        env = dvc_env(workdir / "home")
        make_project(project, env, graph=False)
        write_s = write_stores(project / "stores", layout, n, k, width)
        results[layout] = {"write": write_s, **disk_use(project / "stores")}
    assert same_bytes(workdir / "legacy" / "stores", workdir / "new" / "stores", "img_000000"), \
        "the two layouts hold different bytes"
    for layout, times in read_times(workdir, [f"img_{i:06d}" for i in range(n)], k, reads).items():
        results[layout]["reads"] = times
    for layout in ("legacy", "new"):
        results[layout]["dvc"] = dvc_times(workdir / layout, workdir / f"remote_{layout}",
                                           dvc_env(workdir / "home"))
    return results


def report(results: dict, n: int) -> list[str]:
    lines = []
    for layout, r in results.items():
        d = r["dvc"]
        lines.append(
            f"{layout:6s}: {r['files'] / n:.2f} files and {r['dirs'] / n:.2f} folders per image, "
            f"{r['disk'] / n / 1024:.1f} KiB on disk per image ({r['apparent'] / n / 1024:.1f} KiB "
            f"apparent), write {1e3 * r['write'] / n:.1f} ms per image")
        lines.append(
            f"{layout:6s}: dvc add {d['add']:.2f} s, no-op status {d['status']:.2f} s, push "
            f"{d['push']:.2f} s, pull {d['pull']:.2f} s for {n} images; per image: "
            + ", ".join(f"{op} {1e3 * d[op] / n:.2f} ms" for op in ("add", "status", "push", "pull")))
        lines.append(
            f"{layout:6s}: read one image (sam_masks, 7 arrays) {1e3 * r['reads']['image']:.2f} ms, "
            f"one view (train_views tokens) {1e3 * r['reads']['view']:.2f} ms (medians)")
    for name, count in DATASETS.items():
        parts = []
        for layout, r in results.items():
            d = r["dvc"]
            parts.append(f"{layout} {r['files'] / n * count:,.0f} files, "
                         f"{r['disk'] / n * count / 2**30:.1f} GiB at these array sizes, add "
                         f"{d['add'] / n * count / 60:.0f} min, push {d['push'] / n * count / 60:.0f} min, "
                         f"pull {d['pull'] / n * count / 60:.0f} min")
        lines.append(f"computed for {name} ({count:,} images, local remote): " + "; ".join(parts))
    old, new = results["legacy"], results["new"]
    ratios = {
        "disk_per_image": old["disk"] / new["disk"],
        "read_image": old["reads"]["image"] / new["reads"]["image"],
        "read_view": old["reads"]["view"] / new["reads"]["view"],
        "dvc_add": old["dvc"]["add"] / new["dvc"]["add"],
        "dvc_status": old["dvc"]["status"] / new["dvc"]["status"],
        "dvc_pull": old["dvc"]["pull"] / new["dvc"]["pull"],
        "store_files": old["files"] / new["files"],
        "dvc_push": old["dvc"]["push"] / new["dvc"]["push"],
    }
    lines += [ratio_line(name, value) for name, value in ratios.items()]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50, help="images per store (N)")
    ap.add_argument("--views", type=int, default=16, help="train views per image (K)")
    ap.add_argument("--width", type=int, default=64, help="token width D (768 for ViT-B/16)")
    ap.add_argument("--reads", type=int, default=100, help="timed reads of each kind")
    ap.add_argument("--workdir", default=None, help="keep the projects here (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        print(f"{args.images} images x 3 stores, {args.views} views of 197x{args.width} fp16; "
              f"DVC cache.type from {REPO / '.dvc' / 'config'}", flush=True)
        results = run(args.images, args.views, args.width, args.reads, workdir)
        for line in report(results, args.images):  # before the (long) removal of the projects
            print(line, flush=True)


if __name__ == "__main__":
    main()
