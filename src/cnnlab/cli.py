"""`cnnlab` command: the project's jobs under one name.

  cnnlab params     compose conf/ into params.yaml (what `dvc repro` runs)
  cnnlab fetch      fetch and verify the dataset named in params.yaml
  cnnlab evaluate   evaluate a trained checkpoint
  cnnlab compare    compare MLflow runs (an experiment or a sweep)

Training is the Hydra app `python -m cnnlab.train [overrides]`.
"""

from __future__ import annotations

import sys

from cnnlab import CnnlabError
from cnnlab.config import CONF_DIR, project_root


def compose_params(output: str = "params.yaml", overrides: list[str] | None = None) -> None:
    """Compose conf/ exactly as DVC's Hydra integration does, and write it to `output`."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(output, str(CONF_DIR), None, "config", str(CONF_DIR.parent), list(overrides or []))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "params":
        try:
            compose_params(str(project_root() / "params.yaml"), rest)
        except Exception as exc:  # Hydra's ConfigCompositionException, MissingMandatoryValue...
            print(f"error: cannot compose conf/: {exc}".splitlines()[0], file=sys.stderr)
            return 1
        print("wrote params.yaml" + (f" with {' '.join(rest)}" if rest else ""))
        return 0
    if command == "fetch":
        from cnnlab.fetch import main as fetch_main

        return fetch_main(rest)
    if command == "evaluate":
        from cnnlab.evaluate import main as evaluate_main

        return evaluate_main(rest)
    if command == "compare":
        from cnnlab.compare import main as compare_main

        return compare_main(rest)
    print(__doc__.strip(), file=sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
