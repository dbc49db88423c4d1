"""The code's layout (issue 29, spec/style.md): the method is a library in pipeline/, each stage a
thin command over it, and dvc.yaml's code deps follow the code.

Static checks on the source (ast), so they run in milliseconds and fail on the commit that
breaks the layout, not on a later reader's confusion.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# stages/ modules that are the application's own plumbing, not a stage command.
SHARED_STAGE_MODULES = {"stages", "stages.cli", "stages.params", "stages.execution", "stages.resources",
                        "stages.logs", "stages.watch"}
# Plumbing that decides where and how work runs, never what it produces (like compute.*): not a
# code dep of any stage in dvc.yaml.
NOT_RESULT_CODE = SHARED_STAGE_MODULES
DEMO_NAMES = {"demo", "world-oracle", "demo_clip_vit", "wsss-demo-ViT-16"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every first-party module ``path`` imports, at any depth (lazy imports in functions count:
    they run)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pipeline.sam import models` imports pipeline.sam.models
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("pipeline", "stages") and _is_module(name):
                found.add(name)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # `pipeline.x.func`: an attribute of a module, not a module
        return False


def _command_modules() -> set[str]:
    from stages.cli import COMMANDS

    return {f"stages.{module}" for module, _ in COMMANDS.values()}


def test_no_stage_imports_another_stage():
    commands = _command_modules()
    for path in _python_files("stages"):
        name = _module_name(path)
        bad = {m for m in _imports(path) if m.startswith("stages") and m not in SHARED_STAGE_MODULES}
        assert not bad - {name}, f"{name} imports stage module(s) {sorted(bad - {name})}"
    assert commands <= {_module_name(p) for p in _python_files("stages")}


@pytest.mark.parametrize("folder", ["pipeline", "benchmarks"])
def test_library_and_benchmarks_use_no_stage_module(folder):
    allowed = {"stages.cli"} if folder == "benchmarks" else set()  # benchmarks run the CLI itself
    for path in _python_files(folder):
        bad = {m for m in _imports(path) if m.startswith("stages")} - allowed
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_stage_commands_are_thin():
    commands = _command_modules()
    for path in _python_files("stages"):
        lines = len(path.read_text().splitlines())
        limit = 200 if _module_name(path) in commands else 300
        assert lines <= limit, f"{path.relative_to(ROOT)} has {lines} lines (at most {limit})"


def _rewrapping_handlers(tree: ast.AST):
    """``except X as e: raise SomeError(str(e))``: a translation the CLI does in one place."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.ExceptHandler) or node.name is None or len(node.body) != 1:
            continue
        stmt = node.body[0]
        if (isinstance(stmt, ast.Raise) and isinstance(stmt.exc, ast.Call) and len(stmt.exc.args) == 1
                and isinstance(arg := stmt.exc.args[0], ast.Call) and getattr(arg.func, "id", None) == "str"
                and len(arg.args) == 1 and getattr(arg.args[0], "id", None) == node.name):
            yield node.lineno


def test_no_per_stage_error_translation():
    for folder in ("stages", "pipeline"):
        for path in _python_files(folder):
            if path == ROOT / "stages" / "cli.py":  # the one place that turns errors into lines
                continue
            lines = list(_rewrapping_handlers(ast.parse(path.read_text())))
            assert not lines, f"{path.relative_to(ROOT)}:{lines[0]} re-raises an error as str(exc)"


def test_no_core_module_or_stage_branches_on_a_demo_name():
    """The demo registers its dataset, SAM generators, weights and segmenter from pipeline/demo/;
    nothing else compares a value with one of its names."""
    for folder in ("stages", "pipeline"):
        for path in _python_files(folder):
            if "demo" in path.relative_to(ROOT).parts[:-1]:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare):
                    consts = {c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)}
                    assert not consts & DEMO_NAMES, (
                        f"{path.relative_to(ROOT)}:{node.lineno} compares with {sorted(consts & DEMO_NAMES)}")


def test_sections_are_the_schema():
    from pipeline.params import SECTIONS, Params

    assert SECTIONS == tuple(f.name for f in dataclasses.fields(Params))
    assert set(yaml.safe_load((ROOT / "params.yaml").read_text())) == set(SECTIONS)


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_RESULT_CODE:
            continue
        seen.add(name)
        origin = importlib.util.find_spec(name).origin
        todo.extend(_imports(Path(origin)))
        if name == "pipeline.registry":  # every lookup imports the plugins (by name, not statically)
            from pipeline.registry import PLUGINS

            todo.extend(PLUGINS)
    return seen


def _file(module: str) -> str:
    return str(Path(importlib.util.find_spec(module).origin).relative_to(ROOT))


def _stage_code_deps() -> dict[str, tuple[str, set[str]]]:
    """dvc.yaml stage -> (its command module, the .py files it lists as deps)."""
    from stages.cli import COMMANDS

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    out = {}
    for stage, spec in dvc["stages"].items():
        body = spec.get("do", spec)
        command = body["cmd"].split()[1]
        module = f"stages.{COMMANDS[command][0]}"
        keys = spec["foreach"].keys() if isinstance(spec.get("foreach"), dict) else [None]
        items = spec["foreach"].values() if isinstance(spec.get("foreach"), dict) else [None]
        deps = set()
        for item in items:
            for dep in body["deps"]:
                if isinstance(item, dict):
                    for k, v in item.items():
                        dep = dep.replace("${item.%s}" % k, v)
                if dep.endswith(".py"):
                    deps.add(dep)
        out[stage] = (module, deps, list(keys))
    return out


def _registered_code() -> set[str]:
    """The files of code the demo registers by ``"module:callable"`` name (run by a stage when
    params choose that entry; outside every static closure, so a stage that runs it lists it)."""
    text = (ROOT / "pipeline" / "demo" / "registry.py").read_text()
    modules = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for value in [node.value]:
                name = value.split(":")[0]
                if value.startswith("pipeline.") and _is_module(name):
                    modules |= _closure(name)
    return {_file(m) for m in modules}


def test_dvc_code_deps_are_the_stages_import_closure():
    """Every module whose code a stage runs (its import closure in pipeline/ and its own file) is
    a dep in dvc.yaml, and every other listed .py file is code the demo registers by name: a moved
    or new module cannot be forgotten, a deleted one cannot linger."""
    registered = _registered_code()
    for stage, (module, deps, _) in _stage_code_deps().items():
        closure = {_file(m) for m in _closure(module) if Path(importlib.util.find_spec(m).origin).suffix == ".py"
                   and not importlib.util.find_spec(m).origin.endswith("__init__.py")}
        assert closure - deps == set(), f"{stage}: dvc.yaml lacks code deps {sorted(closure - deps)}"
        assert deps - closure <= registered, (
            f"{stage}: dvc.yaml lists code the stage does not run {sorted(deps - closure - registered)}")
        assert all((ROOT / d).is_file() for d in deps), f"{stage}: a listed file does not exist"


def test_light_commands_do_not_import_torch():
    """prepare, configure and report touch no network: importing torch would add ~1 s and
    ~570 MiB of peak RSS to each (the params schema once pulled it in through pipeline.precision)."""
    import subprocess
    import sys

    code = ("import sys, stages.prepare, stages.configure, stages.report, pipeline.params; "
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out
