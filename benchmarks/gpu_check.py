"""One command on a real GPU: does every CUDA path run, and what does it cost?

    python benchmarks/gpu_check.py [--out DIR] [--quick] [--skip-real]

With CUDA (no network, no DVC needed on the GPU host; torch 2.11 or later):

1. **The tiny graph end to end** on ``cpu`` (the reference), ``cuda`` fp32 and ``cuda`` bf16: the
   stage commands of ``dvc.yaml``, expanded (``foreach``) and run in dependency order in-process
   (``wsss <stage> ...`` with the same arguments), each variant in its own project folder, on the
   tiny random models (segment-anything's own ``Sam`` classes, thresholds 0 so that masks reach
   the clean-up). Printed per CUDA variant: seed pixel agreement with the CPU run (coarse and
   fine) and the Pearson correlation of the classification CAMs.
2. **Real-size architectures, random weights in the real file formats** (skipped by ``--quick``
   or ``--skip-real``): SAM ViT-H on two 375x500 images (seconds per image and peak memory, ours
   against the stock ``SamAutomaticMaskGenerator`` over the same predictor), CLIP ViT-B/16
   inference features (seconds, peak memory), one DeepLabV3+ R101 training step at 512 crops,
   batch 8 (seconds, peak memory).
3. **``local-cluster`` with one worker per visible GPU**: ``sam-masks`` of the tiny project
   again, whose store must equal the serial CUDA run's.

Without CUDA it runs the device-discipline checks on the CPU (``tests/test_device_discipline.py``
on a simulated CUDA device) instead. ``--simulate`` runs steps 1 and 2 (with ``--quick``: tiny
architectures) on that simulated device: what the test suite does to keep this script working.
The last line is ``GPU_CHECK device=<cuda|none|simulated> checks=N failed=F``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from harness import REPO, cuda_peak_gib, reset_cuda_peak, sync

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, fn: Callable[[], str]) -> None:
    """Run one check; record and print its outcome (a failure does not stop the others)."""
    t0 = time.perf_counter()
    try:
        detail = fn() or ""
        ok = True
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the script
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        traceback.print_exc(file=sys.stderr)
        ok = False
    RESULTS.append((name, ok, detail))
    print(f"[{'ok' if ok else 'FAILED'}] {name} ({time.perf_counter() - t0:.1f} s) {detail}",
          flush=True)


# -- dvc.yaml's stage commands, without DVC -------------------------------------------------------

def _substitute(node, key: str, item):
    if isinstance(node, str):
        node = node.replace("${key}", key)
        if not isinstance(item, dict):
            return node.replace("${item}", str(item))
        return re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m.group(1)]), node)
    if isinstance(node, list):
        return [_substitute(v, key, item) for v in node]
    if isinstance(node, dict):
        return {_substitute(k, key, item): _substitute(v, key, item) for k, v in node.items()}
    return node


def rendered_stages(dvc_yaml: Path) -> dict[str, dict]:
    """Every stage of ``dvc_yaml`` by its DVC name, ``foreach`` expanded (``name@key``)."""
    import yaml

    stages = {}
    for name, spec in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        if "foreach" in spec:
            foreach = spec["foreach"]
            pairs = foreach.items() if isinstance(foreach, dict) else ((str(v), v) for v in foreach)
            for key, item in pairs:
                stages[f"{name}@{key}"] = _substitute(spec["do"], key, item)
        else:
            stages[name] = spec
    return stages


def stage_commands(dvc_yaml: Path) -> list[tuple[str, list[str]]]:
    """(stage name, argv) of every stage of ``dvc_yaml``, ``foreach`` expanded, in an order where
    each stage comes after the stages whose outputs it depends on."""
    stages = rendered_stages(dvc_yaml)

    def outs(spec) -> list[str]:
        return [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])]

    producers = {out: name for name, spec in stages.items() for out in outs(spec)}
    order: list[str] = []

    def visit(name: str, seen: tuple = ()) -> None:
        if name in order:
            return
        if name in seen:
            raise ValueError(f"dvc.yaml: a cycle through {name}")
        for dep in stages[name].get("deps", []):
            for out, producer in producers.items():
                if producer != name and (dep == out or dep.startswith(out.rstrip("/") + "/")):
                    visit(producer, (*seen, name))
        order.append(name)

    for name in stages:
        visit(name)
    return [(name, shlex.split(stages[name]["cmd"])) for name in order]


def tiny_params(device: str, precision: str, workers: int = 1, scheduler: str = "local") -> dict:
    """params.yaml with the tiny random models and a few images (tests/tiny_params.py)."""
    from tests.tiny_params import tiny_graph_params

    return tiny_graph_params(device, precision, n_train=4, workers=workers, scheduler=scheduler,
                             loader_workers=0)


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_graph(project: Path, params: dict, only: tuple[str, ...] | None = None) -> None:
    """dvc.yaml's stage commands (all, or ``only``) in ``project`` with ``params``, in-process."""
    import yaml

    from stages.cli import main

    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with _cwd(project):
        for name, argv in stage_commands(REPO / "dvc.yaml"):
            if only is not None and name not in only:
                continue
            assert argv[0] == "wsss", argv
            try:
                main(argv[1:], standalone_mode=False)
            except SystemExit as exc:
                if exc.code:
                    raise RuntimeError(f"stage {name} exited with {exc.code}") from exc


