"""`cnnlab`: the project's jobs under one name.

  cnnlab train      train one model, or sweep with -m (Hydra overrides, as `python -m cnnlab.train`)
  cnnlab fetch      fetch and verify the dataset named in params.yaml
  cnnlab evaluate   evaluate a trained checkpoint
  cnnlab compare    compare MLflow runs (an experiment or a sweep)
  cnnlab register   put the best run (or a given one) into the MLflow Model Registry under an alias
  cnnlab predict    classify image files (PNG/JPEG) or IDX files with a checkpoint or an MLflow model
  cnnlab params     compose conf/ into params.yaml (what `dvc repro` runs)

`cnnlab <command> --help` tells more about each.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cnnlab.config import CONF_DIR, project_root
from cnnlab.errors import CnnlabError, command
from cnnlab.files import write_atomic


def compose_params(overrides: list[str] | None = None) -> str:
    """conf/ composed with `overrides` and resolved, as YAML: what `dvc exp run -S` writes to params.yaml."""
    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except Exception as exc:  # Hydra's ConfigCompositionException, MissingMandatoryValue...
        raise CnnlabError(f"cannot compose conf/: {exc}".splitlines()[0]) from None
    return yaml.safe_dump(OmegaConf.to_container(cfg), sort_keys=False)


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
    os.execv(sys.executable, [sys.executable, "-m", "cnnlab.train", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest = (argv[0], argv[1:]) if argv else ("", [])
    if name == "train":
        return train_main(rest)
    if name == "params":
        return params_main(rest)
    if name == "fetch":
        from cnnlab.fetch import main as fetch_main

        return fetch_main(rest)
    if name == "evaluate":
        from cnnlab.evaluate import main as evaluate_main

        return evaluate_main(rest)
    if name == "compare":
        from cnnlab.compare import main as compare_main

        return compare_main(rest)
    if name == "register":
        from cnnlab.register import main as register_main

        return register_main(rest)
    if name == "predict":
        from cnnlab.predict import main as predict_main

        return predict_main(rest)
    print(__doc__.strip(), file=sys.stderr)
    return 0 if name in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
