"""One command on a real GPU: does every CUDA path run, does it compute what the CPU computes,
and what does it cost?

    python benchmarks/gpu_check.py [--out DIR] [--quick] [--skip-real]

With CUDA (no network, no DVC needed on the GPU host; torch 2.11 or later):

1. **The tiny graph end to end** on ``cpu`` (the reference), ``cuda`` fp32 and ``cuda`` bf16 (when
   the GPU supports it): the stage commands of ``dvc.yaml``, expanded (``foreach``) and run in
   dependency order in-process (``wsss <stage> ...`` with the same arguments), each variant in its
   own project folder, on small models: the tiny random SAM (segment-anything's own ``Sam``
   classes, thresholds 0 and box NMS off, so that every image has several quasi-superpixels:
   checked on the CPU run), the committed demo CLIP and the tiny segmenter. Each CUDA variant is
   then compared with the CPU run (``benchmarks/gpu_check_compare.py``, with the tolerances per
   precision and their reasons): coarse and fine seeds (pixel agreement), cls and seg CAMs
   (correlation, max difference), the trained prompts, every training loss (finite, close), and
   the predictions of the CPU-trained segmenter run on the variant's device. A difference outside
   its tolerance is a failed check.
2. **Real-size architectures, random weights in the real file formats** (tiny ones with
   ``--quick``; skipped by ``--skip-real``): SAM ViT-H on two 375x500 images, ours against the
   stock ``SamAutomaticMaskGenerator`` with the same (the paper's) settings, warm-up and
   interleaved repeats, mask counts compared (``benchmarks/gpu_check_sam.py``); CLIP ViT-B/16
   inference features; one DeepLabV3+ R101 training step at 512 crops, batch 8 (seconds, peak
   memory; outputs and loss finite).
3. **``local-cluster`` with one worker per visible GPU**: ``sam-masks`` of the tiny project
   again, whose store must equal the serial CUDA run's.

Without CUDA it runs the device-discipline tests on a simulated CUDA device
(``tests/test_device_discipline.py``, :data:`DEVICE_DISCIPLINE_TESTS`) instead: each test is a
check, and the pytest run is one more, failed when pytest returns non-zero (a failure, an error,
a file that does not import) or collects nothing. ``--simulate`` runs steps 1 and 2 (with
``--quick``: tiny architectures) on that simulated device: what the test suite does to keep this
script working. The simulated device computes on the CPU, where CUDA's autocast does nothing:
its bf16 variant is fp32 arithmetic, so bf16 numerics are checked on a real GPU only.

Steps not run are named on the line before the last (``skipped: ...``); the last line is
``GPU_CHECK device=<cuda|none|simulated> checks=N failed=F skipped=K``, and the exit status is 1
when a check failed.
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
from collections.abc import Callable
from pathlib import Path

from gpu_check_compare import (
    TOLERANCES,
    OutOfTolerance,
    compare_cams,
    compare_losses,
    compare_predictions,
    compare_prompts,
    compare_seeds,
)
from harness import REPO, cuda_peak_gib, reset_cuda_peak

RESULTS: list[tuple[str, bool, str]] = []
"""(check, ok, detail) of every check run."""
SKIPPED: list[tuple[str, str]] = []
"""(step, why) of every step not run."""

DEVICE_DISCIPLINE_TESTS = REPO / "tests" / "test_device_discipline.py"
"""The tests the run without CUDA runs on the simulated device."""

#: Least mean number of quasi-superpixels per image of the tiny graph's CPU run: with one mask per
#: image a seed is that mask's label, and seeds could not differ where the CAMs do.
MIN_MASKS_PER_IMAGE = 3


def record(name: str, ok: bool, detail: str, seconds: float | None = None) -> bool:
    RESULTS.append((name, ok, detail))
    took = f" ({seconds:.1f} s)" if seconds is not None else ""
    print(f"[{'ok' if ok else 'FAILED'}] {name}{took} {detail}".rstrip(), flush=True)
    return ok


def check(name: str, fn: Callable[[], str]) -> bool:
    """Run one check; record and print its outcome (a failure does not stop the others). It fails
    when ``fn`` raises: :class:`OutOfTolerance` (a measured difference, printed as its line) or
    any other error (with its traceback on stderr)."""
    t0 = time.perf_counter()
    try:
        detail, ok = fn() or "", True
    except OutOfTolerance as exc:
        detail, ok = str(exc), False
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the script
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        traceback.print_exc(file=sys.stderr)
        ok = False
    return record(name, ok, detail, time.perf_counter() - t0)


def skip(name: str, why: str) -> None:
    """A step not run: counted and named in the last lines."""
    SKIPPED.append((name, why))
    print(f"[skipped] {name}: {why}", flush=True)


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
    """params.yaml with small models and a few images (tests/tiny_params.py), set so that seeds
    can differ when CAMs do, and do not when they differ by rounding."""
    from pipeline.demo.training.clip import DEMO_CLIP_FILE, DEMO_CLIP_MODEL
    from tests.tiny_params import tiny_graph_params

    params = tiny_graph_params(device, precision, n_train=4, workers=workers, scheduler=scheduler,
                               loader_workers=0)
    # Box NMS off (IoU 1.0): the random SAM's masks are scattered pixels whose boxes all span the
    # image, so at 0.7 one mask per image survives and its seed is one label whatever the CAMs.
    # 3x3 points: about 17 quasi-superpixels per image (wholes and parts).
    params["sam"].update(points_per_side=3, box_nms_thresh=1.0, crop_nms_thresh=1.0)
    # The committed demo CLIP (9 MB), not the random tiny one: on the random CLIP's near-flat CAMs
    # the masks' CAM means are near ties: noise of 1e-3 of the CAMs' largest value changed up to
    # 5% of the seed pixels (1e-2: 46%); on the demo CLIP's, 0.05% (1e-2: 0.3%). The last 4 of its
    # 6 blocks feed CAA, as in the embedded default.
    params["clip"].update(model=DEMO_CLIP_MODEL, checkpoint=str(DEMO_CLIP_FILE),
                          checkpoint_sha256=None, attention_blocks=4)
    # Raw CAMs of three-step prompts are ~1e-5, below the seed step's min-max epsilon: propagated
    # raw (VOC seg's "cam") they give all-background fine seeds; the min-max score gives classes.
    params["cams"]["seg"]["caa"]["propagate"] = "score"
    # The cls context starts at zero, so the trained context is the training's update alone and its
    # comparison measures the training on each device: from N(0, 0.015^2) three steps move it by
    # 1.5% of its largest value, from word embeddings by 5e-5 of it (the shared start dwarfs them).
    params["prompts"]["cls"].update(init="random", init_std=0.0)
    return params


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _run(name: str, argv: list[str]) -> None:
    from stages.cli import main

    assert argv[0] == "wsss", argv
    try:
        main(argv[1:], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"stage {name} exited with {exc.code}") from exc


def run_graph(project: Path, params: dict, only: tuple[str, ...] | None = None) -> None:
    """dvc.yaml's stage commands (all, or ``only``) in ``project`` with ``params``, in-process."""
    import yaml

    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with _cwd(project):
        for name, argv in stage_commands(REPO / "dvc.yaml"):
            if only is None or name in only:
                _run(name, argv)


