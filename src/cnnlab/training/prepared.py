"""Prepared datasets: the arrays a run reads, made once from a dataset's own files (a folder of
images, the CIFAR-10 archive) and kept in <data_dir>/<name>/ beside a manifest.

Each split is two .npy files, images as uint8 (N, channels, size, size) and labels as int64 (N,),
so a run loads them as fast as IDX tensors (no decoding, no per-image work). Every array is
written to a temporary name in the same folder and renamed into place, the manifest last: a
manifest names only arrays that are complete. The manifest also records each array's size and
mtime, so a run's check of the prepared data is a few stat calls (`unchanged`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import usual_mode, write_atomic

MANIFEST = "manifest.json"
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def array_file(key: str) -> str:
    return key.replace("_", "-") + ".npy"


def read_manifest(dest: Path) -> dict | None:
    try:
        return json.loads((dest / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable or cut short: prepared again


def write(dest: Path, arrays: dict[str, np.ndarray], manifest: dict) -> dict:
    """Write the four arrays and then the manifest (with each array's size and mtime) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST).unlink(missing_ok=True)  # from here until the end, no manifest vouches for the folder
    entries = {}
    for key in ARRAYS:
        target = dest / array_file(key)
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{target.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.ascontiguousarray(arrays[key]), allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            usual_mode(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        stat = target.stat()
        entries[key] = {"name": target.name, "shape": list(arrays[key].shape), "bytes": stat.st_size,
                        "mtime_ns": stat.st_mtime_ns}
    manifest = {**manifest, "arrays": entries}
    write_atomic(dest / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def unchanged(dest: Path, manifest: dict) -> bool:
    """Are the arrays the manifest names still there, with the size and mtime they were written with?"""
    try:
        for entry in manifest["arrays"].values():
            stat = (dest / entry["name"]).stat()
            if (stat.st_size, stat.st_mtime_ns) != (entry["bytes"], entry["mtime_ns"]):
                return False
    except (OSError, KeyError, TypeError, AttributeError):
        return False
    return True


def load(dest: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's images (uint8, N x C x H x W) and labels (int64), as prepared."""
    manifest = read_manifest(dest)
    if manifest is None:
        raise CnnlabError(f"{dest}: not prepared: run `cnnlab fetch` (or `dvc repro fetch`)")
    out = []
    for kind in ("images", "labels"):
        entry = manifest["arrays"][f"{split}_{kind}"]
        path = dest / entry["name"]
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CnnlabError(f"{path}: cannot read it ({exc}); prepare it again (`cnnlab fetch`)") from None
        if list(array.shape) != entry["shape"]:
            raise CnnlabError(f"{path}: holds {array.shape}, its manifest says {tuple(entry['shape'])}; "
                              f"prepare it again (`cnnlab fetch`)")
        out.append(array)
    return out[0], out[1].astype(np.int64, copy=False)
