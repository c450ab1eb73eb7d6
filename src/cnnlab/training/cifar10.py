"""CIFAR-10, the Python version of its archive (Krizhevsky, 2009): fetched from the first source that
has it, verified against its published MD5, kept in <data_dir>/<name>/ and unpacked there into
prepared arrays (cnnlab.training.prepared), which are what a run reads.

The archive is a gzip tar of pickles: cifar-10-batches-py/data_batch_1..5 (the training images, in
that order), test_batch and batches.meta (the class names). A batch is a dict whose b"data" is uint8
N x 3072 (each image's red plane, then green, then blue, each 32x32 row by row) and whose b"labels"
is a list of class indices. The members are read from the tar into memory, never extracted (no path
the archive names is ever written), and unpickled by an Unpickler that can build only what a batch
holds (see _SafeUnpickler). Every failure of a source is one line; the error when no source
delivers names each source and why, and how to do without a network.
"""

from __future__ import annotations

import builtins
import io
import logging
import pickle
import tarfile
import urllib.parse
import zlib
from pathlib import Path

import numpy as np

from cnnlab.core.errors import CnnlabError, one_line
from cnnlab.core.files import file_md5
from cnnlab.training import prepared
from cnnlab.training.fetch import FileUnavailable, SourceError, first_that_verifies
from cnnlab.training.prepared import manifest_format

log = logging.getLogger(__name__)
FORMAT = "cifar10"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
MEMBERS = (*TRAIN_BATCHES, TEST_BATCH, META)
CHANNELS, SIZE = 3, 32
PIXELS = CHANNELS * SIZE * SIZE
# A batch of the real archive is 31 MB. A member that says it is far larger is not CIFAR-10, and
# would be read into memory whole.
_MAX_MEMBER_BYTES = 256 << 20

# What a batch pickle may name: numpy's array rebuilder (under its module before numpy 2 and
# since), arrays, dtypes, and the builtin containers (Python 2's pickles, like the official
# archive's, name them as __builtin__).
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(module, name): getattr(builtins, name)
       for module in ("builtins", "__builtin__") for name in ("dict", "list", "bytes", "str", "int")},
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickling calls whatever a pickle names (os.system, say), so an archive from a mirror could
    run code here. This one builds only numpy arrays and builtin containers and refuses anything
    else. The MD5 does not make it unneeded: with data.archive.md5 null, any archive that unpacks
    is accepted."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refuses to load {module}.{name}") from None


# ----------------------------------------------------------------------------- the Format table


def ready(spec: dict, data_dir: Path) -> bool:
    """Are the prepared arrays there, made from the archive this config names, and unchanged? A few
    stat calls; the archive is not hashed again (its MD5 was checked when it was unpacked)."""
    dest = Path(data_dir) / spec["name"]
    manifest = prepared.read_manifest(dest)
    return manifest is not None and _describes(manifest, spec) and prepared.unchanged(dest, manifest)


def prepare(spec: dict, data_dir: Path, timeout_s: float) -> dict:
    """Fetch and verify the archive unless a verified copy is here, unpack it into arrays, write
    them and the manifest; returns the manifest. Raises CnnlabError (one line). On failure, what
    was prepared before is left as it was, and no temporary file is left behind."""
    dest = Path(data_dir) / spec["name"]
    previous = prepared.read_manifest(dest)
    prepared.refuse_other_format(dest, previous, "cifar10")
    if _still_prepared(spec, dest, previous):
        log.info("%s: unchanged (%s, md5 %s)", spec["name"], spec["archive"]["name"], previous["checksum"])
        return previous
    dest.mkdir(parents=True, exist_ok=True)
    got = _present(spec, dest)
    if got is None:
        try:
            got = _fetch(spec, dest, timeout_s)
        except FileUnavailable as exc:
            raise CnnlabError(_failure_summary(spec, exc.failures)) from None
    digest, origin, arrays, names = got
    _check_class_names(spec, dest, names)
    manifest = {"dataset": spec["name"], "format": FORMAT, "checksum": digest, "source": origin,
                "archive": spec["archive"]["name"], "sources": [str(s) for s in spec["sources"]],
                "class_names": names,
                "counts": {"train": len(arrays["train_labels"]), "test": len(arrays["test_labels"])}}
    manifest = prepared.write(dest, arrays, manifest)
    log.info("%s: unpacked %s (md5 %s) from %s", spec["name"], spec["archive"]["name"], digest, origin)
    return manifest


