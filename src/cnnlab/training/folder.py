"""Image folders (`data=folder data.path=DIR`): DIR/<class>/<image>, or DIR/train/<class>/... and
DIR/test/<class>/... when DIR holds both, converted once into the arrays of cnnlab.training.prepared
in <data_dir>/<name>/<settings>/ (`prepared_dir`): one set of arrays per way of preparing the folder
(channels, size, split...), so a sweep over those settings converts each once and parallel runs of
two settings never read each other's arrays.

- Layout (cnnlab.core.config.folder_splits): a sub-folder named train or test makes DIR a split
  folder, which must hold both and nothing else (a val/ is refused with a hint); files directly in
  DIR (or in its train/ and test/) are images of no class: left out, with one warning.
- Files: every regular file under a class folder, sub-folders included (as torchvision's
  ImageFolder walks them), except dotfiles and the OS's Thumbs.db and desktop.ini (any case).
  Whether it is an image is decided by opening it with Pillow, never by its extension; one Pillow
  cannot read is a bad file (an error, or left out and listed with data.skip_bad_files=true).
- Labels: a class's position in data.class_names (the sorted class folders, resolved with the config).
- Identity: the manifest's `checksum` is an MD5 of every file's relative path and bytes; its
  `data_checksum` adds what shaped the arrays from them (channels, size, the split when it is
  drawn, the files left out): the run's data.checksum and MLflow dataset digest. Its
  `files_signature`, an MD5 of every
  file's relative path, size, mtime and mode, is what a run compares (stat calls only: `ready`). A
  folder whose stats changed but whose bytes did not (a touch, a copy, `dvc checkout`) is hashed
  again and only the manifest is rewritten (nothing at all when its stats did not change either:
  `cnnlab fetch` verifies every byte each time); changed bytes or settings convert every image again.
- Destination: <data_dir>/<name>/ holding another format's data (an IDX dataset, CIFAR-10) is
  refused: data.name defaults to the folder's name, which may be that of another dataset; so is a
  destination inside the image folder. Without the image folder (a teammate's `dvc pull` of the
  prepared arrays), intact arrays are used as they are, with a warning.
- Split: the folder's own train/ and test/, else each class's images drawn at random with
  numpy.random.default_rng([split_seed, class index]): the first round(test_fraction * n) of a
  permutation (at least one of a class with two or more, never all of them) are test images; a
  class of one image is in the training part only (a warning names it). Each
  split is in the order of the files' paths within their class folders, then by class, so a folder
  and a seed always give the same arrays.

Decoding runs in this one process: 70,000 28x28 PNGs convert in about 12 s on a 2-core machine
(benchmarks/folder_prepare.py), well inside a minute; a process pool might shave a few seconds
there, at the price of its start-up, pickled arrays and errors that cross processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnlab.core.config import folder_splits, image_folder_root, is_metadata_file, loose_files, sub_folders
from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import write_atomic
from cnnlab.training import prepared
from cnnlab.training.images import to_network_pixels

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
DAMAGED_FIX = "remove or replace it"
UNREADABLE_FIX = "make it readable (chmod a+r)"
# The config keys whose values shape the arrays: a change in any of them converts the images again.
SETTINGS = ("channels", "image_size", "test_fraction", "split_seed", "skip_bad_files", "max_image_pixels",
            "class_names")


@dataclass(frozen=True)
class File:
    rel: str        # path from DIR, with '/' (what the checksum, the order and the manifest use)
    path: str       # where to open it
    label: int
    split: str | None  # "train" or "test" from the folder's own split, None when it has none
    size: int
    mtime_ns: int
    mode: int


class BadFile(Exception):
    """One file that cannot be an image of the dataset: why (what the manifest lists) and what to do."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


# --- the public face (cnnlab.training.datasets.FORMATS["folder"]) -----------------------------------

def source(spec: dict, data_dir: Path) -> str:
    """The image folder, resolved: what the run's MLflow dataset input names."""
    return str(image_folder_root(spec["path"]).resolve())


def prepared_dir(spec: dict, data_dir: Path) -> Path:
    """Where this way of preparing the folder keeps its arrays: <data_dir>/<name>/<CxSxS>-<hash of
    the settings>."""
    key = hashlib.md5(json.dumps(_settings(spec), sort_keys=True).encode()).hexdigest()[:8]
    size = spec["image_size"]
    return data_dir / spec["name"] / f"{spec['channels']}x{size}x{size}-{key}"


