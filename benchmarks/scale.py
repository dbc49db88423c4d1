"""Cost growth of the whole DVC graph with the dataset's size (issue 24).

For each train-split size of ``--images`` (``dataset.demo.n_train``; the eval split stays at
``--val`` images), a fresh git + DVC project is built the way the end-to-end test builds one
(``tests/dvc_project.py``: this repository's dvc.yaml, pipeline/, stages/ and params.yaml) with
the embedded default's models (the committed demo CLIP, the world-oracle SAM stand-in, the
``demo_clip_vit`` segmenter) and every stage is run in graph order with ``dvc repro -s <stage>``.
Training iterations are small and the same at every size (``TRAINING`` below), so what grows
with the size is the per-image work and whatever DVC and the stages do per file.

Per stage and size it prints:

- ``wall``: seconds of ``dvc repro -s <stage>`` (DVC's hashing, linking and committing included);
- ``wall/u``: wall seconds per unit (an image for per-image stages; a step for training stages);
- ``loop/img``: seconds per image of the stage's own per-image loop, from the line
  ``stages.execution.run_per_image`` logs (process start, model loading and DVC excluded: the
  per-image cost without the fixed costs that flatter ``wall/u`` at small sizes);
- ``marg/img``: the marginal wall seconds per image since the previous size,
  ``(wall(N_i) - wall(N_i-1)) / (n_i - n_i-1)`` (DVC's per-file work is in it, the fixed
  costs are not);
- ``stage RSS``: peak RSS of the stage's process (the stage command runs under this script's
  ``--rusage`` wrapper, which reads it with ``wait4``; the project's dvc.yaml commands are
  prefixed with it, nothing else changes), and ``dvc RSS``: the peak RSS of ``dvc`` itself
  (``wait4`` of the ``dvc repro`` process is the maximum over it and its descendants, so the
  figure is max(dvc, stage); it is reported only where it exceeds the stage's);
- ``files`` and ``disk``: files in the stage's outputs and their size (``du``: allocated blocks,
  a hardlink to DVC's cache counted once; the cache itself is not counted again).

Memory, for every stage (training stages included): the marginal peak RSS per train image,
``KiB/image``, the least-squares slope of the stage's peak RSS over the train-split sizes run
(the fixed memory, libraries and models, is in the intercept, not in the slope), and what that
slope adds at COCO train2014's 82,783 images (``COCO GiB``). One line per stage,
``MEMORY stage=<name> kib_per_image=<slope> coco_gib=<slope x 82,783> target_kib=<target>
allowed_kib=<target + noise> verdict=ok|over``, then ``MEMORY_VERDICT verdict=ok|over stages=<n>
over=<n> [names=<stages>]``. Each stage's target is in ``MEMORY_TARGET_KIB``; the spread of peak RSS
with no growth per image (``RSS_NOISE_MIB``, over the range of sizes run) is allowed on top, so
a run over a wider range of sizes checks a tighter bound (``allowed_kib``). A stage over its
allowance makes the script exit non-zero. The x of every slope is the train-split size: for
``predict``, whose val images stay at ``--val``, the slope says whether it grows with the
training data, not with the images it predicts.

Last line: ``RATIO per_image_growth`` (over the per-image stages, the largest of loop/img and of
wall/u at the largest size over the smallest, and of the marginal CPU seconds per image of the
last size step over the first; want <= 1.3). ``--scheduler`` also runs the smallest size through a real
dask cluster (``dask scheduler`` and two ``dask worker --nthreads 1`` processes on 127.0.0.1, started
in another directory than the project, stopped on exit) with ``compute.scheduler: tcp://...`` and
checks that every file under ``cache/`` that a stage wrote is byte-identical to the serial run's.

    python benchmarks/scale.py --images 100 400 1600 [--val 8] [--scheduler] [--json out.json]

Runs on the CPU only (``compute.device: cpu``); the figures are for the machine it runs on.
"""
from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness import REPO, dvc_env, make_project, peak_rss_mib, print_ratio, sh