def compare_to_cpu(cpu: Path, other: Path) -> str:
    """Seed pixel agreement (coarse, fine) and CAM correlation of ``other`` against ``cpu``."""
    import numpy as np

    from pipeline.data.imageio import read_label
    from pipeline.store import ImageStore

    parts = []
    for which in ("coarse", "fine"):
        files = sorted((cpu / "cache" / "seeds" / which).glob("*.png"))
        assert files, f"no {which} seeds"
        same = total = 0
        for f in files:
            a, b = read_label(f), read_label(other / "cache" / "seeds" / which / f.name)
            same += int((a == b).sum())
            total += a.size
        parts.append(f"{which} seed agreement {100 * same / total:.2f}%")
    ref, got = ImageStore(cpu / "cache/cams/cls.zarr"), ImageStore(other / "cache/cams/cls.zarr")
    a = np.concatenate([ref.read_array(i, "cam").ravel() for i in ref.ids()])
    b = np.concatenate([got.read_array(i, "cam").ravel() for i in ref.ids()])
    parts.append(f"CAM correlation {np.corrcoef(a, b)[0, 1]:.5f}")
    return ", ".join(parts)


# -- real-size architectures --------------------------------------------------------------------

def _peak(device) -> str:
    return f", peak {cuda_peak_gib(device):.2f} GiB" if device.type == "cuda" else ""


def real_sam(folder: Path, device, quick: bool) -> str:
    import numpy as np
    import torch

    from pipeline.sam.models import build_sam, build_sam_predictor
    from pipeline.sam.quasi_superpixels import QuasiSuperpixelGenerator
    from pipeline.sam.specs import sam_spec
    from pipeline.weights import sha256sum

    model = "tiny" if quick else "vit_h"
    path = folder / ("sam_tiny.pth" if quick else "sam_vit_h_4b8939.pth")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(build_sam(sam_spec(model)).state_dict(), path)
    predictor = build_sam_predictor(model, path, sha256sum(path), device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (375, 500, 3), dtype=np.uint8) for _ in range(2)]
    # Thresholds 0: random weights keep (almost) no mask at the paper's 0.86 / 0.92.
    ours = QuasiSuperpixelGenerator(predictor, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                    points_per_side=8 if quick else 32)
    from sam_masks import _guarded_stock_class

    stock = _guarded_stock_class()(predictor.model, points_per_side=8 if quick else 32,
                                   pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                   min_mask_region_area=100, output_mode="binary_mask")
    report = []
    for name, run in (("ours", ours.generate), ("stock", stock.generate)):
        reset_cuda_peak(device)
        seconds = []
        for image in images:
            t0 = time.perf_counter()
            out = run(image)
            sync(device)
            seconds.append(time.perf_counter() - t0)
        report.append(f"{name} {np.mean(seconds):.2f} s/image ({len(out)} masks){_peak(device)}")
    return f"SAM {model}: " + "; ".join(report)


def real_clip(folder: Path, device, quick: bool) -> str:
    import numpy as np

    from pipeline.clip.model import create_clip
    from pipeline.clip.features import inference_features

    if quick:
        clip = create_clip("tiny").to(device)
    else:
        from tests.real_checkpoints import open_clip_vit_b16

        clip = create_clip("ViT-B-16", checkpoint=open_clip_vit_b16(folder).path).to(device)
    image = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    inference_features(clip, image, 8, 512)  # warm-up
    reset_cuda_peak(device)
    t0 = time.perf_counter()
    x, att, grid, _ = inference_features(clip, image, 8, 512)
    float(x.sum())
    return (f"CLIP {'tiny' if quick else 'ViT-B-16'} inference features {grid}: "
            f"{time.perf_counter() - t0:.3f} s{_peak(device)}")