def checksum(spec: dict, data_dir: Path) -> str | None:
    """The checksum of the data a run reads (manifest `data_checksum`): the folder's files (names
    and bytes) and what made the arrays from them. One folder split with two test fractions or
    seeds has two test sets, and runs on them are two tasks (cnnlab.tracking.tasks), never ranked
    against each other; a knob that changed nothing (data.max_image_pixels with no image that
    large) changes nothing."""
    manifest = _manifest(spec, data_dir)
    return manifest.get("data_checksum") if manifest else None


def skipped(spec: dict, data_dir: Path) -> list[dict]:
    """The files left out by data.skip_bad_files ({"file": relative path, "reason": one line})."""
    manifest = _manifest(spec, data_dir)
    return list(manifest.get("skipped") or []) if manifest else []


def load(spec: dict, data_dir: Path, split: str):
    return prepared.load(prepared_dir(spec, data_dir), split)


def ready(spec: dict, data_dir: Path) -> bool:
    """Are the prepared arrays those of the folder as it is now, with these settings? Stat calls
    only (no hashing, no image opened), and nothing written. Without the image folder, intact
    arrays are what there is to read (prepared elsewhere and shared, `dvc pull`)."""
    dest = prepared_dir(spec, data_dir)
    manifest = _manifest(spec, data_dir)
    if manifest is None or manifest.get("settings") != _settings(spec) or not prepared.unchanged(dest, manifest):
        return False
    try:
        root = image_folder_root(spec["path"]).resolve()
        if not root.exists():
            log.warning("%s is not here: using the arrays prepared from it in %s (checksum %s)", root, dest,
                        manifest.get("data_checksum"))
            return True
        if manifest.get("source") != str(root):
            return False
        return _signature(scan(root, spec["class_names"])) == manifest.get("files_signature")
    except (CnnlabError, OSError):
        return False  # prepare says what is wrong, in one line


def prepare(spec: dict, data_dir: Path, timeout_s: float) -> dict:
    """Convert the folder's images into prepared_dir (or, when only their stats changed, rewrite
    the manifest); return the manifest. `timeout_s` is unused: nothing is downloaded."""
    root = image_folder_root(spec["path"]).resolve()
    dest = prepared_dir(spec, data_dir)
    _check_destination(root, data_dir / spec["name"])
    prepared.refuse_other_format(data_dir / spec["name"], prepared.read_manifest(data_dir / spec["name"]), "folder")
    old = _manifest(spec, data_dir)
    started = time.perf_counter()
    files = scan(root, spec["class_names"])
    _warn_loose_files(root)
    content, unreadable = _content_checksum(files, spec["skip_bad_files"])
    settings = _settings(spec)
    if (old and old.get("checksum") == content and old.get("settings") == settings and old.get("data_checksum")
            and prepared.unchanged(dest, old)):
        _same_as_before(root, spec, files)
        signature = _signature(files)
        if old.get("files_signature") == signature and old.get("source") == str(root):
            log.info("%s: unchanged since it was prepared in %s", root, dest)
            return old
        manifest = {**old, "source": str(root), "files_signature": signature}
        write_atomic(dest / prepared.MANIFEST, json.dumps(manifest, indent=2) + "\n")
        log.info("%s: files touched but unchanged; manifest updated", root)
        return manifest
    log.info("%s: converting %d images to %dx%dx%d", root, len(files), spec["channels"], spec["image_size"],
             spec["image_size"])
    pixels, kept, bad = _convert(root, files, spec, unreadable)
    _same_as_before(root, spec, files)
    _check_classes_kept(root, spec["class_names"], files, kept)
    if bad:
        log.warning("%s: %d bad files left out (data.skip_bad_files=true): first %s (%s)", root, len(bad),
                    bad[0]["file"], bad[0]["reason"])
    own_split = bool(files) and files[0].split is not None  # the folder's own train/ and test/
    arrays, counts = _split(spec, files, pixels, kept, own_split)
    if not len(arrays["test_labels"]):  # every class has a single image: nothing to test on
        raise CnnlabError(f"{root}: no class has two images, so data.test_fraction={spec['test_fraction']} holds "
                          f"none out for testing; add images, or give the folder train/ and test/ of its own")
    if not own_split:  # the folder's own test/ says what is tested
        _warn_single_images(root, counts)
    manifest = {"dataset": spec["name"], "format": "folder", "checksum": content,
                "data_checksum": _data_checksum(content, spec, own_split, bad), "source": str(root),
                "settings": settings, "files_signature": _signature(files), "counts": counts, "skipped": bad}
    manifest = prepared.write(dest, arrays, manifest)
    log.info("%s: prepared %d train and %d test images in %.1f s", dest, len(arrays["train_labels"]),
             len(arrays["test_labels"]), time.perf_counter() - started)
    return manifest