def with_options(argv: list[str], options: dict[str, str]) -> list[str]:
    """``argv`` with the value after each flag of ``options`` replaced (every flag must be there)."""
    argv = list(argv)
    for flag, value in options.items():
        argv[argv.index(flag) + 1] = value
    return argv


def predict_with(project: Path, segmenter: Path, sam_masks: Path, out: str) -> Path:
    """dvc.yaml's ``predict`` in ``project`` (its params.yaml, its device) with another trained
    segmenter and quasi-superpixels; the predictions go to ``project/out``."""
    argv = dict(stage_commands(REPO / "dvc.yaml"))["predict"]
    argv = with_options(argv, {"--segmenter": str(segmenter), "--sam-masks": str(sam_masks),
                               "--out": out, "--metrics": f"{out}.json"})
    with _cwd(project):
        _run("predict", argv)
    return project / out


def reference_is_informative(cpu: Path) -> str:
    """The CPU run of the tiny graph has several quasi-superpixels per image and seeds with
    foreground, so that a CUDA difference in CAMs can show in its seeds."""
    import numpy as np

    from pipeline.data.imageio import read_label

    masks = json.loads((cpu / "cache" / "metrics" / "sam_masks.json").read_text())["masks_per_image"]
    if not masks >= MIN_MASKS_PER_IMAGE:
        raise OutOfTolerance(f"{masks} quasi-superpixels per image (< {MIN_MASKS_PER_IMAGE}): "
                             "seeds could not differ where CAMs do")
    parts = [f"{masks:.1f} quasi-superpixels per image (>= {MIN_MASKS_PER_IMAGE})"]
    for which in ("coarse", "fine"):
        seeds = [read_label(f) for f in sorted((cpu / "cache" / "seeds" / which).glob("*.png"))]
        with_classes = sum(len(np.unique(s)) >= 2 for s in seeds)
        if not seeds or 2 * with_classes < len(seeds):
            raise OutOfTolerance(f"{which} seeds: {with_classes} of {len(seeds)} images with a "
                                 "class besides the background (fewer than half)")
        parts.append(f"{which} seeds with classes in {with_classes} of {len(seeds)} images")
    return ", ".join(parts)