def checksum(spec: dict, data_dir: Path) -> str | None:
    """The archive's MD5, as its manifest records it; None before it is prepared."""
    manifest = prepared.read_manifest(Path(data_dir) / spec["name"])
    return manifest.get("checksum") if manifest_format(manifest) == FORMAT else None


def source(spec: dict, data_dir: Path) -> str:
    """Where the archive came from (its URL or path), else where it would come from first."""
    manifest = prepared.read_manifest(Path(data_dir) / spec["name"])
    if manifest_format(manifest) == FORMAT and manifest.get("source"):
        return manifest["source"]
    return archive_url(str(spec["sources"][0]), spec["archive"]["name"])


# ----------------------------------------------------------------------------- getting the archive


def archive_url(source: str, name: str) -> str:
    """The archive's address at one source: a URL (http, https, file) or a path in a folder."""
    if urllib.parse.urlparse(source).scheme in ("http", "https", "file"):
        return source.rstrip("/") + "/" + name
    return str(Path(source) / name)


def _describes(manifest: dict, spec: dict) -> bool:
    """Was the prepared data made from the archive and classes this config names?"""
    archive = spec["archive"]
    if manifest.get("format") != FORMAT or manifest.get("archive") != archive["name"]:
        return False
    if manifest.get("class_names") != list(spec["class_names"]):
        return False
    if archive.get("md5"):
        return manifest.get("checksum") == archive["md5"].lower()
    # No published checksum to pin the content: the same sources are the only sign of the same data.
    return manifest.get("sources") == [str(s) for s in spec["sources"]]


def _still_prepared(spec: dict, dest: Path, manifest: dict | None) -> bool:
    """Do the prepared arrays describe this config, unchanged, and does the archive kept here still
    have the MD5 they were unpacked from? Then nothing needs writing (one read of the archive, to hash it)."""
    if not (manifest is not None and _describes(manifest, spec) and prepared.unchanged(dest, manifest)):
        return False
    archive = dest / spec["archive"]["name"]
    try:
        return archive.is_file() and file_md5(archive) == manifest.get("checksum")
    except OSError:
        return False


def _present(spec: dict, dest: Path) -> tuple[str, str, dict, list[str]] | None:
    """The archive already in the folder, unpacked, if it verifies (so it is not fetched again)."""
    archive = dest / spec["archive"]["name"]
    if not archive.is_file():
        return None
    md5 = spec["archive"].get("md5")
    previous = prepared.read_manifest(dest) or {}
    if not md5 and previous.get("sources") != [str(s) for s in spec["sources"]]:
        # Without a checksum nothing says this copy is what the sources hold now: fetch it from them.
        return None
    try:
        digest, arrays, names = _verify(archive, md5)
    except SourceError as exc:
        log.warning("%s: the copy here does not verify (%s); fetching it again", archive, exc)
        return None
    # The manifest knows the URL this very archive came from; a copy put here by hand is its own source.
    origin = previous.get("source") if previous.get("checksum") == digest else None
    return digest, origin or str(archive.resolve()), arrays, names


def _fetch(spec: dict, dest: Path, timeout_s: float) -> tuple[str, str, dict, list[str]]:
    """The archive from the first source that delivers one that verifies (cnnlab.training.fetch);
    FileUnavailable with each source's failure if none does."""
    name, md5 = spec["archive"]["name"], spec["archive"].get("md5")
    (digest, arrays, names), src = first_that_verifies(name, spec["sources"], dest, timeout_s,
                                                       lambda tmp: _verify(tmp, md5))
    return digest, archive_url(src, name), arrays, names


def _failure_summary(spec: dict, failures: list[tuple[str, str]]) -> str:
    name, md5 = spec["archive"]["name"], spec["archive"].get("md5")
    tried = "; ".join(f"{src}: {reason}" for src, reason in failures)
    return (f"could not fetch dataset '{spec['name']}' ({name}) from any source. Tried {tried}. Without "
            f"a network: put {name}{f' (md5 {md5})' if md5 else ''} in a folder and set "
            f"data.sources=[/that/folder]")