def _data_checksum(content: str, spec: dict, own_split: bool, bad: list[dict]) -> str:
    """What made the arrays: the files, the pixels asked for, the split when it is drawn, the
    classes, and the files left out."""
    shaped_by = {"files": content, "channels": spec["channels"], "image_size": spec["image_size"],
                 "class_names": spec["class_names"], "left_out": sorted(b["file"] for b in bad)}
    if not own_split:
        shaped_by.update(test_fraction=spec["test_fraction"], split_seed=spec["split_seed"])
    return hashlib.md5(json.dumps(shaped_by, sort_keys=True).encode()).hexdigest()


# --- reading the folder ------------------------------------------------------------------------------

def _manifest(spec: dict, data_dir: Path) -> dict | None:
    manifest = prepared.read_manifest(prepared_dir(spec, data_dir))
    return manifest if manifest is not None and manifest.get("format") == "folder" else None


def _settings(spec: dict) -> dict:
    return {key: spec[key] for key in SETTINGS}


def _check_destination(root: Path, dest: Path) -> None:
    # The arrays would land among the user's images (and change a folder DVC or git may track); the
    # next composition would find their folder as a class.
    resolved = dest.resolve()
    if resolved == root or root in resolved.parents:
        raise CnnlabError(f"{root}: the image folder is where its prepared arrays would go (paths.data_dir/"
                          f"data.name); move it out of paths.data_dir or set data.name=<another name>")


def _warn_loose_files(root: Path) -> None:
    loose = loose_files(root)
    if loose:
        log.warning("%s: left out %d file%s beside the class folders (in no class): first %s", root, len(loose),
                    "" if len(loose) == 1 else "s", loose[0])


def _warn_single_images(root: Path, counts: dict) -> None:
    singles = [name for name, n in counts["train"].items() if n == 1 and not counts["test"][name]]
    if len(singles) == 1:
        log.warning("%s: class %s has one image: it is in the training part only, so the test set has none of it",
                    root, singles[0])
    elif singles:
        log.warning("%s: classes %s have one image each: they are in the training part only, so the test set has "
                    "none of them", root, ", ".join(singles))


def _class_roots(root: Path) -> list[tuple[str | None, Path]]:
    """(split, folder of class folders): DIR's own train/ and test/, else DIR itself (folder_splits).
    The test folder must hold the same classes as the train folder (labels are positions in one list)."""
    splits = folder_splits(root)
    if splits[0][0] is None:
        return splits
    train, test = (set(sub_folders(base)) for _, base in splits)
    if train != test:
        only = "; ".join(f"only in {split}/: {', '.join(sorted(names))}"
                         for split, names in (("train", train - test), ("test", test - train)) if names)
        raise CnnlabError(f"{root}: train/ and test/ hold different class folders ({only}); give both the same "
                          f"class folders")
    return splits


def scan(root: Path, class_names: list[str]) -> list[File]:
    """Every file of every class folder, sorted by relative path: os.scandir and one stat each."""
    files: list[File] = []
    for split, base in _class_roots(root):
        found = sub_folders(base)
        if found != sorted(class_names):
            _class_mismatch(base, found, class_names)
        prefix = f"{split}/" if split else ""
        for label, name in enumerate(class_names):
            before = len(files)
            _walk(base / name, f"{prefix}{name}/", label, split, files, set())
            if len(files) == before:
                raise CnnlabError(f"{base / name}: class folder '{name}' holds no images; add images to it or "
                                  f"remove the folder")
    files.sort(key=lambda f: f.rel)
    return files


def _class_mismatch(base: Path, found: list[str], class_names: list[str]) -> None:
    missing, extra = sorted(set(class_names) - set(found)), sorted(set(found) - set(class_names))
    parts = ([f"no folder for {', '.join(missing)}"] if missing else []) + \
            ([f"folders the config does not name: {', '.join(extra)}"] if extra else [])
    raise CnnlabError(f"{base}: its class folders differ from data.class_names ({'; '.join(parts)}); run with the "
                      f"folder as it is now (its classes are read when the config is composed)")