def variant_checks(out: Path, name: str, precision: str, graph_ok: bool, reference_ok: bool) -> None:
    """Every output of variant ``name`` (project ``out/name``) against the CPU run's."""
    cpu, other, tol = out / "cpu", out / name, TOLERANCES[precision]

    def predictions() -> str:
        mine = predict_with(other, cpu / "cache" / "segmenter", cpu / "cache" / "sam_masks.zarr",
                            "cache/predictions_cpu_segmenter")
        return compare_predictions(cpu / "cache" / "predictions", mine, tol)

    checks = [
        ("coarse seeds", lambda: compare_seeds(cpu, other, "coarse", tol)),
        ("fine seeds", lambda: compare_seeds(cpu, other, "fine", tol)),
        ("cls CAMs", lambda: compare_cams(cpu, other, "cls", tol)),
        ("seg CAMs", lambda: compare_cams(cpu, other, "seg", tol)),
        ("cls prompts", lambda: compare_prompts(cpu, other, "cls", tol)),
        ("seg prompts", lambda: compare_prompts(cpu, other, "seg", tol)),
        ("training losses", lambda: compare_losses(cpu, other, tol)),
        ("predictions of the CPU-trained segmenter", predictions),
    ]
    why = None if graph_ok and reference_ok else (
        f"the tiny graph on {name} failed" if not graph_ok else "the CPU reference failed")
    for what, fn in checks:
        if why:
            skip(f"{name} vs cpu: {what}", why)
        else:
            check(f"{name} vs cpu: {what}", fn)


# -- real-size architectures --------------------------------------------------------------------

def _peak(device) -> str:
    return f", peak {cuda_peak_gib(device):.2f} GiB" if device.type == "cuda" else ""


def _finite(name: str, value) -> None:
    import torch

    if not bool(torch.isfinite(torch.as_tensor(value)).all()):
        raise OutOfTolerance(f"{name} not finite")


def real_sam(folder: Path, device, quick: bool) -> str:
    """Ours against stock, like for like (benchmarks/gpu_check_sam.py); fails when their mask
    counts differ with the paper's changes off."""
    import numpy as np
    import torch
    from gpu_check_sam import compare_generators, paper_settings

    from pipeline.sam.models import build_sam, build_sam_predictor
    from pipeline.sam.specs import sam_spec
    from pipeline.weights import sha256sum

    model = "tiny" if quick else "vit_h"
    path = folder / ("sam_tiny.pth" if quick else "sam_vit_h_4b8939.pth")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(build_sam(sam_spec(model)).state_dict(), path)
    predictor = build_sam_predictor(model, path, sha256sum(path), device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (375, 500, 3), dtype=np.uint8) for _ in range(1 if quick else 2)]
    settings = paper_settings(points_per_side=2 if quick else None)
    result = compare_generators(predictor, images, settings, repeats=1 if quick else 2, device=device)
    line = f"SAM {model}, {settings['points_per_side']} points per side: {result.line()}"
    if result.mismatches():
        raise OutOfTolerance(f"{line}; mask counts differ with the paper's changes off: "
                             + "; ".join(result.mismatches()))
    return line


def real_clip(folder: Path, device, quick: bool) -> str:
    import numpy as np

    from pipeline.clip.features import inference_features
    from pipeline.clip.model import create_clip

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
    _finite("CLIP features", x.cpu())
    _finite("CLIP attention", att.cpu())
    return (f"CLIP {'tiny' if quick else 'ViT-B-16'} inference features {grid}: "
            f"{time.perf_counter() - t0:.3f} s{_peak(device)}, finite")


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
    warmup = float(train_step(net, opt, images.to(device), labels.to(device), 0.01))
    reset_cuda_peak(device)
    t0 = time.perf_counter()
    loss = float(train_step(net, opt, images.to(device), labels.to(device), 0.01))
    seconds = time.perf_counter() - t0
    _finite(f"segmenter losses {warmup}, {loss}", [warmup, loss])
    return (f"segmenter {'tiny' if quick else 'DeepLabV3+ R101 OS8'} step, {crop} crops, batch "
            f"{batch}: {seconds:.2f} s, losses {warmup:.3f}, {loss:.3f} (finite){_peak(device)}")