def _verify(path: Path, md5: str | None) -> tuple[str, dict, list[str]]:
    """The archive's MD5, arrays and class names; SourceError if its MD5 is not the published one
    or it is not a complete, well-formed CIFAR-10 archive."""
    digest = file_md5(path)
    if md5 and digest != md5.lower():
        raise SourceError(f"checksum mismatch (md5 {digest}, expected {md5})")
    arrays, names = _unpack(path)
    return digest, arrays, names


def _check_class_names(spec: dict, dest: Path, names: list[str]) -> None:
    # The archive is fine (it verified); the config names other classes, or them in another order.
    if names != list(spec["class_names"]):
        raise CnnlabError(f"{dest / spec['archive']['name']}: its classes are {names}, data.class_names says "
                          f"{list(spec['class_names'])}: set data.class_names to the archive's, in its order")


# ----------------------------------------------------------------------------- unpacking


def _unpack(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The four arrays (train from data_batch_1..5 in order, then test) and the class names."""
    members = _read_members(path)
    names = _label_names(_unpickle(members.pop(META), META))
    train = [_batch(_unpickle(members.pop(m), m), m, len(names)) for m in TRAIN_BATCHES]
    test_images, test_labels = _batch(_unpickle(members.pop(TEST_BATCH), TEST_BATCH), TEST_BATCH, len(names))
    arrays = {"train_images": np.concatenate([images for images, _ in train]),
              "train_labels": np.concatenate([labels for _, labels in train]),
              "test_images": test_images, "test_labels": test_labels}
    return arrays, names


def _read_members(path: Path) -> dict[str, bytes]:
    """The bytes of each expected member, by its short name; other members (readme.html) are
    skipped. Reads the archive to its end, so a truncated one fails here."""
    wanted = {f"{FOLDER}/{m}": m for m in MEMBERS}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                key = wanted.get(member.name.removeprefix("./"))
                if key is None:
                    continue
                if not member.isfile():
                    raise SourceError(f"{member.name} in the archive is not a regular file")
                if key in found:
                    raise SourceError(f"{member.name} is in the archive twice")
                if member.size > _MAX_MEMBER_BYTES:
                    raise SourceError(f"{member.name} in the archive is {member.size} bytes, too large for CIFAR-10")
                found[key] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"not a complete gzip tar archive ({one_line(exc)})") from None
    missing = [f"{FOLDER}/{m}" for m in MEMBERS if m not in found]
    if missing:
        raise SourceError(f"not a CIFAR-10 archive: it lacks {', '.join(missing)}")
    return found


def _unpickle(data: bytes, member: str) -> dict:
    """One member's dict, its keys as str (Python 2's pickles, like the official ones, give bytes)."""
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # a malformed pickle fails in many ways (EOFError, ValueError, IndexError...)
        raise SourceError(f"{member} is not a CIFAR-10 batch pickle ({one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{member} holds a {type(obj).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _label_names(meta: dict) -> list[str]:
    names = meta.get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise SourceError(f"{META} has no list of label_names")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _batch(batch: dict, member: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images as uint8 (N, 3, 32, 32) and its labels as int64, checked."""
    images, labels = batch.get("data"), batch.get("labels")
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[1] == PIXELS):
        what = (f"{images.dtype} {'x'.join(map(str, images.shape))}" if isinstance(images, np.ndarray)
                else type(images).__name__)
        raise SourceError(f"{member}: data is {what}, expected uint8 N x {PIXELS}")
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.ndim == 1:
        labels = labels.astype(np.int64)
    elif isinstance(labels, list) and all(type(v) is int and -2**63 <= v < 2**63 for v in labels):
        labels = np.array(labels, dtype=np.int64)
    else:
        raise SourceError(f"{member}: labels are not a list of integers")
    if len(labels) != len(images):
        raise SourceError(f"{member}: {len(labels)} labels for {len(images)} images")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise SourceError(f"{member}: label {outside[0]} outside 0..{num_classes - 1} ({num_classes} label_names)")
    # Channel-major rows: the red 32x32 plane, then green, then blue.
    return images.reshape(-1, CHANNELS, SIZE, SIZE), labels
