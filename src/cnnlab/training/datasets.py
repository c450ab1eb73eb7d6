"""Every data format cnnlab reads, in one table: how a dataset is made ready in <data_dir>/<name>/
(the fetch stage, and a run whose data is missing or changed), how a run checks it cheaply, and how
it reads a split.

- idx: MNIST-style IDX gzip files, fetched and verified (cnnlab.training.fetch), read as they are.
- folder: a directory of class folders (cnnlab.training.folder), converted once into arrays.
- cifar10: the CIFAR-10 Python archive (cnnlab.training.cifar10), verified and unpacked into arrays.

Whatever the format, a split reads as uint8 images (N, channels, size, size) and int64 labels; the
data module normalises them and everything after it is the same for every format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from cnnlab.core.errors import CnnlabError
from cnnlab.training import cifar10, fetch, folder, prepared
from cnnlab.training.idx import read_idx


@dataclass(frozen=True)
class Format:
    # Is <data_dir>/<name>/ ready and unchanged? Cheap (stat calls), writes nothing in the data folder.
    ready: Callable[[dict, Path], bool]
    # Fetch, verify, convert into <data_dir>/<name>/; returns its manifest. Raises CnnlabError.
    prepare: Callable[[dict, Path, float], dict]
    # The checksum of the data a run reads now (its MLflow dataset digest and part of its task).
    checksum: Callable[[dict, Path], str | None]
    # One split ("train" or "test"): uint8 images (N, C, H, W) and int64 labels.
    load: Callable[[dict, Path, str], tuple[np.ndarray, np.ndarray]]
    # Where the data came from, as the MLflow dataset's source names it (a folder, an archive).
    source: Callable[[dict, Path], str]


def _idx_ready(spec: dict, data_dir: Path) -> bool:
    manifest = fetch.read_manifest(data_dir, spec["name"])
    return manifest is not None and fetch.is_current(manifest, spec) and fetch.unchanged_since_fetch(data_dir, manifest)


def _idx_load(spec: dict, data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    dest = data_dir / spec["name"]
    paths = [dest / spec["files"][f"{split}_{kind}"]["name"] for kind in ("images", "labels")]
    for path in paths:
        if not path.is_file():
            raise CnnlabError(f"{path} not found: fetch the data first (`cnnlab fetch` or `dvc repro fetch`)")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3:
        raise CnnlabError(f"{paths[0]}: not an IDX images file ({images.ndim} dimensions, expected 3)")
    return images[:, None], labels.astype(np.int64)


def _prepared_load(spec: dict, data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return prepared.load(data_dir / spec["name"], split)


def _folder_of(spec: dict, data_dir: Path) -> str:
    return str((data_dir / spec["name"]).resolve())


FORMATS: dict[str, Format] = {
    "idx": Format(_idx_ready, lambda spec, data_dir, timeout: fetch.fetch_dataset(spec, data_dir, timeout),
                  lambda spec, data_dir: fetch.local_checksum(data_dir, spec), _idx_load, _folder_of),
    "folder": Format(folder.ready, folder.prepare, folder.checksum, folder.load, folder.source),
    "cifar10": Format(cifar10.ready, cifar10.prepare, cifar10.checksum, _prepared_load, cifar10.source),
}


def skipped_files(spec: dict, data_dir: Path) -> list[dict]:
    """The images the preparation left out (data.skip_bad_files), each {"file", "reason"}; none for
    formats that never skip (a bad IDX or CIFAR-10 file is refused whole)."""
    return folder.skipped(spec, data_dir) if spec["format"] == "folder" else []


def ensure(spec: dict, data_dir: Path, timeout_s: float, check_all: bool = False) -> dict | None:
    """Make <data_dir>/<name>/ ready: prepare it (fetch, verify, convert) unless its cheap check
    says it is ready and unchanged, or always with `check_all` (the fetch stage verifies every
    file). Under a lock, as parallel sweep jobs share the folder; the manifest when it prepared."""
    kind = FORMATS[spec["format"]]
    if not check_all and kind.ready(spec, data_dir):
        return None
    data_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(data_dir / f".{spec['name']}.lock"):
        if not check_all and kind.ready(spec, data_dir):  # another process prepared it meanwhile
            return None
        return kind.prepare(spec, data_dir, timeout_s)