# -- the three modes ----------------------------------------------------------------------------

def gpu_checks(out: Path, quick: bool, skip_real: bool, simulate: bool, reference_ok: bool) -> None:
    import torch

    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} CUDA device(s): "
          f"{torch.cuda.get_device_name(0)}", flush=True)
    if simulate:
        print("simulated device: CUDA's autocast does not touch the CPU tensors behind it, so "
              "cuda_bf16 runs fp32 arithmetic here; bf16 numerics are checked on a real GPU only",
              flush=True)
    for name, precision in (("cuda_fp32", "fp32"), ("cuda_bf16", "bf16")):
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            skip(f"tiny graph on {name} and its comparisons", "bf16 is not supported on this GPU")
            continue
        ok = check(f"tiny graph on {name}", lambda n=name, p=precision: run_graph(out / n, tiny_params("cuda", p)))
        variant_checks(out, name, precision, ok, reference_ok)
    real_steps = (("SAM generator", real_sam), ("CLIP features", real_clip),
                  ("segmenter training step", real_segmenter))
    real = out / "weights"
    for what, step in real_steps:
        name = f"{what}, {'tiny (--quick)' if quick else 'real size'}"
        if skip_real:
            skip(name, "--skip-real")
            continue
        real.mkdir(parents=True, exist_ok=True)
        check(name, lambda step=step: step(real, device, quick))
    cluster_name = "local-cluster, one worker per GPU"
    if simulate:
        skip(cluster_name, "--simulate: dask workers are other processes, outside the simulated device")
        return

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

    check(cluster_name, cluster)


class _Outcomes:
    """pytest plugin: how many tests were collected, and every test's report that decides it."""

    def __init__(self):
        self.collected = 0
        self.reports = []

    def pytest_collection_finish(self, session):
        self.collected = len(session.items)

    def pytest_runtest_logreport(self, report):
        # the call's report; a setup or teardown only when it failed or skipped the test
        if report.when == "call" or report.outcome != "passed":
            self.reports.append(report)


def device_discipline() -> None:
    """The device-discipline tests (:data:`DEVICE_DISCIPLINE_TESTS`) on a simulated CUDA device
    (no GPU here): one check per test, and one for the run, failed when pytest returns non-zero
    (a failure, an error, a file that does not import) or collects nothing."""
    import pytest

    tests = DEVICE_DISCIPLINE_TESTS
    outcomes = _Outcomes()
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(tests)], plugins=[outcomes])
    for report in outcomes.reports:
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            skip(f"device discipline: {report.nodeid}", reason)
        else:
            when = "" if report.when == "call" else f" ({report.when})"
            record(f"device discipline: {report.nodeid}{when}", report.passed,
                   "" if report.passed else str(report.longrepr).strip().splitlines()[-1][:300])
    ok = int(code) == 0 and outcomes.collected > 0
    record(f"device-discipline pytest run of {tests.name}", ok,
           f"pytest exit code {int(code)}, {outcomes.collected} test(s) collected")


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
    SKIPPED.clear()
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))

    def reference() -> bool:
        if not check("tiny graph on cpu", lambda: run_graph(out / "cpu", tiny_params("cpu", "fp32"))):
            skip("cpu reference: seeds can differ", "the tiny graph on cpu failed")
            return False
        return check("cpu reference: seeds can differ", lambda: reference_is_informative(out / "cpu"))

    if args.simulate:
        from tests.simulated_cuda import PassThroughMode, simulated_cuda

        with PassThroughMode():  # the reference takes the same kernels as the simulated runs
            reference_ok = reference()
        with simulated_cuda():
            gpu_checks(out, args.quick, args.skip_real, simulate=True, reference_ok=reference_ok)
        label = "simulated"
    elif torch.cuda.is_available():
        reference_ok = reference()
        gpu_checks(out, args.quick, args.skip_real, simulate=False, reference_ok=reference_ok)
        label = "cuda"
    else:
        print("no CUDA device: running the device-discipline checks on a simulated one", flush=True)
        device_discipline()
        label = "none"
    failed = sum(not ok for _, ok, _ in RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(
        {"checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in RESULTS],
         "skipped": [{"step": n, "why": why} for n, why in SKIPPED]}, indent=1))
    print("skipped: " + ("; ".join(f"{n} ({why})" for n, why in SKIPPED) or "none"))
    print(f"GPU_CHECK device={label} checks={len(RESULTS)} failed={failed} skipped={len(SKIPPED)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