def real_segmenter(folder: Path, device, quick: bool) -> str:
    import torch

    from pipeline.segmenter.model import build_segmenter
    from pipeline.segmenter.training import build_optimizer, train_step

    if quick:
        net, crop, batch = build_segmenter("tiny", 21), 64, 2
    else:
        from tests.real_checkpoints import torchvision_resnet101

        weights = torchvision_resnet101(folder)
        net = build_segmenter("deeplabv3plus_r101", 21, weights.path, weights.sha256, output_stride=8)
        crop, batch = 512, 8
    net = net.to(device).train()
    opt = build_optimizer(net)
    images = torch.randn(batch, 3, crop, crop)
    labels = torch.randint(0, 21, (batch, crop, crop))
    float(train_step(net, opt, images.to(device), labels.to(device), 0.01))  # warm-up
    reset_cuda_peak(device)
    t0 = time.perf_counter()
    loss = float(train_step(net, opt, images.to(device), labels.to(device), 0.01))
    return (f"segmenter {'tiny' if quick else 'DeepLabV3+ R101 OS8'} step, {crop} crops, batch "
            f"{batch}: {time.perf_counter() - t0:.2f} s, loss {loss:.3f}{_peak(device)}")


# -- the three modes ----------------------------------------------------------------------------

def gpu_checks(out: Path, quick: bool, skip_real: bool, simulate: bool) -> None:
    import torch

    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} CUDA device(s): "
          f"{torch.cuda.get_device_name(0)}", flush=True)
    variants = [("cuda_fp32", "fp32"), ("cuda_bf16", "bf16")]
    for name, precision in variants:
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            print(f"{name}: bf16 is not supported on this GPU, skipped")
            continue
        check(f"tiny graph on {name}",
              lambda n=name, p=precision: (run_graph(out / n, tiny_params("cuda", p)),
                                           compare_to_cpu(out / "cpu", out / n))[1])
    if not skip_real:
        real = out / "weights"
        real.mkdir(parents=True, exist_ok=True)
        check("SAM generator, real size" if not quick else "SAM generator (quick)",
              lambda: real_sam(real, device, quick))
        check("CLIP features, real size" if not quick else "CLIP features (quick)",
              lambda: real_clip(real, device, quick))
        check("segmenter training step, real size" if not quick else "segmenter step (quick)",
              lambda: real_segmenter(real, device, quick))
    if not simulate:
        def cluster() -> str:
            from pipeline.store import ImageStore

            n = torch.cuda.device_count()
            project = out / "cuda_cluster"
            params = tiny_params("cuda", "fp32", workers=n, scheduler="local-cluster")
            run_graph(project, params, only=("prepare", "sam_masks"))
            a, b = ImageStore(out / "cuda_fp32/cache/sam_masks.zarr"), ImageStore(project / "cache/sam_masks.zarr")
            assert a.ids() == b.ids()
            for i in a.ids():
                assert a.image_path(i).read_bytes() == b.image_path(i).read_bytes(), i
            return f"{n} worker(s), one per GPU: sam_masks store equals the serial run's"

        check("local-cluster, one worker per GPU", cluster)


def device_discipline() -> None:
    """The device-discipline tests on a simulated CUDA device (no GPU here)."""
    import pytest

    class Counter:
        def __init__(self):
            self.passed = self.failed = 0

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome == "failed":
                if report.outcome == "passed":
                    self.passed += 1
                elif report.outcome == "failed":
                    self.failed += 1

    counter = Counter()
    pytest.main(["-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_device_discipline.py")],
                plugins=[counter])
    for i in range(counter.passed):
        RESULTS.append((f"device discipline {i}", True, ""))
    for i in range(counter.failed):
        RESULTS.append((f"device discipline failure {i}", False, ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="tiny instead of real-size architectures")
    parser.add_argument("--skip-real", action="store_true", help="no real-size architectures")
    parser.add_argument("--simulate", action="store_true",
                        help="CUDA steps on a simulated device (tests/simulated_cuda.py)")
    args = parser.parse_args(argv)
    import torch

    RESULTS.clear()
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    if args.simulate:
        from tests.simulated_cuda import PassThroughMode, simulated_cuda

        with PassThroughMode():  # the reference takes the same kernels as the simulated runs
            check("tiny graph on cpu", lambda: run_graph(out / "cpu", tiny_params("cpu", "fp32")))
        with simulated_cuda():
            gpu_checks(out, args.quick, args.skip_real, simulate=True)
        label = "simulated"
    elif torch.cuda.is_available():
        check("tiny graph on cpu", lambda: run_graph(out / "cpu", tiny_params("cpu", "fp32")))
        gpu_checks(out, args.quick, args.skip_real, simulate=False)
        label = "cuda"
    else:
        print("no CUDA device: running the device-discipline checks on a simulated one", flush=True)
        device_discipline()
        label = "none"
    failed = sum(not ok for _, ok, _ in RESULTS)
    (out / "gpu_check.json").write_text(json.dumps(
        [{"check": n, "ok": ok, "detail": d} for n, ok, d in RESULTS], indent=1))
    print(f"GPU_CHECK device={label} checks={len(RESULTS)} failed={failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
