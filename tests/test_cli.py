"""The `cnnlab` command itself: its help, an unknown command, and tab completion of `cnnlab train`
through Hydra's completion query, run as a user's shell runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from cnnlab.cli import COMMANDS

from conftest import REPO

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def cnnlab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cnnlab"), *args], capture_output=True, text=True, timeout=300,
                          env=env or ENV, cwd=REPO)


def test_help_goes_to_stdout_so_that_a_pipe_gets_it():
    result = cnnlab("--help")
    assert result.returncode == 0 and result.stderr == ""
    for name in COMMANDS:
        assert f"cnnlab {name} " in result.stdout


def test_an_unknown_command_is_one_line_naming_it_and_the_choices():
    result = cnnlab("bogus")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "'bogus'" in result.stderr
    assert all(name in result.stderr for name in COMMANDS)


def test_no_module_of_the_package_shadows_the_standard_library():
    """Run as a script (`python src/cnnlab/train.py`, Hydra's completion hint, Lightning's srun
    hint), the package's folder comes first on sys.path: a module named like a standard one
    (profile.py once) replaces it for everything imported after."""
    modules = {path.stem for path in (REPO / "src" / "cnnlab").rglob("*.py")}  # any folder run as a script
    assert modules & set(sys.stdlib_module_names) == set()


def test_hydra_completion_query_answers_after_the_train_subcommand(train_command, monkeypatch):
    """cnnlab answers the query with a light Hydra app over the same config: its answer is the
    training app's own (asked as Hydra's script asks `python <file>`; in this process, as a fresh
    interpreter would spend seconds importing torch and Lightning first)."""
    line = "data=fashion_mnist mod"
    result = subprocess.run([str(BIN / "cnnlab"), "train", "-sc", "query=bash"], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env={**ENV, "COMP_LINE": f"cnnlab train {line}"})
    assert result.returncode == 0, result.stderr
    assert "model=" in result.stdout.split()
    monkeypatch.setenv("COMP_LINE", f"python src/cnnlab/train.py {line}")
    app = train_command("-sc", "query=bash", cwd=REPO)
    assert app.returncode == 0 and app.stdout == result.stdout


def test_the_installed_bash_completion_completes_cnnlab_train(tmp_path):
    """`eval "$(cnnlab train -sc install=bash)"`, then TAB after `cnnlab train model=cnn_w`: bash
    calls the function with COMP_LINE, COMP_WORDS and COMP_CWORD as it does at a prompt."""
    script = tmp_path / "complete.sh"
    script.write_text('eval "$(cnnlab train -sc install=bash)"\n'
                      'complete -p cnnlab\n'
                      'ask() { COMP_LINE="$1"; COMP_POINT=${#1}; COMP_WORDS=($1); COMP_CWORD=$2; COMPREPLY=();\n'
                      '        _cnnlab_completion; echo "$1 -> ${COMPREPLY[*]}"; }\n'
                      'ask "cnnlab pre" 1\n'
                      'ask "cnnlab train model=cnn_w" 2\n')
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(" cnnlab") and "-F _cnnlab_completion" in lines[0]
    assert lines[1:] == ["cnnlab pre -> predict", "cnnlab train model=cnn_w -> model=cnn_wide"]


HEAVY = ("torch", "pytorch_lightning", "lightning_fabric", "mlflow", "scipy", "matplotlib")
IMPORTS_AFTER = """
import json, sys
from cnnlab import cli
try:
    status = cli.main(sys.argv[1:])
except SystemExit as exc:  # argparse's --help
    status = exc.code
print(json.dumps({"status": status, "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def run_and_list_imports(*args: str, cwd: Path = REPO) -> tuple[str, set[str]]:
    """`cnnlab <args>` in a fresh interpreter, asserted to succeed: (its output, the heavy libraries it
    holds afterwards)."""
    result = subprocess.run([sys.executable, "-c", IMPORTS_AFTER, *args], capture_output=True, text=True,
                            timeout=300, env=ENV, cwd=cwd)
    *output, last = result.stdout.strip().splitlines()
    report = json.loads(last)
    assert report["status"] in (0, None), result.stderr[-2000:]
    return "\n".join(output), set(report["loaded"])


def imports_of(*args: str, cwd: Path = REPO) -> set[str]:
    return run_and_list_imports(*args, cwd=cwd)[1]


HELP_SAYS = {"train": "Powered by Hydra", "fetch": "--params", "evaluate": "--checkpoint", "compare": "--sweep",
             "register": "--alias", "predict": "--model", "sync": "BACKLOG", "params": "overrides"}


def test_help_of_every_command_imports_no_heavy_library():
    """`--help` is answered before torch, Lightning, MLflow, SciPy or matplotlib load (each costs
    seconds): `cnnlab --help` and `cnnlab <command> --help` start in a blink (README, Start-up)."""
    assert imports_of("--help") == set()
    for name in COMMANDS:
        output, loaded = run_and_list_imports(name, "--help")
        assert loaded == set() and HELP_SAYS[name] in output, (name, loaded, output[-500:])


@pytest.mark.e2e
def test_commands_that_read_runs_or_config_import_neither_torch_nor_lightning(tmp_path, tiny_dataset):
    """params, fetch, compare and register do their whole work without torch or Lightning: reading
    runs and writing a registry entry need MLflow's client only."""
    from test_register import project_with_model

    root = tmp_path / "project"
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")  # where project_with_model's fluent calls log
    uri, _ = project_with_model(root)
    params = tmp_path / "params.yaml"
    assert imports_of("params", "data=custom", f"data.path={tiny_dataset}", f"paths.data_dir={tmp_path / 'data'}",
                      "--output", str(params)) == set()
    assert imports_of("fetch", "--params", str(params)) == set()
    assert (tmp_path / "data" / "custom").is_dir()
    for name, *args in (("compare", "--output", str(tmp_path / "report")), ("register", "--name", "digits")):
        loaded = imports_of(name, *args, "--tracking-uri", uri, cwd=root)
        assert not loaded & {"torch", "pytorch_lightning", "lightning_fabric"}, (name, loaded)
    assert (tmp_path / "report" / "report.md").is_file()
