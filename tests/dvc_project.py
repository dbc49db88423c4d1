"""Temporary git + DVC projects built from this repository's dvc.yaml, for end-to-end tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def dvc_env(home: Path) -> dict:
    """Environment for git/dvc subprocesses: the venv's bin first (``wsss``), a private HOME."""
    env = dict(os.environ)
    env.pop("WSSS_LOG_DIR", None)  # stages log into the project's cache/logs, as for users
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org", DVC_NO_ANALYTICS="1", HOME=str(home),
               OMP_NUM_THREADS="1")
    home.mkdir(parents=True, exist_ok=True)
    return env


def sh(*args, cwd, env, check=True, timeout=1200) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def tree_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _deep_update(tree: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_update(tree[key], value)
        else:
            tree[key] = value


def make_project(root: Path, env: dict, params_update: dict | None = None,
                 stages: tuple[str, ...] | None = None, sections: tuple[str, ...] | None = None,
                 graph: bool = True) -> None:
    """A git+DVC repo holding (a subset of) dvc.yaml, its code deps and a params.yaml; with
    ``graph=False`` none of them (a project for ``dvc add``-ed data, as benchmarks/stores.py
    times). Either way this repository's DVC config and git-ignore rules, all committed."""
    root.mkdir(parents=True)
    if graph:
        dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
        if stages is not None:
            dvc_yaml["stages"] = {name: dvc_yaml["stages"][name] for name in stages}
        (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
        for folder in ("pipeline", "stages"):
            shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        if sections is not None:
            params = {k: params[k] for k in sections}
        _deep_update(params, params_update or {})
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=root, env=env)
    sh("dvc", "init", "-q", cwd=root, env=env)
    # the project's own DVC config (offline plot template) and git-ignore rules
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-q", "-m", "project", cwd=root, env=env)


def ran_stages(output: str) -> set[str]:
    """Names of the stages a `dvc repro` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}