def _walk(folder: Path, rel: str, label: int, split: str | None, out: list[File], seen: set) -> None:
    """Regular files under `folder`, recursively (symbolic links followed, each folder once)."""
    try:
        st = folder.stat()
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return  # a link back up the tree
        seen.add(key)
        with os.scandir(folder) as entries:
            listed = list(entries)
    except PermissionError as exc:
        raise CnnlabError(f"{folder}: cannot list it ({exc.strerror}); make it readable (chmod a+rx)") from None
    except FileNotFoundError:
        raise CnnlabError(f"{folder} vanished while it was being read; run again once the folder is "
                          f"complete") from None
    for entry in listed:
        if is_metadata_file(entry.name):
            continue
        try:
            if entry.is_dir():
                _walk(Path(entry.path), f"{rel}{entry.name}/", label, split, out, seen)
            elif entry.is_file():
                st = entry.stat()
                out.append(File(rel + entry.name, entry.path, label, split, st.st_size, st.st_mtime_ns, st.st_mode))
        except FileNotFoundError:
            raise CnnlabError(f"{entry.path} vanished while the folder was being read; run again once the folder "
                              f"is complete") from None


def _signature(files: list[File]) -> str:
    """A cheap fingerprint of the folder: every file's relative path, size, mtime and mode."""
    text = "\n".join(f"{f.rel}\0{f.size}\0{f.mtime_ns}\0{f.mode:o}" for f in files)
    return hashlib.md5(text.encode("utf-8", "surrogateescape")).hexdigest()


def _content_checksum(files: list[File], skip_bad: bool) -> tuple[str, dict[str, str]]:
    """MD5 over each file's relative path, its length and its bytes; and the files that could not be
    read (only with skip_bad: otherwise the first one is an error). The length keeps the boundary
    between one file's bytes and the next path unambiguous."""
    digest, unreadable = hashlib.md5(), {}
    for f in files:
        digest.update(f.rel.encode("utf-8", "surrogateescape") + b"\0")
        try:
            with open(f.path, "rb") as fh:
                if f.size <= _CHUNK:
                    data = fh.read()
                    digest.update(f"{len(data)}\0".encode() + data)
                else:
                    digest.update(f"{f.size}\0".encode())  # large files stream; a size change shows in the stats
                    for chunk in iter(lambda: fh.read(_CHUNK), b""):
                        digest.update(chunk)
        except PermissionError as exc:
            reason = f"cannot read it ({exc.strerror})"
            if not skip_bad:
                raise CnnlabError(f"{f.path}: {reason}; {UNREADABLE_FIX}, or set data.skip_bad_files=true") from None
            unreadable[f.rel] = reason
            digest.update(b"\0unreadable\0")
        except FileNotFoundError:
            raise CnnlabError(f"{f.path} vanished while the folder was being read; run again once the folder is "
                              f"complete") from None
    return digest.hexdigest(), unreadable


def _same_as_before(root: Path, spec: dict, files: list[File]) -> None:
    """Refuse to write arrays of a folder that changed while it was read (a copy still running)."""
    now = scan(root, spec["class_names"])  # its errors (a class folder emptied meanwhile) say what is wrong
    if _signature(now) == _signature(files):
        return
    before = {f.rel: (f.size, f.mtime_ns, f.mode) for f in files}
    after = {f.rel: (f.size, f.mtime_ns, f.mode) for f in now}
    changed = sorted(rel for rel in before.keys() | after.keys() if before.get(rel) != after.get(rel))
    what = "added" if changed[0] not in before else "removed" if changed[0] not in after else "changed"
    more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
    raise CnnlabError(f"{root} changed while it was being read ({changed[0]} {what}{more}); run again once it is "
                      f"complete")


# --- converting --------------------------------------------------------------------------------------

