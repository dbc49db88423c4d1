"""The demo's ablation on several worlds: does the method show its order on every world?

Runs the whole graph (``dvc repro``, the demo's defaults) once per world, in one workspace, the way
a user switches worlds (``dataset.demo.seed`` edited in params.yaml, then ``dvc repro``), reads
``wsss report --json`` after each, and prints one row per world: the all-background score, CAM,
CAM + CAA, coarse seeds, seg-prompt CAM, fine seeds, segmenter raw and post-processed (val mIoU,
percent), and the floors a world misses. The floors (issue 31) are what the paper's ablation order
asks of the demo::

    CAM >= 40; coarse >= CAM + 10; fine >= coarse and fine >= 55;
    segmenter raw >= fine - 10; post-processed >= raw

The last line is ``DEMO_WORLDS worlds=N ordered=K`` (K: worlds on which every floor holds); the exit
status is non-zero unless K == N. ``--set KEY=VALUE`` (repeatable) changes params for every world
(``--set cams.cls.caa.enabled=true`` measures CAA), ``--json FILE`` writes the rows.

    python benchmarks/demo_worlds.py --worlds 0 1 2 3 4
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml
from harness import dvc_env, make_project, sh

COLUMNS = (  # (report key, column title)
    ("background_only_miou", "all-bg"),
    ("cam_miou", "CAM"),
    ("cam_caa_miou", "+CAA"),
    ("coarse_seed_miou", "coarse"),
    ("seg_cam_miou", "seg CAM"),
    ("fine_seed_miou", "fine"),
    ("predict_raw_miou", "seg raw"),
    ("predict_post_miou", "seg post"),
)
CAM_FLOOR = 40.0
COARSE_OVER_CAM = 10.0
FINE_FLOOR = 55.0
SEGMENTER_UNDER_FINE = 10.0


def missed_floors(row: dict) -> list[str]:
    """The floors of the ablation order that ``row`` (``wsss report --json``'s values) misses; a
    missing value misses every floor it takes part in."""
    def v(key: str) -> float:
        value = row.get(key)
        return float("nan") if value is None else float(value)

    cam, coarse, fine = v("cam_miou"), v("coarse_seed_miou"), v("fine_seed_miou")
    raw, post = v("predict_raw_miou"), v("predict_post_miou")
    checks = (
        (f"CAM >= {CAM_FLOOR:g}", cam >= CAM_FLOOR),
        (f"coarse >= CAM + {COARSE_OVER_CAM:g}", coarse >= cam + COARSE_OVER_CAM),
        ("fine >= coarse", fine >= coarse),
        (f"fine >= {FINE_FLOOR:g}", fine >= FINE_FLOOR),
        (f"raw >= fine - {SEGMENTER_UNDER_FINE:g}", raw >= fine - SEGMENTER_UNDER_FINE),
        ("post >= raw", post >= raw),
    )
    return [name for name, ok in checks if not ok]  # NaN compares False: missing values fail


def _set(params: dict, dotted: str, value) -> None:
    node = params
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    if last not in node:
        raise SystemExit(f"--set {dotted}: no such key in params.yaml")
    node[last] = value


def run_world(repo: Path, env: dict, world: int, settings: dict) -> dict:
    params_path = repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    _set(params, "dataset.demo.seed", world)
    for key, value in settings.items():
        _set(params, key, value)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.perf_counter()
    sh("dvc", "repro", cwd=repo, env=env, timeout=3600)
    seconds = time.perf_counter() - start
    out = sh("wsss", "report", "--json", cwd=repo, env=env)
    row = json.loads(out[out.index("{"):out.rindex("}") + 1])  # log lines may surround it
    return {"world": world, "seconds": round(seconds, 1), **row}


def table(rows: list[dict]) -> str:
    head = ["world", *(title for _, title in COLUMNS), "missed floors"]
    lines = [" | ".join(head)]
    for row in rows:
        cells = [str(row["world"])]
        for key, _ in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else f"{value:.1f}")
        missed = missed_floors(row)
        cells.append(", ".join(missed) if missed else "none")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="KEY=VALUE", help="A params.yaml value for every world (YAML).")
    parser.add_argument("--workspace", type=Path, default=None,
                        help="Where the project is made (default: a temporary folder).")
    parser.add_argument("--json", dest="json_out", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item}: expected KEY=VALUE")
        settings[key] = yaml.safe_load(value)
    work = args.workspace or Path(tempfile.mkdtemp(prefix="demo_worlds_"))
    env = dvc_env(work / "home")
    env.pop("OMP_NUM_THREADS", None)  # a user's run: every core (dvc_env pins 1 for the tests)
    repo = work / "repo"
    if not (repo / "dvc.yaml").is_file():
        make_project(repo, env)
    rows = []
    for world in args.worlds:
        row = run_world(repo, env, world, settings)
        rows.append(row)
        print(f"world {world}: {row['seconds']:.0f} s", file=sys.stderr, flush=True)
        if args.json_out:  # after each world: a long run's rows so far stay readable
            args.json_out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    ordered = sum(not missed_floors(r) for r in rows)
    print(f"DEMO_WORLDS worlds={len(rows)} ordered={ordered}")
    return 0 if ordered == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
