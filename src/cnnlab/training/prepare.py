"""The fetch stage (`cnnlab fetch`, `dvc repro fetch`): make the dataset named in params.yaml ready
in <data_dir>/<name>/, every file verified: IDX files fetched and checked, an image folder
converted into arrays, the CIFAR-10 archive fetched, checked and unpacked (cnnlab.training.datasets).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from omegaconf import OmegaConf

from cnnlab.core.config import DataSpec, Fetch, parse, project_path
from cnnlab.core.errors import CnnlabError, command
from cnnlab.training.datasets import FORMATS, ensure, skipped_files


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnlab fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="composed config to read (default: the project's params.yaml)")
    args = parser.parse_args(argv)
    args.params = args.params or str(project_path("params.yaml"))
    if not Path(args.params).is_file():
        raise CnnlabError(f"{args.params} not found: run `cnnlab params` to compose it from conf/")
    cfg = OmegaConf.to_container(OmegaConf.load(args.params), resolve=True)
    data, fetch = parse(DataSpec, cfg.get("data"), "data"), parse(Fetch, cfg.get("fetch"), "fetch")
    data_dir = project_path((cfg.get("paths") or {}).get("data_dir", "data"))
    spec = dataclasses.asdict(data)
    manifest = ensure(spec, data_dir, fetch.timeout_s, check_all=True)
    skipped = skipped_files(spec, data_dir)
    # The checksum runs record (tag data.checksum): of an image folder, its files with the split settings.
    print(f"{manifest['dataset']}: verified, checksum {FORMATS[data.format].checksum(spec, data_dir)}"
          + (f"; {len(skipped)} bad images left out (data.skip_bad_files), listed in its manifest"
             if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