@contextmanager
def _pixel_limit(max_pixels: int):
    """Pillow's decompression-bomb guard at data.max_image_pixels while the folder is read: opening
    an image of more than twice as many pixels raises; between once and twice, Pillow only warns,
    and `_decode` refuses it from its size, read before any pixel is decoded."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _decode(path: str, channels: int, size: int, max_pixels: int) -> np.ndarray:
    """One file's network pixels (uint8, channels x size x size), or BadFile with Pillow's reason."""
    try:
        with Image.open(path) as image:
            if image.size[0] * image.size[1] > max_pixels:
                raise _too_large(image.size, max_pixels)
            image.load()
            return to_network_pixels(image, channels, size)
    except (BadFile, FileNotFoundError):
        raise
    except PermissionError as exc:
        raise BadFile(f"cannot read it ({exc.strerror})", UNREADABLE_FIX) from None
    except Image.DecompressionBombError:
        raise _too_large(_header_size(path), max_pixels) from None
    except UnidentifiedImageError:
        raise BadFile("not an image (Pillow cannot identify its format)", DAMAGED_FIX) from None
    except Exception as exc:  # any: Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise BadFile(f"a damaged image (Pillow: {_first_line(exc)})", DAMAGED_FIX) from None


def _too_large(size: tuple[int, int], max_pixels: int) -> BadFile:
    width, height = size
    return BadFile(f"{width}x{height} = {width * height} pixels, more than data.max_image_pixels={max_pixels}",
                   "shrink it or raise data.max_image_pixels")


def _header_size(path: str) -> tuple[int, int]:
    """An image's size from its header, Pillow's guard off: opening decodes no pixel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as image:
                return image.size
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _convert(root: Path, files: list[File], spec: dict,
             unreadable: dict[str, str]) -> tuple[np.ndarray, np.ndarray, list]:
    """Every file's pixels in one array (in `files` order), which of them were kept, and the skipped
    files with their reasons. Without skip_bad_files the first bad file is an error."""
    channels, size, max_pixels = spec["channels"], spec["image_size"], spec["max_image_pixels"]
    pixels = np.zeros((len(files), channels, size, size), dtype=np.uint8)
    kept = np.ones(len(files), dtype=bool)
    bad: list[dict] = []
    with _pixel_limit(max_pixels):
        for i, f in enumerate(files):
            try:
                if f.rel in unreadable:
                    raise BadFile(unreadable[f.rel], UNREADABLE_FIX)
                pixels[i] = _decode(f.path, channels, size, max_pixels)
            except BadFile as exc:
                if not spec["skip_bad_files"]:
                    raise CnnlabError(f"{f.path}: {exc.reason}; {exc.fix}, or set data.skip_bad_files=true") from None
                kept[i] = False
                bad.append({"file": f.rel, "reason": exc.reason})
            except FileNotFoundError:
                raise CnnlabError(f"{root} changed while it was being read ({f.rel} removed); run "
                                  f"again once it is complete") from None
    return pixels, kept, bad


def _check_classes_kept(root: Path, class_names: list[str], files: list[File], kept: np.ndarray) -> None:
    """A class (of a split) whose every image was left out as bad cannot be learnt."""
    have = {(f.split, f.label) for f, k in zip(files, kept) if k}
    for split, label in sorted({(f.split, f.label) for f in files} - have, key=lambda s: (s[0] or "", s[1])):
        folder = root / (split or "") / class_names[label]
        raise CnnlabError(f"{folder}: class folder '{class_names[label]}' holds no readable images (all left out as "
                          f"bad files); add images to it or remove the folder")


def _split(spec: dict, files: list[File], pixels: np.ndarray, kept: np.ndarray,
           own_split: bool) -> tuple[dict, dict]:
    """The four arrays (each split by file name, then class) and the image count of each class and split."""
    labels = np.array([f.label for f in files], dtype=np.int64)
    if own_split:
        is_test = np.array([f.split == "test" for f in files])
    else:
        is_test = np.zeros(len(files), dtype=bool)
        for label in range(len(spec["class_names"])):
            members = np.flatnonzero(kept & (labels == label))  # in relative-path order
            n = len(members)
            n_test = min(max(1, round(spec["test_fraction"] * n)), n - 1) if n >= 2 else 0
            order = np.random.default_rng([spec["split_seed"], label]).permutation(n)
            is_test[members[order[:n_test]]] = True
    arrays, counts = {}, {}
    # Each split in the order of the files' names within their class folders, then by class: an
    # export of numbered files (benchmarks/export_png_folder.py) comes back in its source's order,
    # so it trains exactly as the IDX files it came from (README, Image folders).
    order = sorted(range(len(files)), key=lambda i: (files[i].rel.split("/", 2 if files[i].split else 1)[-1],
                                                     files[i].label))
    for split, chosen in (("train", kept & ~is_test), ("test", kept & is_test)):
        index = np.array([i for i in order if chosen[i]], dtype=np.int64)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = pixels[index], labels[index]
        counts[split] = {name: int((labels[index] == c).sum()) for c, name in enumerate(spec["class_names"])}
    return arrays, counts
