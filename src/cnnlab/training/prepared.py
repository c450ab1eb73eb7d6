"""Prepared datasets: the arrays a run reads, made once from a dataset's own files (a folder of
images, the CIFAR-10 archive) and kept in <data_dir>/<name>/ beside a manifest.

Each split is two .npy files, images as uint8 (N, channels, size, size) and labels as int64 (N,),
so a run loads them as fast as IDX tensors (no decoding, no per-image work). Every array is
written to a temporary name in the same folder and renamed into place, the manifest last: a
manifest names only arrays that are complete. The manifest also records each array's size, mtime
and MD5, so a run's check of the prepared data is a few stat calls (`unchanged`), and arrays copied
elsewhere are checked by their bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import file_md5, write_atomic, write_atomic_with

MANIFEST = "manifest.json"
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def array_file(key: str) -> str:
    return key.replace("_", "-") + ".npy"


def read_manifest(dest: Path) -> dict | None:
    """The manifest in `dest`; None when there is none, or it cannot be read or is cut short (the
    data is then prepared again)."""
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def manifest_format(manifest: dict | None) -> str | None:
    """The format of the data a manifest describes: "idx" for an IDX fetch's (no "format" key, a
    "files" table), else its "format" ("folder", "cifar10"); None without a manifest."""
    if manifest is None:
        return None
    if "format" in manifest:
        return str(manifest["format"])
    return "idx" if isinstance(manifest.get("files"), dict) else "unknown"


def refuse_other_format(dest: Path, manifest: dict | None, fmt: str) -> None:
    """Two datasets of one name (an image folder called mnist, data.name set twice) would share
    <data_dir>/<name>/: refused in one line, so that neither's files are deleted or overwritten by
    the other's preparation, nor read by the other's runs."""
    other = manifest_format(manifest)
    if other is not None and other != fmt:
        name, origin = manifest.get("dataset", dest.name), manifest.get("source") or "an unknown source"
        raise CnnlabError(f"{dest} holds dataset '{name}' of another format ({other}, from {origin}); set "
                          f"data.name=<another name> (or paths.data_dir) for one of them")


def write(dest: Path, arrays: dict[str, np.ndarray], manifest: dict) -> dict:
    """Write the four arrays and then the manifest (with each array's size, mtime and MD5) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST).unlink(missing_ok=True)  # from here until the end, no manifest vouches for the folder
    entries = {}
    for key in ARRAYS:
        target = write_atomic_with(dest / array_file(key),
                                   lambda fh, a=arrays[key]: np.save(fh, np.ascontiguousarray(a), allow_pickle=False))
        stat = target.stat()
        entries[key] = {"name": target.name, "shape": list(arrays[key].shape), "bytes": stat.st_size,
                        "mtime_ns": stat.st_mtime_ns, "md5": file_md5(target)}
    manifest = {**manifest, "arrays": entries}
    write_atomic(dest / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def unchanged(dest: Path, manifest: dict) -> bool:
    """Are the arrays the manifest names still there as they were written? The size and mtime they
    were written with say so; an array copied since (`dvc checkout`, `dvc pull`, `cp -r`: another
    mtime) is hashed and compared with its recorded MD5. Nothing is written."""
    try:
        for entry in manifest["arrays"].values():
            path = dest / entry["name"]
            stat = path.stat()
            if stat.st_size != entry["bytes"]:
                return False
            if stat.st_mtime_ns != entry["mtime_ns"] and file_md5(path) != entry.get("md5"):
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
