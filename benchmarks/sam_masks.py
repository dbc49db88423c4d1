"""Benchmark of the quasi-superpixel stage (``sam_masks``) against segment-anything's stock code.

Whole generation (:func:`bench_generate`): per-image seconds of ``generate`` (network included:
image encoder on the full image and every crop, mask decoder, post-processing) of our
:class:`QuasiSuperpixelGenerator` and of the stock ``SamAutomaticMaskGenerator``, over the same
real ``SamPredictor`` and images, paper parameters (``--model``: tiny, demo, vit_b, ...; weights
from ``--checkpoint``, else random weights in the real architecture; images from ``--image-dir``,
else synthetic). Runs are interleaved. ``--verify`` also runs our generator over the stock network
path (``predict_torch``) and checks that its output is bit-identical to the fast path's.
``RATIO sam_generate=<stock/ours>`` is printed last. With random weights the predicted IoUs and
stability scores are near 0, so at the paper thresholds nearly nothing survives: pass
``--pred-iou-thresh`` / ``--stability-score-thresh`` to see where the time goes when masks do.
The stock side is guarded against its crash when nothing survives (:class:`GuardedStockGenerator`).

Post-processing time: our :class:`QuasiSuperpixelGenerator` vs the stock
``SamAutomaticMaskGenerator`` (``output_mode="binary_mask"``, same settings where both have them)
over the same predictor and the same images. The predictor is taken out of the measurement by
caching: each image's predictor outputs are computed once (a warm-up run of both generators over
a :class:`CachedPredictor`), then both generators are timed over the cache, so the times are
everything a generator does besides the network (filters, NMS, crops, clean-up, encoding).
Repeats are interleaved and the best of each is kept. A third column times our generator with its
three changes switched off (it then outputs exactly the stock masks), which separates the
box-crop speed-up from the effect of keeping fewer masks. ``RATIO sam_postprocess`` is
stock/ours with the paper's changes on.

Storage (:func:`bench_storage`): bytes per image of the ``sam_masks`` zarr group vs the same
masks pickled as segment-anything's uncompressed-RLE records, as the method's authors stored them;
``RATIO sam_storage=<pickle/zarr>`` (above 1: the zarr store is smaller).

Run: ``.venv/bin/python benchmarks/sam_masks.py [--points-per-side 16] [--images 3]``
(post-processing and storage, FakeSamPredictor) and ``.venv/bin/python benchmarks/sam_masks.py
--generate --model vit_b --images 1 --height 375 --width 500`` (whole generation). The last lines
are ``RATIO <name>=<stock/ours>`` (above 1: ours is faster).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np

from harness import REPO, print_ratio, time_interleaved  # first: puts this checkout on sys.path
from pipeline.sam.point_decoder import StockNetworkPredictor  # noqa: E402
from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator  # noqa: E402

GOLDEN_DIR = Path(os.environ.get("GOLDEN_DIR", REPO.parent / "shared" / "golden"))

#: Generator settings shared by both sides (paper values except the thresholds, which are set
#: so that the weight-free stand-in predictor yields a realistic number of masks).
SETTINGS = dict(points_per_batch=64, pred_iou_thresh=0.8, stability_score_thresh=0.85,
                stability_score_offset=1.0, box_nms_thresh=0.7, crop_n_layers=1,
                crop_nms_thresh=0.7, crop_overlap_ratio=512 / 1500,
                crop_n_points_downscale_factor=2, min_mask_region_area=100)


#: Our generator's three changes switched off (no level offsets, no occupation filter).
NEUTRAL = dict(score_thresh_offset=(0.0, 0.0, 0.0), score_nms_offset=(0.0, 0.0, 0.0),
               occupation_thresh=float("inf"))


def fake_predictor():
    """The golden files' weight-free SamPredictor stand-in."""
    spec = importlib.util.spec_from_file_location("fake_sam", GOLDEN_DIR / "fake_sam.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeSamPredictor()


class CachedPredictor:
    """Wraps a predictor; ``predict_torch`` answers from a cache keyed by (image, points).

    The first call for a key runs the wrapped predictor; later calls return the stored tensors
    (neither generator modifies them in place), so timed runs contain no network time.
    """

    def __init__(self, predictor):
        self.inner = predictor
        self.transform = predictor.transform
        self.model = predictor.model
        self.device = predictor.device
        self.cache: dict = {}
        self.misses = 0
        self._key = None

    def set_image(self, image):
        self._key = (image.shape, hash(np.ascontiguousarray(image).tobytes()))
        self._image = image

    def reset_image(self):
        self._key = None

    def predict_torch(self, point_coords, point_labels, multimask_output=True,
                      return_logits=True):
        key = (self._key, point_coords.cpu().numpy().tobytes())
        if key not in self.cache:
            self.misses += 1
            self.inner.set_image(self._image)
            self.cache[key] = self.inner.predict_torch(
                point_coords, point_labels, multimask_output=multimask_output,
                return_logits=return_logits)
        return self.cache[key]


class _StockSamModel:
    """What the stock generator's constructor reads from a Sam model (its predictor is replaced)."""

    class image_encoder:  # noqa: N801 - attribute name of segment_anything.Sam
        img_size = 1024


def _guarded_stock_class():
    from segment_anything import SamAutomaticMaskGenerator

    class GuardedStockGenerator(SamAutomaticMaskGenerator):
        """The stock generator, unchanged but for one guard: a crop where no mask survives gets
        its ``crop_boxes`` as a (0, 4) tensor. Stock builds ``torch.tensor([])`` (shape (0,)),
        and when no crop has a mask the cross-crop NMS's ``box_area`` raises IndexError."""

        def _process_crop(self, *args, **kwargs):
            import torch

            data = super()._process_crop(*args, **kwargs)
            if len(data["rles"]) == 0:
                data["crop_boxes"] = torch.zeros((0, 4), dtype=torch.int64)
            return data

    return GuardedStockGenerator


def stock_generator(predictor, points_per_side: int):
    from segment_anything import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(_StockSamModel(), points_per_side=points_per_side,
                                    output_mode="binary_mask", **SETTINGS)
    gen.predictor = predictor
    return gen


def synthetic_images(n: int, height: int = 200, width: int = 300, seed: int = 0):
    """Coloured rectangles and discs on a noisy background (regions at two colour scales)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(n):
        image = np.full((height, width, 3), rng.integers(0, 80, 3), np.uint8)
        for _ in range(6):
            colour = rng.integers(0, 256, 3)
            cy, cx = rng.integers(0, height), rng.integers(0, width)
            r = rng.integers(15, 60)
            if rng.random() < 0.5:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= 1.5 * r)
            image[inside] = colour
            inner = inside & ((yy - cy) ** 2 + (xx - cx) ** 2 <= (r // 2) ** 2)
            image[inner] = np.clip(colour.astype(int) + 40, 0, 255)
        images.append(image)
    return images


def bench_postprocess(images, points_per_side: int = 16, repeats: int = 3):
    """Per-image post-processing seconds (best of ``repeats``) of stock and ours, plus counts."""
    rows = []
    for image in images:
        predictor = CachedPredictor(fake_predictor())
        ours = QuasiSuperpixelGenerator(predictor, points_per_side=points_per_side, **SETTINGS)
        stock = stock_generator(predictor, points_per_side)
        n_ours, n_stock = len(ours.generate(image)), len(stock.generate(image))  # fills the cache
        misses = predictor.misses
        # Same generator with the three changes switched off: it then keeps exactly the stock
        # masks, so this isolates the box-crop post-processing from the smaller output.
        neutral = QuasiSuperpixelGenerator(predictor, points_per_side=points_per_side,
                                           **SETTINGS, **NEUTRAL)
        # Interleaved repeats, so that load from other processes hits all three alike.
        times = {"stock": [], "ours": [], "neutral": []}
        for _ in range(repeats):
            for name, gen in (("stock", stock), ("ours", ours), ("neutral", neutral)):
                start = time.perf_counter()
                gen.generate(image)
                times[name].append(time.perf_counter() - start)
        t_stock, t_ours, t_neutral = (min(times[k]) for k in ("stock", "ours", "neutral"))
        assert predictor.misses == misses, "timed runs must not call the predictor"
        rows.append(dict(stock_s=t_stock, ours_s=t_ours, neutral_s=t_neutral,
                         stock_masks=n_stock, ours_masks=n_ours))
    return rows


def bench_storage(images, points_per_side: int = 16) -> dict:
    """Bytes per image of the ``sam_masks`` zarr store vs the authors' pickled uncompressed RLE.

    The masks come from our generator over the weight-free stand-in predictor (colour-region
    masks of realistic shapes). Zarr side: each image written with the stage's own
    :func:`pipeline.store.write_group` (one bitshuffled-zstd chunk per array), counted as the
    apparent size of its zip file (metadata and zip headers included). Pickle side: what the method's
    authors stored, one pickle per image holding a list of per-mask records in segment-anything's
    ``uncompressed_rle`` output format (``{"size": [h, w], "counts": [...]}`` from
    ``mask_to_rle_pytorch``, plus level, area, box, IoU, stability, point, crop box).
    """
    import pickle
    import tempfile
    import zipfile

    import torch
    from segment_anything.utils.amg import mask_to_rle_pytorch

    from pipeline.store import ImageStore, write_group

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "sam_masks.zarr"
        ImageStore.open_for_writing(store, {"stage": "benchmark", "fingerprint": "benchmark"})
        for i, image in enumerate(images):
            qs = QuasiSuperpixelGenerator(
                fake_predictor(), points_per_side=points_per_side, **SETTINGS).generate(image)
            arrays = qs.to_arrays()
            write_group(store, f"img{i}", arrays, attrs={"height": image.shape[0],
                                                          "width": image.shape[1]})
            image_file = ImageStore(store).image_path(f"img{i}")
            zarr_bytes = image_file.stat().st_size
            with zipfile.ZipFile(image_file) as zf:
                meta_bytes = sum(m.file_size for m in zf.infolist() if m.filename.endswith("zarr.json"))
            rles = mask_to_rle_pytorch(torch.from_numpy(arrays["masks"]))
            records = [
                {"segmentation": rle, "level": int(level), "area": int(mask.sum()),
                 "bbox": box.tolist(), "predicted_iou": float(iou), "point_coords": [pt.tolist()],
                 "stability_score": float(stab), "crop_box": crop.tolist()}
                for rle, mask, level, box, iou, pt, stab, crop in zip(
                    rles, arrays["masks"], arrays["levels"], arrays["bbox_xywh"],
                    arrays["predicted_iou"], arrays["point_coords"], arrays["stability_score"],
                    arrays["crop_box_xywh"])
            ]
            pickle_bytes = len(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL))
            rows.append(dict(masks=len(qs), zarr_bytes=zarr_bytes, zarr_meta_bytes=meta_bytes,
                             pickle_bytes=pickle_bytes))
    return rows


#: Paper parameters of §1 (algorithms.md), the stock generator's where it has them.
PAPER = dict(points_per_side=32, points_per_batch=256, pred_iou_thresh=0.86,
             stability_score_thresh=0.92, stability_score_offset=1.0, box_nms_thresh=0.7,
             crop_n_layers=1, crop_nms_thresh=0.7, crop_overlap_ratio=512 / 1500,
             crop_n_points_downscale_factor=2, min_mask_region_area=100)


def real_predictor(model: str, checkpoint: str | None = None, seed: int = 0):
    """A ``SamPredictor`` of ``model`` and whether its weights are random.

    With ``checkpoint`` (or for a model that needs none) the stage's own loader is used; a model
    whose checkpoint is absent gets random weights in its real architecture (seeded)."""
    import torch
    from segment_anything import SamPredictor

    from pipeline.sam.models import build_sam, build_sam_predictor
    from pipeline.sam.pretrained import pretrained_weights
    from pipeline.sam.specs import sam_spec
    from pipeline.weights import CheckpointError

    try:
        predictor = build_sam_predictor(model, checkpoint, None)
        return predictor, pretrained_weights(model) is None
    except CheckpointError:
        if checkpoint is not None:
            raise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SamPredictor(build_sam(sam_spec(model))), True


def read_images(image_dir: str | None, n: int, height: int, width: int):
    """The first ``n`` images (sorted) of ``image_dir``, else ``n`` synthetic ones."""
    if image_dir is None:
        return synthetic_images(n, height, width)
    from pipeline.data.imageio import read_rgb

    paths = sorted(p for p in Path(image_dir).iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
    return [read_rgb(p) for p in paths[:n]]


def bench_generate(predictor, images, settings: dict, repeats: int = 1, verify: bool = False,
                   max_batch_memory_mb: int = 1024):
    """Per-image seconds (median of interleaved repeats) of the whole ``generate`` of ours and of
    the stock generator over the same predictor; with ``verify``, also of our generator over the
    stock network path, whose output must equal the fast path's bit for bit."""
    stock_settings = {k: v for k, v in settings.items() if k != "points_per_batch"}
    stock = _guarded_stock_class()(predictor.model, output_mode="binary_mask",
                                   points_per_batch=settings["points_per_batch"], **stock_settings)
    stock.predictor = predictor
    ours = QuasiSuperpixelGenerator(predictor, max_batch_memory_mb=max_batch_memory_mb,
                                    **settings)
    reference = QuasiSuperpixelGenerator(StockNetworkPredictor(predictor), **settings)
    rows = []
    for image in images:
        out = {}

        def run(name, gen):
            def fn():
                out[name] = gen.generate(image)
            return fn

        fns = [run("stock", stock), run("ours", ours)]
        if verify:
            fns.append(run("ours_stock_network", reference))
        times = time_interleaved(fns, steps=repeats, warmup=0)
        row = dict(stock_s=times[0], ours_s=times[1], stock_masks=len(out["stock"]),
                   ours_masks=len(out["ours"]))
        if verify:
            a, b = out["ours"].to_arrays(), out["ours_stock_network"].to_arrays()
            row["identical"] = all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                   and a[k].tobytes() == b[k].tobytes() for k in a)
            row["stock_network_s"] = times[2]
        rows.append(row)
    return rows