#: Stages in graph order, with their outputs, the unit their cost is divided by, and the desc
#: ``run_per_image`` logs for per-image stages.
STAGES = {
    "prepare": (["cache/index"], "image", None),
    "sam_masks": (["cache/sam_masks.zarr"], "image", "sam masks"),
    "clip_features": (["cache/clip_features"], "image", "clip features"),
    "train_prompts@cls": (["cache/prompts/cls.pt"], "step", None),
    "cams@cls": (["cache/cams/cls.zarr"], "image", "cams cls"),
    "seeds@coarse": (["cache/seeds/coarse"], "image", "seeds coarse"),
    "train_prompts@seg": (["cache/prompts/seg.pt"], "step", None),
    "cams@seg": (["cache/cams/seg.zarr"], "image", "cams seg"),
    "seeds@fine": (["cache/seeds/fine"], "image", "seeds fine"),
    "train_segmenter": (["cache/segmenter"], "step", None),
    "predict": (["cache/predictions"], "image", "predict"),
    # a fixed sample of images (dvc.yaml's --sample) at every size: one unit per run
    "panels": (["cache/plots/panels"], "run", None),
}
PER_IMAGE = [s for s, (_, _, desc) in STAGES.items() if desc is not None]
#: Outputs of the per-image stages: compared file by file between the serial and the dask run.
PER_IMAGE_OUTS = [o for s in PER_IMAGE for o in STAGES[s][0]]
PROMPT_STEPS, SEGMENTER_STEPS = 10, 10
#: COCO train2014's image count: the size the marginal memory per image is projected to.
COCO_TRAIN_IMAGES = 82_783
#: Marginal peak RSS each stage may add per train image (KiB/image), the exit status's target.
#: What a stage holds for the whole run by design is per-image bookkeeping only: the split's
#: index records and the task list (an index record is about 0.5 KiB as Python objects,
#: tracemalloc; a task, a tuple of paths and digests, about as much); images, masks, CAMs,
#: features and seeds are read one at a time (training: one batch at a time) and per-image
#: results are summed as they arrive (seeds' and predict's confusion matrices), never kept.
#: 8 KiB/image leaves several times that bookkeeping and keeps a stage under 0.63 GiB above its
#: models at COCO train2014 size; a stage that kept every image's CLIP features (about 350 KiB
#: per image even with the demo's tiny CLIP, docs/performance.md) would be far over it.
MEMORY_TARGET_KIB = {stage: 8.0 for stage in STAGES}
#: Peak RSS of one stage varies by this much with no growth per image: at 20, 40 and 80 train
#: images train_prompts@seg peaked at 1,058, 1,026 and 1,012 MiB (its fixed-size batches are
#: drawn from a different dataset at each size), and predict, on the same 8 val images at every
#: size, at 947, 954 and 938 MiB. A rise smaller than this over the sizes run cannot be told
#: from that, so RSS_NOISE_MIB / (largest - smallest size) is allowed on top of the target: the
#: check resolves the target itself only over thousands of images (6,144 for twice the target).
RSS_NOISE_MIB = 48.0
#: Overrides of params.yaml, the same at every size: short trainings, and (unless
#: ``--default-settings``) the end-to-end test's lighter per-image settings (SAM's point grid 8
#: per side without crop layers, 2 cached views, one predict scale), so that thousands of images
#: fit a 2-core machine; the code paths are the same.
TRAINING = {
    "compute": {"scheduler": "local", "device": "cpu"},
    "prompts": {w: {"iterations": PROMPT_STEPS, "warmup_iterations": 2, "batch_size": 8,
                    "checkpoint_every": 5} for w in ("cls", "seg")},
    "segmenter": {"iterations": SEGMENTER_STEPS, "batch_size": 2, "val_every": SEGMENTER_STEPS,
                  "checkpoint_every": 5},
}
LIGHT = {
    "sam": {"points_per_side": 8, "points_per_batch": 64, "crop_n_layers": 0},
    "clip_features": {"n_views": 2},
    "predict": {"scales": [1.0], "alpha_sweep": [1.0, 2.0, 3.0]},
}
PROBLEMS: list[str] = []  # reported after the table; the script then exits non-zero
_LOOP_LINE = re.compile(r"wsss\S*: (?P<desc>[\w ]+): (?P<n>\d+) images in (?P<s>[\d.]+) s")


