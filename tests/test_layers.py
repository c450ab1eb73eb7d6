"""The package's layers, kept: each wing imports only the wings below it, no module imports itself
round a circle, and each DVC stage depends on every module its command imports (and on no analysis
module it does not run, so editing one leaves `dvc status` clean).

  0 core        errors, files, keys, config, internals (and the package's __init__)
  1 tracking    store, lineage, backlog, logger, sync, repeats, tasks
  2 training    config, network, heads, module, data, idx, fetch, callbacks, checkpoints, ... train
  3 analysis    compare, stats, evaluate, predict, register
  4 the top     cli, and the user entry points cnnlab.train/fetch/evaluate and cnnlab.heads
                (kept for `python -m cnnlab.train` and for MLflow models pickled with that path)

Every import counts: at the top, inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import json
import shlex
import subprocess
from pathlib import Path

import yaml

from conftest import REPO

SRC = REPO / "src"
PACKAGE = SRC / "cnnlab"
WINGS = {"core": 0, "tracking": 1, "training": 2, "analysis": 3}
TOP = 4


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package's own __init__: a docstring and the version
    return WINGS.get(parts[1], TOP)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every cnnlab module `path` imports, wherever the import statement is."""
    found = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from cnnlab.tracking import sync` imports the module sync
                found.append((node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base))
    result = []
    for line, name in found:
        if name == "cnnlab" or name.startswith("cnnlab."):
            while name not in MODULES:  # `import cnnlab.x.y.Name`-like spellings: the module that holds it
                assert "." in name, f"{path}:{line}: {name} is no module of cnnlab"
                name = name.rpartition(".")[0]
            result.append((line, name))
    return result


GRAPH = {module: {name for _, name in imports(path)} - {module} for module, path in MODULES.items()}


def closure(module: str) -> set[str]:
    """The modules importing `module` runs, with the packages above each (Python runs their __init__)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for up in [".".join(parts[:i]) for i in range(1, len(parts) + 1)]:
            if up not in seen:
                seen.add(up)
                todo.extend(GRAPH[up])
    return seen


def test_no_module_imports_a_higher_layer():
    upward = [f"{MODULES[module].relative_to(REPO)}:{line} imports {name} (layer {layer(name)} > {layer(module)})"
              for module, path in MODULES.items() for line, name in imports(path) if layer(name) > layer(module)]
    assert upward == [], "analysis -> training -> tracking -> core, never back:\n" + "\n".join(upward)


def test_no_circle_between_modules():
    state, path, circles = {}, [], []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for name in sorted(GRAPH[module]):
            if state.get(name) == "open":
                circles.append(" -> ".join(path[path.index(name):] + [name]))
            elif name not in state:
                visit(name)
        path.pop()
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
    assert circles == [], "circles:\n" + "\n".join(circles)


def test_the_rule_holds_for_a_planted_upward_import_and_circle(monkeypatch):
    """The two checks above fail when they should (they would pass on an empty graph too)."""
    assert layer("cnnlab.core.config") < layer("cnnlab.tracking.store") < layer("cnnlab.training.train")
    assert layer("cnnlab.training.train") < layer("cnnlab.analysis.compare") < layer("cnnlab.cli")
    assert "cnnlab.tracking.store" in GRAPH["cnnlab.training.train"]
    assert "cnnlab.core.config" in closure("cnnlab.analysis.evaluate")
    monkeypatch.setitem(GRAPH, "cnnlab.core.keys", {"cnnlab.tracking.repeats"})  # repeats imports keys
    try:
        test_no_circle_between_modules()
    except AssertionError as exc:
        assert "cnnlab.core.keys -> cnnlab.tracking.repeats -> cnnlab.core.keys" in str(exc)
    else:
        raise AssertionError("a planted circle went unnoticed")


def test_the_hydra_plugin_uses_cnnlab_from_above():
    """src/hydra_plugins is a user of the package: it may import any wing, and no module of cnnlab
    imports it."""
    for path in (SRC / "hydra_plugins").rglob("*.py"):
        assert [name for _, name in imports(path)], f"{path} imports nothing of cnnlab?"
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("hydra_plugins") for n in names), f"{path}:{node.lineno} imports hydra_plugins"


def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_each_dvc_stage_depends_on_every_module_its_command_imports():
    for name, stage in stages().items():
        words = shlex.split(stage["cmd"])
        module = words[words.index("-m") + 1]
        assert module in MODULES, f"stage {name} runs {module}, no module of cnnlab"
        deps = [d for d in stage["deps"] if d.startswith("src/")]
        missing = sorted(str(MODULES[m].relative_to(REPO)) for m in closure(module)
                         if not any(MODULES[m].relative_to(REPO).as_posix() == d
                                    or MODULES[m].relative_to(REPO).as_posix().startswith(d.rstrip("/") + "/")
                                    for d in deps))
        assert missing == [], f"stage {name} ({module}) imports code its deps do not list: {missing}"


def test_the_evaluate_stage_does_not_depend_on_the_other_analysis_modules():
    deps = stages()["evaluate"]["deps"]
    for other in ("compare", "predict", "register", "stats"):
        path = MODULES[f"cnnlab.analysis.{other}"].relative_to(REPO).as_posix()  # compare is a package
        assert not any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps), f"evaluate depends on {path}"
        assert f"cnnlab.analysis.{other}" not in closure("cnnlab.analysis.evaluate")
    for name in ("fetch", "train"):
        deps = stages()[name]["deps"]
        assert not any(d.startswith("src/cnnlab/analysis") or d.rstrip("/") == "src/cnnlab" for d in deps), name


def assert_wing_edits_reach_only_their_stages(repo: Path, dvc: Path, env: dict) -> None:
    """In `repo`, a DVC workspace where the pipeline has run and is up to date: a comment added to
    analysis code (compare, predict) leaves `dvc status` with nothing to do; one added to training
    code (module.py) makes train and evaluate stale. Each file is put back as it was.

    Run at the end of tests/test_pipeline.py::test_dvc_repro_end_to_end, on its workspace (a second
    `dvc repro` here would cost a minute of training)."""
    def status() -> dict:
        result = subprocess.run([str(dvc), "status", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout or "{}")

    def with_comment(relative: str):
        path = repo / relative
        before = path.read_bytes()
        path.write_bytes(before + b"\n# an edited comment\n")
        return path, before

    edited = [with_comment("src/cnnlab/analysis/compare/groups.py"), with_comment("src/cnnlab/analysis/predict.py")]
    try:
        assert status() == {}, "an analysis module's comment made a stage stale"
    finally:
        for path, before in edited:
            path.write_bytes(before)
    path, before = with_comment("src/cnnlab/training/module.py")
    try:
        stale = status()
        assert {"train", "evaluate"} <= set(stale), stale
    finally:
        path.write_bytes(before)
    assert status() == {}