def best_match_iou(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over the ``reference`` masks (S, H, W) of the best IoU among the ``other`` masks."""
    import torch

    if not len(reference):
        return float("nan")
    if not len(other):
        return 0.0
    a = torch.from_numpy(reference).flatten(1).double()
    b = torch.from_numpy(other).flatten(1).double()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return float((inter / union.clamp(min=1)).amax(1).mean())


def bench_precision(predictor, images, settings: dict, max_batch_memory_mb: int = 1024):
    """Per image: mask counts under fp32 and bf16 (``compute.precision``) and the mean
    best-match IoU of the fp32 masks among the bf16 ones, plus both times."""
    rows = []
    for image in images:
        out, times = {}, {}
        for precision in ("fp32", "bf16"):
            gen = QuasiSuperpixelGenerator(predictor, precision=precision,
                                           max_batch_memory_mb=max_batch_memory_mb, **settings)
            start = time.perf_counter()
            out[precision] = gen.generate(image)
            times[precision] = time.perf_counter() - start
        rows.append(dict(fp32_masks=len(out["fp32"]), bf16_masks=len(out["bf16"]),
                         iou=best_match_iou(out["fp32"].masks, out["bf16"].masks),
                         fp32_s=times["fp32"], bf16_s=times["bf16"]))
    return rows


def main_generate(args) -> None:
    import torch

    predictor, random_weights = real_predictor(args.model, args.checkpoint)
    images = read_images(args.image_dir, args.images, args.height, args.width)
    settings = dict(PAPER, points_per_batch=args.points_per_batch)
    for key in ("pred_iou_thresh", "stability_score_thresh"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    print(f"whole generate, model {args.model} ({'random' if random_weights else 'trained'} "
          f"weights), {len(images)} images {'from ' + args.image_dir if args.image_dir else ''}"
          f"{' x '.join(map(str, images[0].shape[:2]))}, torch threads "
          f"{torch.get_num_threads()}, repeats {args.repeats} interleaved, settings {settings}, "
          f"our max_batch_memory_mb {args.max_batch_memory_mb}")
    if args.bf16_agreement:
        rows = bench_precision(predictor, images, settings, args.max_batch_memory_mb)
        for i, row in enumerate(rows):
            print(f"image {i}: fp32 {row['fp32_masks']} masks ({row['fp32_s']:.1f} s), bf16 "
                  f"{row['bf16_masks']} masks ({row['bf16_s']:.1f} s), mean best-match IoU of "
                  f"the fp32 masks among the bf16 ones {row['iou']:.4f}")
        ious = [r["iou"] for r in rows if r["iou"] == r["iou"]]
        print(f"mean best-match IoU over {len(ious)} images with fp32 masks: "
              f"{sum(ious) / max(len(ious), 1):.4f}")
        return
    rows = bench_generate(predictor, images, settings, args.repeats, args.verify,
                          args.max_batch_memory_mb)
    for i, row in enumerate(rows):
        extra = ""
        if args.verify:
            extra = (f"   ours over the stock network {row['stock_network_s']:8.1f} s, output "
                     f"{'bit-identical' if row['identical'] else 'DIFFERENT'}")
        print(f"image {i}: stock {row['stock_s']:8.1f} s ({row['stock_masks']} masks)   ours "
              f"{row['ours_s']:8.1f} s ({row['ours_masks']} masks){extra}", flush=True)
    stock_total = sum(r["stock_s"] for r in rows)
    ours_total = sum(r["ours_s"] for r in rows)
    print(f"mean per image: stock {stock_total / len(rows):.1f} s, "
          f"ours {ours_total / len(rows):.1f} s")
    if args.verify and not all(r["identical"] for r in rows):
        raise SystemExit("fast decoder path and stock network path disagree")
    print_ratio("sam_generate", stock_total / ours_total, digits=3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--height", type=int, default=200)
    parser.add_argument("--width", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    # One intra-op thread by default: with several threads on a loaded machine, the thousands of
    # small tensor ops of the stock RLE encoding made its times swing tenfold between runs.
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (0: torch's default; default 1, --generate: 0)")
    parser.add_argument("--generate", action="store_true",
                        help="time the whole generate (network included), ours vs stock")
    parser.add_argument("--model", default="tiny", help="--generate: SAM model (pipeline.sam.specs)")
    parser.add_argument("--checkpoint", default=None,
                        help="--generate: weights (default: the model's own, else random)")
    parser.add_argument("--image-dir", default=None,
                        help="--generate: folder of images (default: synthetic images)")
    parser.add_argument("--points-per-batch", type=int, default=PAPER["points_per_batch"])
    parser.add_argument("--max-batch-memory-mb", type=int, default=1024)
    parser.add_argument("--pred-iou-thresh", type=float, default=None,
                        help="--generate: override the paper's 0.86")
    parser.add_argument("--stability-score-thresh", type=float, default=None,
                        help="--generate: override the paper's 0.92")
    parser.add_argument("--verify", action="store_true",
                        help="--generate: check the fast path against the stock network path")
    parser.add_argument("--bf16-agreement", action="store_true",
                        help="--generate: compare our masks under bf16 with fp32 instead")
    args = parser.parse_args(argv)

    import torch

    threads = args.threads if args.threads is not None else (0 if args.generate else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    if args.generate:
        main_generate(args)
        return

    images = synthetic_images(args.images, args.height, args.width)
    print(f"post-processing, {args.images} images {args.height}x{args.width}, points_per_side "
          f"{args.points_per_side}, crop_n_layers {SETTINGS['crop_n_layers']}, cached "
          f"FakeSamPredictor (predictor time excluded), torch threads {torch.get_num_threads()}")
    rows = bench_postprocess(images, args.points_per_side, args.repeats)
    for i, row in enumerate(rows):
        print(f"image {i}: stock {row['stock_s'] * 1e3:8.1f} ms ({row['stock_masks']} masks)   "
              f"ours {row['ours_s'] * 1e3:8.1f} ms ({row['ours_masks']} masks)   "
              f"ours with the changes off {row['neutral_s'] * 1e3:8.1f} ms "
              f"({row['stock_masks']} masks)")
    stock_total = sum(r["stock_s"] for r in rows)
    ours_total = sum(r["ours_s"] for r in rows)
    neutral_total = sum(r["neutral_s"] for r in rows)
    print(f"mean per image: stock {stock_total / len(rows) * 1e3:.1f} ms, "
          f"ours {ours_total / len(rows) * 1e3:.1f} ms, ours with the changes off "
          f"{neutral_total / len(rows) * 1e3:.1f} ms (stock/that = "
          f"{stock_total / neutral_total:.3f})")
    storage = bench_storage(images, args.points_per_side)
    for i, row in enumerate(storage):
        print(f"image {i}: {row['masks']} masks, zarr group {row['zarr_bytes']} B "
              f"({row['zarr_meta_bytes']} B metadata), pickled uncompressed RLE "
              f"{row['pickle_bytes']} B")
    zarr_total = sum(r["zarr_bytes"] for r in storage)
    pickle_total = sum(r["pickle_bytes"] for r in storage)
    meta_total = sum(r["zarr_meta_bytes"] for r in storage)
    print(f"storage per image: zarr {zarr_total / len(storage):.0f} B (chunks and zip headers "
          f"{(zarr_total - meta_total) / len(storage):.0f} B + metadata "
          f"{meta_total / len(storage):.0f} B), pickled RLE {pickle_total / len(storage):.0f} B")
    print_ratio("sam_storage", pickle_total / zarr_total, digits=3)
    print_ratio("sam_postprocess", stock_total / ours_total, digits=3)


if __name__ == "__main__":
    main()
