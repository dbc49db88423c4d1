"""Compare the artifacts of two runs of the graph, file by file: for a change that must not change
results (a refactor), or to see exactly what an experiment changed.

    python benchmarks/artifacts_diff.py OLD_PROJECT NEW_PROJECT [--ignore-key fingerprint ...]

Both arguments are project folders after `dvc repro` (their ``cache/`` is compared; ``cache/logs``
is left out). A file is *identical* (same bytes), *equal but for* the ignored keys (JSON and
zarr.json attributes compared as data, torch files tensor by tensor, with keys named by
``--ignore-key`` dropped at any depth), or *different*. The ignored keys default to ``code`` and
``fingerprint``: the stores and checkpoints record a digest of the source of the modules that
computed them (``pipeline.provenance.code_digest``), which changes whenever code moves.

Prints one line per file that is not identical, then
``ARTIFACTS identical=N equal_but_ignored=M different=K only_old=A only_new=B`` and exits 1 when
K, A or B is not 0. Also prints which ``dvc.lock`` outputs have the same hash in both.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

DEFAULT_IGNORED = ("code", "fingerprint")


def _files(root: Path) -> dict[str, Path]:
    cache = root / "cache"
    return {str(p.relative_to(root)): p for p in sorted(cache.rglob("*"))
            if p.is_file() and "logs" not in p.relative_to(cache).parts[:1]}


def _strip(obj, ignored: set[str]):
    if isinstance(obj, dict):
        return {k: _strip(v, ignored) for k, v in obj.items() if k not in ignored}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, ignored) for v in obj)
    return obj


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _load(path: Path):
    """The file as data when it is JSON or a torch file; None for other formats."""
    if path.suffix == ".json" or path.name == "zarr.json":
        return json.loads(path.read_text())
    if path.suffix in (".pt", ".pth") or path.name.endswith(".pt.resume"):
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)
    return None


def compare_file(old: Path, new: Path, ignored: set[str]) -> str:
    """``identical``, ``equal_but_ignored`` or ``different``."""
    if old.read_bytes() == new.read_bytes():
        return "identical"
    a, b = _load(old), _load(new)
    if a is None or b is None:
        return "different"
    return "equal_but_ignored" if _equal(_strip(a, ignored), _strip(b, ignored)) else "different"


def lock_outs(root: Path) -> dict[str, str]:
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    outs = {}
    for stage in yaml.safe_load(lock.read_text()).get("stages", {}).values():
        for out in stage.get("outs", []):
            outs[out["path"]] = out.get("md5", "")
    return outs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--ignore-key", action="append", default=None,
                        help=f"key dropped at any depth before comparing data (default: {', '.join(DEFAULT_IGNORED)})")
    args = parser.parse_args(argv)
    ignored = set(args.ignore_key or DEFAULT_IGNORED)
    old, new = _files(args.old), _files(args.new)
    counts = {"identical": 0, "equal_but_ignored": 0, "different": 0}
    for name in sorted(set(old) & set(new)):
        verdict = compare_file(old[name], new[name], ignored)
        counts[verdict] += 1
        if verdict != "identical":
            print(f"{verdict}: {name}")
    only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    for name in only_old:
        print(f"only in {args.old}: {name}")
    for name in only_new:
        print(f"only in {args.new}: {name}")
    a, b = lock_outs(args.old), lock_outs(args.new)
    for path in sorted(set(a) & set(b)):
        print(f"dvc.lock {path}: {'same hash' if a[path] == b[path] else 'other hash'}")
    print(f"ARTIFACTS identical={counts['identical']} equal_but_ignored={counts['equal_but_ignored']} "
          f"different={counts['different']} only_old={len(only_old)} only_new={len(only_new)}")
    return 1 if counts["different"] or only_old or only_new else 0


if __name__ == "__main__":
    sys.exit(main())
