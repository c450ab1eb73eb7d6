"""The `cnnlab` command itself: its help, an unknown command, and tab completion of `cnnlab train`
through Hydra's completion query, run as a user's shell runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    modules = {path.stem for path in (REPO / "src" / "cnnlab").glob("*.py")}
    assert modules & set(sys.stdlib_module_names) == set()


def test_hydra_completion_query_answers_after_the_train_subcommand():
    """cnnlab answers the query with a light Hydra app over the same config: its answer is the
    training app's own (asked as Hydra's script asks `python <file>`)."""
    line = "data=fashion_mnist mod"
    result = subprocess.run([str(BIN / "cnnlab"), "train", "-sc", "query=bash"], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env={**ENV, "COMP_LINE": f"cnnlab train {line}"})
    assert result.returncode == 0, result.stderr
    assert "model=" in result.stdout.split()
    app = subprocess.run([sys.executable, "-m", "cnnlab.train", "-sc", "query=bash"], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**ENV, "COMP_LINE": f"python src/cnnlab/train.py {line}"})
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