def project_params(n_train: int, n_val: int, scheduler: str = "local", light: bool = True) -> dict:
    params = json.loads(json.dumps(TRAINING))
    if light:
        params.update(json.loads(json.dumps(LIGHT)))
    params["dataset"] = {"demo": {"n_train": n_train, "n_val": n_val, "seed": 0}}
    params["compute"]["scheduler"] = scheduler
    return params


def bench_env(home: Path) -> dict:
    """dvc_env, with this checkout's code first on the path of every stage and dask worker."""
    env = dvc_env(home)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("WSSS_SCALE_RUSAGE", None)
    return env


def wrap_commands(repo: Path, rusage: Path) -> None:
    """Prefix every stage command of the project's dvc.yaml with this script's ``--rusage``
    wrapper (it appends one JSON line per command to ``rusage``)."""
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    for stage in dvc_yaml["stages"].values():
        body = stage["do"] if "do" in stage else stage
        body["cmd"] = f"{sys.executable} {Path(__file__).resolve()} --rusage {rusage} -- {body['cmd']}"
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))


def rusage_wrapper(out: Path, argv: list[str]) -> int:
    """Run ``argv``; append its wall seconds and peak RSS (wait4: the process and its waited-for
    descendants) to ``out``; exit with its status. The stage's die-with-parent watchdog then
    watches this process, which exits with it."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    _, status, usage = os.wait4(proc.pid, 0)
    with open(out, "a") as f:
        f.write(json.dumps({"argv": argv, "wall": time.perf_counter() - start,
                            "maxrss_mib": peak_rss_mib(usage), "utime": usage.ru_utime,
                            "stime": usage.ru_stime}) + "\n")
    return os.waitstatus_to_exitcode(status)


def timed_child(args: list[str], cwd: Path, env: dict, log: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB of the process tree as wait4 reports it, output)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(args)}\n{text}\n")
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{' '.join(args)} failed (exit {code}) in {cwd}:\n{text[-4000:]}")
    return wall, peak_rss_mib(usage), text


def tree_stats(paths: list[Path]) -> tuple[int, int]:
    """(files, bytes allocated as du counts them, hardlinks once) under ``paths``."""
    seen, files, blocks = set(), 0, 0
    for top in paths:
        walk = [top] if top.is_file() else (p for p in top.rglob("*") if p.is_file())
        for p in walk:
            st = p.lstat()
            files += 1
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                blocks += st.st_blocks * 512
    return files, blocks


def loop_seconds(repo: Path, desc: str) -> tuple[int, float] | None:
    """(images, seconds) of the last per-image loop ``desc`` logged in the project's logs."""
    found = None
    for log in sorted((repo / "cache" / "logs").glob("*.log")):
        for line in log.read_text().splitlines():
            m = _LOOP_LINE.search(line)
            if m and m["desc"] == desc:
                found = (int(m["n"]), float(m["s"]))
    return found


def build(root: Path, env: dict, n_train: int, n_val: int, scheduler: str = "local",
          light: bool = True) -> Path:
    repo = root / "repo"
    make_project(repo, env, project_params(n_train, n_val, scheduler, light))
    sh("dvc", "config", "core.analytics", "false", cwd=repo, env=env)
    return repo


