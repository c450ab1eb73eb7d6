"""`cnnlab`: the project's jobs under one name.

  cnnlab train      train one model, or sweep with -m (Hydra overrides, as `python -m cnnlab.train`)
  cnnlab fetch      fetch and verify the dataset named in params.yaml
  cnnlab evaluate   evaluate a trained checkpoint
  cnnlab compare    compare MLflow runs (an experiment or a sweep)
  cnnlab register   put the best run (or a given one) into the MLflow Model Registry under an alias
  cnnlab predict    classify image files (PNG/JPEG) or IDX files with a checkpoint or an MLflow model
  cnnlab sync       send what a tracking store that went away mid-training never received, once it is back
  cnnlab params     compose conf/ into params.yaml (what `dvc repro` runs)

`cnnlab <command> --help` tells more about each.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from cnnlab.core.config import CONF_DIR, compose_params, project_root
from cnnlab.core.errors import command, show
from cnnlab.core.files import write_atomic

COMMANDS = ("train", "fetch", "evaluate", "compare", "register", "predict", "sync", "params")

# `cnnlab train -sc install=bash`. Hydra's own script is bound to `python` (or to the program's name)
# and sends the whole line to the app's `-sc query=bash`, which would take the subcommand `train`
# for an override. This one is bound to `cnnlab`: it completes the command names itself and sends
# the rest to `cnnlab train -sc query=bash`, where train_main drops `train` before Hydra's query
# (Hydra's way otherwise: `=` is no word break, no space after a key or group).
BASH_COMPLETION = f"""_cnnlab_completion()
{{
    local words=($COMP_LINE)
    local word="${{words[$COMP_CWORD]}}"
    if (( COMP_CWORD == 1 )); then
        compopt +o nospace 2>/dev/null
        COMPREPLY=($(compgen -W "{' '.join(COMMANDS)}" -- "$word"))
    elif [ "${{words[1]}}" == "train" ]; then
        local choices=$(COMP_POINT=$COMP_POINT COMP_LINE=$COMP_LINE "${{words[0]}}" train -sc query=bash 2>/dev/null)
        COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "$word"))
    fi
}}
COMP_WORDBREAKS=${{COMP_WORDBREAKS//=}}
COMP_WORDBREAKS=$COMP_WORDBREAKS complete -o nospace -o default -F _cnnlab_completion cnnlab"""
BASH_UNINSTALL = "unset -f _cnnlab_completion\ncomplete -r cnnlab"


@command
def params_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnlab params", description=compose_params.__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=fashion_mnist optimizer.lr=3e-4")
    parser.add_argument("--output", type=Path, default=None, help="default: params.yaml at the project root")
    args = parser.parse_args(argv)
    output = args.output or project_root() / "params.yaml"
    write_atomic(output, compose_params(args.overrides))
    print(f"wrote {output}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    return 0


def train_main(argv: list[str]) -> int:
    """`cnnlab train ...` is `python -m cnnlab.train ...`, in this same process: Lightning's DDP
    launcher (trainer=ddp) starts the other processes by running `python -m <the main module>`
    again, which a console script is not."""
    if "-sc" in argv or "--shell-completion" in argv:  # Hydra's flag; its argument is an override
        if "install=bash" in argv or "install=zsh" in argv:  # zsh runs bash's (bashcompinit), as with Hydra's
            print(BASH_COMPLETION)
            return 0
        if "uninstall=bash" in argv or "uninstall=zsh" in argv:
            print(BASH_UNINSTALL)
            return 0
        if "COMP_LINE" in os.environ:
            _drop_subcommand_for_hydra()
        if any(arg.startswith("query=") for arg in argv):
            return _hydra_answer(argv)
    if "--hydra-help" in argv:
        return _hydra_answer(argv)
    if "-h" in argv or "--help" in argv:
        print(train_help())
        return 0
    os.execv(sys.executable, [sys.executable, "-m", "cnnlab.train", *argv])


def train_help() -> str:
    """`cnnlab train --help`: the config groups with their options and the root config with its
    comments, read from conf/ as files. Hydra's own `--help` composes the config and builds its
    config repository once per group (deep copies of every plugin's structured configs): 1-3 s here
    for a list of file names; `--cfg job` prints the composed config."""
    groups = sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    lines = [f"{group.name}: {', '.join(sorted(f.stem for f in group.glob('*.yaml')))}" for group in groups]
    return "\n".join([
        "cnnlab train: train one model, or sweep with -m (`python -m cnnlab.train`, a Hydra app).", "",
        "== Configuration groups ==", "Compose your configuration from those groups (group=option)", "",
        *lines, "", f"== Config == ({CONF_DIR / 'config.yaml'}; each group's options are its folder's files)",
        "Override anything in the config (foo.bar=value); the whole composed config: cnnlab train --cfg job", "",
        (CONF_DIR / "config.yaml").read_text().rstrip(), "",
        "Powered by Hydra (https://hydra.cc); its flags (-m, --cfg, --info, -sc ...): cnnlab train --hydra-help"])


def _hydra_answer(argv: list[str]) -> int:
    """Hydra's own answer to `--hydra-help` and `-sc query=<shell>` on the training app's
    config (conf/, `config`, as cnnlab.training.train's @hydra.main), without importing cnnlab.training.train: torch
    and Lightning take most of the 5 to 30 s that starting it costs, which each TAB would wait for."""
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def app(cfg) -> None:  # never runs: Hydra answers the query and returns
        raise AssertionError("Hydra ran the app instead of answering --hydra-help or the completion query")

    sys.argv = ["cnnlab", *argv]
    app()
    return 0


def _drop_subcommand_for_hydra() -> None:
    """`cnnlab train mod` -> `cnnlab mod` in COMP_LINE (and COMP_POINT moved with it): Hydra's
    completion query drops the first word, the program, and parses the rest as overrides."""
    line = os.environ["COMP_LINE"]
    match = re.match(r"\s*\S+\s+train(?:\s+|$)", line)
    if match is None:
        return
    shorter = "cnnlab " + line[match.end():]
    os.environ["COMP_LINE"] = shorter
    if os.environ.get("COMP_POINT", "").isdigit():
        os.environ["COMP_POINT"] = str(max(0, int(os.environ["COMP_POINT"]) - (len(line) - len(shorter))))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest = (argv[0], argv[1:]) if argv else ("", [])
    if name == "train":
        return train_main(rest)
    if name == "params":
        return params_main(rest)
    if name == "fetch":
        from cnnlab.training.prepare import main as fetch_main

        return fetch_main(rest)
    if name == "evaluate":
        from cnnlab.analysis.evaluate import main as evaluate_main

        return evaluate_main(rest)
    if name == "compare":
        from cnnlab.analysis.compare import main as compare_main

        return compare_main(rest)
    if name == "register":
        from cnnlab.analysis.register import main as register_main

        return register_main(rest)
    if name == "predict":
        from cnnlab.analysis.predict import main as predict_main

        return predict_main(rest)
    if name == "sync":
        from cnnlab.tracking.sync import main as sync_main

        return sync_main(rest)
    if name in ("-h", "--help"):
        print(__doc__.strip())  # asked for: stdout, so that `cnnlab --help | less` shows it
        return 0
    if not name:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    show(f"unknown command {name!r} (choose from {', '.join(COMMANDS)}; `cnnlab --help` says what each does)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