def run_size(root: Path, n_train: int, n_val: int, log: Path, light: bool = True
             ) -> tuple[Path, dict, list[dict]]:
    env = bench_env(root / "home")
    repo = build(root, env, n_train, n_val, light=light)
    rusage = root / "rusage.jsonl"
    wrap_commands(repo, rusage)
    sh("git", "commit", "-q", "-am", "measured commands", cwd=repo, env=env)
    graph = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=repo, env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    if sorted(graph) != sorted(STAGES):
        # every stage of dvc.yaml is measured (its memory target included), and only those
        raise SystemExit(f"dvc.yaml's stages {sorted(graph)} are not this script's {sorted(STAGES)}")
    rows = []
    for stage, (outs, unit, desc) in STAGES.items():
        before = rusage.read_text().count("\n") if rusage.exists() else 0
        wall, tree_rss, out = timed_child(["dvc", "repro", "-s", stage], repo, env, log)
        assert f"Running stage '{stage}'" in out, out
        lines = rusage.read_text().splitlines()[before:]
        assert len(lines) == 1, (stage, lines)
        child = json.loads(lines[0])
        files, disk = tree_stats([repo / o for o in outs])
        if stage == "predict" or stage == "train_segmenter":
            n = n_val if stage == "predict" else SEGMENTER_STEPS
        elif stage.startswith("train_prompts"):
            n = PROMPT_STEPS
        elif stage == "sam_masks" or stage == "prepare":
            n = n_train + n_val
        elif stage == "panels":
            n = 1
        else:
            n = n_train
        loop = loop_seconds(repo, desc) if desc else None
        if desc is not None:
            assert loop is not None and loop[0] == n, (stage, loop, n)
        rows.append({"stage": stage, "size": n_train, "unit": unit, "n": n, "wall": wall,
                     "stage_wall": child["wall"], "loop": loop[1] if loop else None,
                     "cpu": child["utime"] + child["stime"],
                     "stage_rss_mib": child["maxrss_mib"], "tree_rss_mib": tree_rss,
                     "files": files, "disk_bytes": disk})
        print(f"  {n_train:>5} {stage:<18} {wall:7.1f} s wall  {wall / n:8.4f} s/{unit}"
              + (f"  loop {loop[1] / n:.4f} s/img" if loop else "")
              + f"  stage RSS {child['maxrss_mib']:6.0f} MiB  {files} files  "
              f"{disk / 2**20:.1f} MiB", flush=True)
    status = sh("dvc", "status", cwd=repo, env=env)
    clean = "Data and pipelines are up to date" in status
    print(f"  {n_train:>5} dvc status: " + ("clean" if clean else f"NOT CLEAN: {status.strip()}"), flush=True)
    if not clean:
        PROBLEMS.append(f"dvc status not clean at {n_train} train images: {status.strip()}")
    return repo, env, rows


# -- a real dask cluster ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dask_cluster(env: dict, workdir: Path, n_workers: int = 2):
    """``dask scheduler`` + ``n_workers`` ``dask worker --nthreads 1`` on 127.0.0.1, started in
    ``workdir`` (not the project: tasks must not depend on the workers' directory); yields the
    scheduler's address; every process is stopped on exit, however the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    logs = []

    def start(args, name):
        log = open(workdir / f"{name}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    try:
        start(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
               "--no-dashboard"], "scheduler")
        deadline = time.time() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.time() > deadline or procs[0].poll() is not None:
                raise SystemExit(f"dask scheduler did not start: {(workdir / 'scheduler.log').read_text()}")
            time.sleep(0.5)
        for i in range(n_workers):
            start(["dask", "worker", address, "--nthreads", "1", "--nworkers", "1",
                   "--host", "127.0.0.1", "--no-dashboard", "--local-directory", str(workdir / f"w{i}")],
                  f"worker{i}")
        code = ("import sys; from distributed import Client; c = Client(sys.argv[1], timeout='60s'); "
                "c.wait_for_workers(int(sys.argv[2]), timeout=120); print(len(c.scheduler_info()['workers']))")
        got = subprocess.run([sys.executable, "-c", code, address, str(n_workers)], env=env,
                             capture_output=True, text=True, timeout=300)
        if got.returncode:
            raise SystemExit(f"dask workers did not connect: {got.stderr[-2000:]}")
        yield address
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs:
            log.close()


def compare_trees(a: Path, b: Path, tops: list[str]) -> tuple[int, list[str]]:
    """(files compared, differences) of the files under ``tops`` of two projects."""
    diffs, n = [], 0
    for top in tops:
        fa = sorted(str(p.relative_to(a)) for p in (a / top).rglob("*") if p.is_file())
        fb = sorted(str(p.relative_to(b)) for p in (b / top).rglob("*") if p.is_file())
        if fa != fb:
            diffs.append(f"{top}: file lists differ ({len(fa)} vs {len(fb)}; "
                         f"e.g. {sorted(set(fa) ^ set(fb))[:3]})")
        common = sorted(set(fa) & set(fb))
        _, mismatch, errors = filecmp.cmpfiles(a, b, common, shallow=False)
        n += len(common)
        diffs += [f"differs: {m}" for m in mismatch] + [f"unreadable: {e}" for e in errors]
    return n, diffs


def scheduler_run(root: Path, serial_repo: Path, n_train: int, n_val: int, log: Path,
                  light: bool = True) -> None:
    env = bench_env(root / "home")
    repo = build(root, env, n_train, n_val, light=light)
    with dask_cluster(env, root / "dask") as address:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["compute"]["scheduler"] = address
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        print(f"dask: scheduler {address}, 2 workers (--nthreads 1), started in {root / 'dask'}",
              flush=True)
        wall, _, out = timed_child(["dvc", "repro"], repo, env, log)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, (stage, out[-3000:])
    print(f"dask run at {n_train} train images: dvc repro {wall:.0f} s")
    n, diffs = compare_trees(serial_repo, repo, PER_IMAGE_OUTS)
    print(f"dask vs serial: {n} files compared under {', '.join(PER_IMAGE_OUTS)}: "
          f"{len(diffs)} differ")
    for d in diffs[:20]:
        print("  " + d)
    if diffs:
        raise SystemExit("the dask run's artifacts differ from the serial run's")
    rest = ["cache/index", "cache/prompts", "cache/segmenter", "cache/metrics", "cache/plots"]
    n_all, diffs_all = compare_trees(serial_repo, repo, rest)
    print(f"dask vs serial, the rest of cache/ but logs ({', '.join(rest)}): {n_all} files, "
          f"{len(diffs_all)} differ" + (f" ({diffs_all[:5]})" if diffs_all else ""))
    if diffs_all:
        raise SystemExit("the dask run's other artifacts differ from the serial run's")


def same_images(work: Path, small: int, large: int, n_ids: int = 50) -> dict[str, float]:
    """The per-image tasks of ``sam_masks`` and ``seeds@coarse`` on the same ``n_ids`` images in
    the smallest and the largest project (kept under ``work``), calls interleaved, each writing
    into its project's store: does an image cost more in a larger store? CPU seconds, so what
    else runs on the machine matters less. Returns {stage: CPU ratio large/small}."""
    from pipeline.data.datasets import load_split
    from pipeline.params import SamConfig, SeedsConfig, check_sections, section
    from pipeline.provenance import image_inputs, labelled_inputs
    from pipeline.sam.maskers import MasksTask, build_masker, masks_for_image
    from pipeline.schemas import open_cams, open_masks
    from pipeline.seeds.image import SeedsTask, seeds_for_image

    ids = [f"demo_{i:04d}" for i in range(0, min(small, 2 * n_ids), 2)]
    tasks: dict[str, dict[int, list]] = {"sam_masks": {}, "seeds@coarse": {}}
    for n in (small, large):
        repo = work / f"n{n}" / "repo"
        params = yaml.safe_load((repo / "params.yaml").read_text())
        check_sections(params)
        cfg = section(params, "sam", SamConfig)
        masker = build_masker(world_seed=0, model=cfg.model, checkpoint=None, checkpoint_sha256=None,
                              mask_threshold=cfg.mask_threshold, device="cpu", precision="fp32",
                              **cfg.generator_settings())
        split = load_split(repo / "cache/index", "train")
        recs = {r.id: r for r in split.records}
        sam = str(repo / "cache/sam_masks.zarr")
        tasks["sam_masks"][n] = [(masker, MasksTask(i, str(repo / recs[i].image), sam, image_inputs(recs[i])))
                                 for i in ids]
        scfg = section(params, "seeds", SeedsConfig)
        stores = (open_cams(str(repo / "cache/cams/cls.zarr")), open_masks(sam))  # as the stage opens them
        tasks["seeds@coarse"][n] = [
            (stores, SeedsTask(i, recs[i].height, recs[i].width, str(repo / recs[i].label),
                               str(repo / "cache/seeds/coarse" / f"{i}.png"), scfg.coarse.alpha,
                               scfg.fallback_thresh, tuple(scfg.cam_bg_powers), len(split.class_names) + 1,
                               labelled_inputs(recs[i]), image_inputs(recs[i])))
            for i in ids]
    ratios = {}
    for stage, fn in (("sam_masks", masks_for_image), ("seeds@coarse", seeds_for_image)):
        cpu = {small: 0.0, large: 0.0}
        for k in range(len(ids)):
            for n in (small, large):
                res, item = tasks[stage][n][k]
                start = time.process_time()
                fn(res, item)
                cpu[n] += time.process_time() - start
        ratios[stage] = cpu[large] / cpu[small]
        print(f"same {len(ids)} images, {stage}: CPU s per image {cpu[small] / len(ids):.4f} in the "
              f"{small}-image project, {cpu[large] / len(ids):.4f} in the {large}-image one "
              f"(ratio {ratios[stage]:.2f})", flush=True)
    return ratios


# -- report ------------------------------------------------------------------------------------------

def print_table(rows: list[dict], sizes: list[int]) -> tuple[float, dict]:
    by = {(r["stage"], r["size"]): r for r in rows}
    print()
    print(f"{'stage':<18} {'train':>6} {'units':>6} {'wall s':>8} {'wall/u':>9} {'loop/img':>9} "
          f"{'marg/img':>9} {'cpu s':>7} {'cpu marg':>9} {'stage RSS':>10} {'dvc RSS':>8} {'files':>7} "
          f"{'disk MiB':>9}")
    for stage, (_, unit, desc) in STAGES.items():
        prev = None
        for size in sizes:
            r = by.get((stage, size))
            if r is None:  # rows of a run from before the stage existed (--table-from)
                continue
            marg = cpu_marg = ""
            if prev is not None and r["n"] != prev["n"]:
                marg = f"{(r['wall'] - prev['wall']) / (r['n'] - prev['n']):.4f}"
                cpu_marg = f"{(r['cpu'] - prev['cpu']) / (r['n'] - prev['n']):.4f}"
            loop = f"{r['loop'] / r['n']:.4f}" if r["loop"] is not None else ""
            dvc_rss = f"{r['tree_rss_mib']:.0f}" if r["tree_rss_mib"] > r["stage_rss_mib"] + 1 else "-"
            print(f"{stage:<18} {size:>6} {r['n']:>6} {r['wall']:>8.1f} {r['wall'] / r['n']:>9.4f} "
                  f"{loop:>9} {marg:>9} {r['cpu']:>7.1f} {cpu_marg:>9} {r['stage_rss_mib']:>10.0f} "
                  f"{dvc_rss:>8} {r['files']:>7} "
                  f"{r['disk_bytes'] / 2**20:>9.1f}")
            prev = r
    small, large = sizes[0], sizes[-1]
    growth, detail = 1.0, {}
    for stage in PER_IMAGE:
        a, b = by[(stage, small)], by[(stage, large)]
        wall_g = (b["wall"] / b["n"]) / (a["wall"] / a["n"])
        loop_g = (b["loop"] / b["n"]) / (a["loop"] / a["n"])
        # CPU seconds do not depend on what else the machine runs, wall seconds do: the marginal
        # CPU seconds per image of the last step of sizes over the first (the whole process's
        # CPU for predict, whose image count does not change).
        if a["n"] == b["n"] or len(sizes) < 3:
            cpu_g = (b["cpu"] / b["n"]) / (a["cpu"] / a["n"])
        else:
            a2, b2 = by[(stage, sizes[1])], by[(stage, sizes[-2])]
            cpu_g = ((b["cpu"] - b2["cpu"]) / (b["n"] - b2["n"])) / ((a2["cpu"] - a["cpu"]) / (a2["n"] - a["n"]))
        detail[stage] = {"wall_growth": wall_g, "loop_growth": loop_g, "cpu_growth": cpu_g}
        growth = max(growth, wall_g, loop_g, cpu_g)
    print(f"\ngrowth from {small} to {large} train images (per image; largest over smallest; "
          "cpu: marginal CPU s per image of the last size step over the first):")
    for stage, d in detail.items():
        print(f"  {stage:<14} wall/u {d['wall_growth']:.2f}  loop/img {d['loop_growth']:.2f}  "
              f"cpu marg {d['cpu_growth']:.2f}")
    return growth, detail


def rss_slope_kib(points: list[tuple[int, float]]) -> float:
    """KiB per image: the least-squares slope of peak RSS (MiB) over images, from (images, MiB)
    pairs of at least two distinct image counts."""
    xs, ys = [x for x, _ in points], [y * 1024 for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a slope needs at least two distinct image counts")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def memory_fits(rows: list[dict]) -> list[dict]:
    """Per stage of ``MEMORY_TARGET_KIB``: the marginal peak RSS per train image over the rows'
    sizes, its COCO train2014 projection, the target, the allowance (target + ``RSS_NOISE_MIB``
    over the range of sizes) and ``ok``. A stage with no rows, or rows at one size only, is a
    ``ValueError``: a stage left out is not a pass."""
    fits = []
    for stage, target in MEMORY_TARGET_KIB.items():
        points = [(r["size"], r["stage_rss_mib"]) for r in rows if r["stage"] == stage]
        if not points:
            raise ValueError(f"no peak RSS measured for stage {stage}")
        span = max(x for x, _ in points) - min(x for x, _ in points)
        slope = rss_slope_kib(points)
        allowed = target + RSS_NOISE_MIB * 1024 / span
        fits.append({"stage": stage, "kib_per_image": slope,
                     "coco_gib": slope * COCO_TRAIN_IMAGES / 2**20, "target_kib": target,
                     "allowed_kib": allowed, "ok": slope <= allowed,
                     "sizes": sorted({x for x, _ in points})})
    return fits


def memory_lines(fits: list[dict]) -> list[str]:
    """The machine-readable lines: one ``MEMORY`` line per stage, then ``MEMORY_VERDICT``."""
    lines = [f"MEMORY stage={f['stage']} kib_per_image={f['kib_per_image']:.1f} "
             f"coco_gib={f['coco_gib']:.2f} target_kib={f['target_kib']:.1f} "
             f"allowed_kib={f['allowed_kib']:.1f} verdict={'ok' if f['ok'] else 'over'}" for f in fits]
    over = [f["stage"] for f in fits if not f["ok"]]
    lines.append(f"MEMORY_VERDICT verdict={'over' if over or not fits else 'ok'} stages={len(fits)} "
                 f"over={len(over)}" + (f" names={','.join(over)}" if over else ""))
    return lines


def print_memory(rows: list[dict]) -> bool:
    """Print the marginal memory per image of every stage and the verdict; True when every stage
    is within its allowance."""
    try:
        fits = memory_fits(rows)
    except ValueError as exc:  # rows without a stage, or at one size: nothing to pass
        print(f"\nMEMORY_VERDICT verdict=unmeasured ({exc})")
        return False
    sizes = fits[0]["sizes"]
    print(f"\nmarginal peak RSS per train image (least-squares slope over {', '.join(map(str, sizes))} "
          f"train images; COCO: x {COCO_TRAIN_IMAGES:,}; allowed: target + {RSS_NOISE_MIB:.0f} MiB "
          f"of peak-RSS spread over {sizes[-1] - sizes[0]} images):")
    print(f"  {'stage':<18} {'KiB/image':>10} {'COCO GiB':>9} {'target':>7} {'allowed':>8}")
    for f in fits:
        print(f"  {f['stage']:<18} {f['kib_per_image']:>10.1f} {f['coco_gib']:>9.2f} "
              f"{f['target_kib']:>7.1f} {f['allowed_kib']:>8.1f}" + ("" if f["ok"] else "  OVER"))
    for line in memory_lines(fits):
        print(line)
    return all(f["ok"] for f in fits)


def projection(rows: list[dict], sizes: list[int]) -> None:
    """VOC and COCO totals (computed, not measured) from the per-image costs of the two largest
    sizes: the marginal wall seconds per image (DVC's per-file work in, fixed costs out; the
    loop's seconds per image for predict, whose image count does not change), plus the fixed
    wall seconds of the largest size (its wall less n times that cost); files and disk per image
    at the largest size."""
    counts = {"VOC": (10_582, 1_449), "COCO": (82_081, 40_137)}
    by = {(r["stage"], r["size"]): r for r in rows}
    last = sizes[-1]
    print(f"\ncomputed from the per-image costs at {sizes[-2] if len(sizes) > 1 else last}-{last} "
          "train images (demo models and settings, this CPU, one process):")
    header = f"  {'stage':<14} {'s/img':>7} {'fixed s':>8}"
    for name, (train, val) in counts.items():
        header += f" {name + ' h':>9} {name + ' files':>12} {name + ' GiB':>9}"
    print(header)
    for stage in PER_IMAGE:
        r = by[(stage, last)]
        per = r["loop"] / r["n"]
        if len(sizes) > 1 and by[(stage, sizes[-2])]["n"] != r["n"]:
            p = by[(stage, sizes[-2])]
            per = max((r["wall"] - p["wall"]) / (r["n"] - p["n"]), per)
        fixed = max(r["wall"] - per * r["n"], 0.0)
        line = f"  {stage:<14} {per:>7.4f} {fixed:>8.1f}"
        for name, (train, val) in counts.items():
            n = train + val if stage == "sam_masks" else val if stage == "predict" else train
            line += (f" {(fixed + per * n) / 3600:>9.2f} {r['files'] / r['n'] * n:>12,.0f}"
                     f" {r['disk_bytes'] / r['n'] * n / 2**30:>9.1f}")
        print(line)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--rusage":
        sep = sys.argv.index("--")
        raise SystemExit(rusage_wrapper(Path(sys.argv[2]), sys.argv[sep + 1:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[10, 20, 40],
                    help="train-split sizes (dataset.demo.n_train), smallest first")
    ap.add_argument("--val", type=int, default=8, help="eval-split size (dataset.demo.n_val)")
    ap.add_argument("--scheduler", action="store_true",
                    help="also run the smallest size on a real dask cluster and compare artifacts")
    ap.add_argument("--default-settings", action="store_true",
                    help="params.yaml's per-image settings (SAM grid, views, predict scales)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the projects here")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    ap.add_argument("--same-images", type=Path, default=None,
                    help="with --table-from: the --workdir the run kept; also time sam_masks' and "
                         "seeds@coarse's tasks on the same images in its smallest and largest project")
    ap.add_argument("--table-from", type=Path, default=None,
                    help="print the table and ratios of rows a run wrote with --json; run nothing")
    args = ap.parse_args()
    if args.table_from:
        rows = json.loads(args.table_from.read_text())
        sizes = sorted({r["size"] for r in rows})
        growth, _ = print_table(rows, sizes)
        projection(rows, sizes)
        if args.same_images:
            print()
            same_images(args.same_images, sizes[0], sizes[-1])
        memory_ok = print_memory(rows)
        print_ratio("per_image_growth", growth)
        if not memory_ok:
            raise SystemExit(1)
        return
    sizes = sorted(set(args.images))
    if len(sizes) < 2:
        ap.error("--images: at least two distinct sizes (the marginal memory per image is a slope)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="wsss-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    print(f"projects and logs under {work}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
          flush=True)
    rows, repos = [], {}
    t0 = time.time()
    try:
        for size in sizes:
            repo, _, got = run_size(work / f"n{size}", size, args.val, log, not args.default_settings)
            repos[size] = repo
            rows += got
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
        if args.scheduler:
            scheduler_run(work / f"n{sizes[0]}-dask", repos[sizes[0]], sizes[0], args.val, log,
                          not args.default_settings)
    finally:
        if args.workdir is None and not os.environ.get("WSSS_SCALE_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    growth, _ = print_table(rows, sizes)
    projection(rows, sizes)
    print(f"\ntotal {time.time() - t0:.0f} s; load average at end {os.getloadavg()[0]:.1f}")
    memory_ok = print_memory(rows)
    for problem in PROBLEMS:
        print(f"PROBLEM: {problem}")
    print_ratio("per_image_growth", growth)
    if PROBLEMS or not memory_ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
