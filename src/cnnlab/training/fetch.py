"""IDX datasets: put a dataset's four IDX gzip files in data/<name>/, verified, or fail clearly
(the fetch stage, cnnlab.training.prepare, runs it for data in the idx format).

Sources are tried in order (local directories, file:// URLs, then HTTP(S) mirrors). Every file
goes to a temporary name, is checked (published MD5 of the .gz, or MD5 of the decompressed IDX
bytes, and always a full gzip + IDX header read) and only then renamed into place. Files that are
already there and verify are left alone. torchvision's MNIST downloader has no notion of our
ordered local-first sources or of repackaged copies, hence this small module.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import file_md5, usual_mode, write_atomic
from cnnlab.training import prepared
from cnnlab.training.prepared import manifest_format, refuse_other_format

log = logging.getLogger(__name__)
T = TypeVar("T")
FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
MANIFEST = prepared.MANIFEST
_CHUNK = 1 << 20
# IDX magic: 0x00 0x00 <type 0x08 = ubyte> <ndim>; images have 3 dims, labels 1.
_EXPECTED_NDIM = {"images": 3, "labels": 1}


class SourceError(Exception):
    """One source could not deliver one file; the next source is tried."""


class FileUnavailable(Exception):
    """No source could deliver a file; `failures` holds (source, reason) for each one tried."""

    def __init__(self, name: str, failures: list[tuple[str, str]]):
        super().__init__(name)
        self.name, self.failures = name, failures


def _content_md5_and_check(path: Path, key: str) -> str:
    """Decompress the whole file (catches truncation), check the IDX header, return the MD5 of the IDX bytes."""
    digest = hashlib.md5()
    try:
        with gzip.open(path, "rb") as fh:
            header = fh.read(4)
            digest.update(header)
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"not a complete gzip file ({exc})") from None
    if len(header) < 4 or header[:3] != b"\x00\x00\x08":
        raise SourceError("not an IDX ubyte file (bad magic number)")
    expected = _EXPECTED_NDIM[key.split("_")[1]]
    if header[3] != expected:
        raise SourceError(f"IDX file has {header[3]} dimensions, expected {expected}")
    return digest.hexdigest()


def verify(path: Path, key: str, md5: str | None, content_md5: str | None) -> str:
    """Raise SourceError unless `path` is a well-formed IDX gzip matching a known checksum."""
    content = _content_md5_and_check(path, key)
    if md5 is None and content_md5 is None:
        return content
    if md5 is not None and file_md5(path) == md5:
        return content
    if content_md5 is not None and content == content_md5:
        return content
    raise SourceError(f"checksum mismatch (expected md5 {md5 or content_md5})")


def copy_from(source: str, name: str, tmp: Path, timeout: float) -> None:
    """Copy file `name` from one source (a folder, a file:// URL, an http(s) URL of a folder) to `tmp`;
    SourceError says why not. Used by every format that downloads (IDX files, the CIFAR-10 archive)."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("", "file"):
        folder = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme else source)
        if folder.is_file():
            raise SourceError(f"{folder} is a file: data.sources lists folders (or URLs of folders) that hold {name}")
        if not folder.is_dir():
            raise SourceError(f"no such directory {folder}")
        src = folder / name
        if not src.is_file():
            raise SourceError(f"no such file {src}")
        try:
            shutil.copyfile(src, tmp)
        except OSError as exc:
            raise SourceError(f"cannot copy {src}: {exc.strerror or exc}") from None
        return
    if parsed.scheme not in ("http", "https"):
        raise SourceError(f"unsupported source scheme {parsed.scheme!r}")
    url = source.rstrip("/") + "/" + name
    request = urllib.request.Request(url, headers={"User-Agent": "cnnlab-fetch/0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "wb") as out:
            expected = resp.headers.get("Content-Length")
            copied = 0
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                out.write(chunk)
                copied += len(chunk)
        if expected is not None and copied != int(expected):
            raise SourceError(f"download truncated ({copied} of {expected} bytes)")
    except urllib.error.HTTPError as exc:
        raise SourceError(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(f"cannot reach {parsed.netloc}: {reason}") from None


def fetch_file(key: str, spec: dict, sources: list[str], dest: Path, timeout: float) -> tuple[str, str]:
    """Make dest/<name> a verified copy; return (content_md5, where it came from)."""
    name, md5, content_md5 = spec["name"], spec.get("md5"), spec.get("content_md5")
    target = dest / name
    if target.is_file():
        try:
            return verify(target, key, md5, content_md5), "already present"
        except SourceError as exc:
            log.warning("%s: existing copy does not verify (%s); fetching again", target, exc)
    return first_that_verifies(name, sources, dest, timeout, lambda tmp: verify(tmp, key, md5, content_md5))


def first_that_verifies(name: str, sources: list[str], dest: Path, timeout: float,
                        check: Callable[[Path], T]) -> tuple[T, str]:
    """Copy file `name` from the first source whose copy passes `check` (which raises SourceError
    otherwise) into dest/<name>: each copy goes to a temporary name, renamed into place only once
    checked. Returns check's answer and the source; FileUnavailable with each source's failure if
    none delivers. Every format that downloads uses it (IDX files, the CIFAR-10 archive)."""
    failures = []
    for source in map(str, sources):
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            copy_from(source, name, tmp, timeout)
            checked = check(tmp)
            usual_mode(tmp)
            os.replace(tmp, dest / name)
            return checked, source
        except SourceError as exc:
            log.warning("%s from %s failed: %s", name, source, exc)
            failures.append((source, str(exc)))
        finally:
            tmp.unlink(missing_ok=True)
    raise FileUnavailable(name, failures)


def fetch_dataset(data_cfg: dict, data_dir: str | os.PathLike, timeout: float = 60.0) -> dict:
    """Fetch all four files of `data_cfg` into <data_dir>/<name>/ and write its manifest.

    Raises CnnlabError naming the dataset, every source tried and why it failed.
    """
    name = data_cfg["name"]
    dest = Path(data_dir) / name
    dest.mkdir(parents=True, exist_ok=True)
    sources = [str(s) for s in data_cfg["sources"]]
    previous = read_manifest(data_dir, name)
    refuse_other_format(dest, previous, "idx")
    if previous is not None and not is_current(previous, data_cfg):
        # Same folder, other data (a custom dataset pointed elsewhere): files without checksums
        # cannot tell, so start from the new sources.
        log.info("%s: sources or files changed since the last fetch; fetching again", name)
        for key in FILE_KEYS:
            (dest / previous["files"].get(key, {}).get("name", data_cfg["files"][key]["name"])).unlink(missing_ok=True)
    files, problems = {}, []
    for key in FILE_KEYS:
        spec = data_cfg["files"][key]
        try:
            content, origin = fetch_file(key, spec, sources, dest, timeout)
        except FileUnavailable as exc:
            problems.append(exc)
            continue
        log.info("%s: %s (%s)", name, spec["name"], origin)
        stat = (dest / spec["name"]).stat()
        files[key] = {"name": spec["name"], "content_md5": content, "bytes": stat.st_size,
                      "mtime_ns": stat.st_mtime_ns, "verified_against": _checksums(spec)}
    if problems:
        (dest / MANIFEST).unlink(missing_ok=True)
        raise CnnlabError(_failure_summary(name, problems))
    checksum = _dataset_checksum([files[k]["content_md5"] for k in FILE_KEYS])
    manifest = {"dataset": name, "checksum": checksum, "sources": sources, "files": files}
    write_atomic(dest / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _failure_summary(dataset: str, problems: list[FileUnavailable]) -> str:
    """One line: the files that are missing, then each source once with why it failed
    (a source that fails the same way for every file, say an unreachable host, is said once)."""
    reasons: dict[str, list[str]] = {}
    for problem in problems:
        for source, reason in problem.failures:
            if reason not in reasons.setdefault(source, []):
                reasons[source].append(reason)
    tried = "; ".join(f"{source}: {' / '.join(r)}" for source, r in reasons.items())
    return (f"could not fetch dataset '{dataset}' ({', '.join(p.name for p in problems)}) "
            f"from any source. Tried {tried}. Without a network: `apt-get install dataset-fashion-mnist` "
            f"and data=fashion_mnist, or your own IDX files with data=custom data.path=<folder>")


def _checksums(spec: dict) -> dict:
    return {"md5": spec.get("md5"), "content_md5": spec.get("content_md5")}


def is_current(manifest: dict, data_cfg: dict) -> bool:
    """Does a manifest describe the data this config asks for (same sources, names, checksums)?
    Never one of another format (a folder's or CIFAR-10's arrays under the same name)."""
    if manifest_format(manifest) != "idx":
        return False
    if manifest.get("sources") != [str(s) for s in data_cfg["sources"]]:
        return False
    for key in FILE_KEYS:
        spec, have = data_cfg["files"][key], manifest["files"].get(key, {})
        if have.get("name") != spec["name"]:
            return False
        if have.get("verified_against") != _checksums(spec):
            return False
    return True


def verified_cache_path(data_dir: str | os.PathLike, name: str) -> Path | None:
    """Where runs record files hashed again and found unchanged since the fetch: the user's cache
    ($XDG_CACHE_HOME/cnnlab, else ~/.cache/cnnlab), one small JSON per data folder, named by a hash
    of its absolute path. Not in the data folder: that is the fetch stage's DVC output (a run that
    wrote there would make `dvc repro` fetch and train again) and may be read-only."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the XDG spec says use the default
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):  # no home directory: no cache, every touched file is hashed
            return None
    folder = (Path(data_dir) / name).resolve()
    key = hashlib.sha256(f"{folder}\0{name}".encode()).hexdigest()[:16]
    return Path(base) / "cnnlab" / "verified" / f"{name}-{key}.json"


class _VerifiedCache:
    """Size and mtime of each file found, by hashing, to hold the content MD5 its manifest records:
    the cheap check for files whose mtime changed and bytes did not (`dvc pull`, `dvc checkout`, a
    copy, a restore, `touch`). A cache that cannot be read or written is only a slower check."""

    def __init__(self, data_dir: str | os.PathLike, name: str):
        self.path = verified_cache_path(data_dir, name)
        self.folder = str((Path(data_dir) / name).resolve())
        self.files, self.changed = self._read(), False

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text()) if self.path is not None else {}
        except (OSError, ValueError):
            return {}
        files = data.get("files") if isinstance(data, dict) and data.get("folder") == self.folder else None
        return files if isinstance(files, dict) else {}

    def known(self, entry: dict, stat: os.stat_result) -> bool:
        """Does the manifest or the cache say a file of this size and mtime holds `entry`'s content?"""
        if stat.st_size == entry.get("bytes") and stat.st_mtime_ns == entry.get("mtime_ns"):
            return True
        cached = self.files.get(entry["name"])
        return (isinstance(cached, dict) and cached.get("content_md5") == entry["content_md5"]
                and cached.get("bytes") == stat.st_size and cached.get("mtime_ns") == stat.st_mtime_ns)

    def record(self, entry: dict, stat: os.stat_result, content: str) -> None:
        self.files[entry["name"]] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "content_md5": content}
        self.changed = True

    def save(self) -> None:
        if not self.changed or self.path is None:
            return
        # Parallel runs (a sweep) share the file: keep what another wrote meanwhile for other files.
        files = {**self._read(), **self.files}
        try:
            write_atomic(self.path, json.dumps({"folder": self.folder, "files": files}, indent=2) + "\n")
        except OSError as exc:
            log.debug("cannot write %s (%s); files will be hashed again next time", self.path, exc)
        self.changed = False


def unchanged_since_fetch(data_dir: str | os.PathLike, manifest: dict) -> bool:
    """Do the files still hold what the fetch stage verified (the manifest's content MD5s)? The check
    every run makes: cheap while each file has the size and mtime the manifest or the verified cache
    (verified_cache_path) recorded; a file with neither is hashed again and, if its content is the
    same, recorded in that cache. Never writes into the data folder."""
    folder = Path(data_dir) / manifest["dataset"]
    cache = _VerifiedCache(data_dir, manifest["dataset"])
    try:
        for key, entry in manifest["files"].items():
            path = folder / entry["name"]
            try:
                stat = path.stat()
            except OSError:
                return False
            if cache.known(entry, stat):
                continue
            try:
                content = _content_md5_and_check(path, key)
            except SourceError:
                return False
            if content != entry["content_md5"]:
                return False
            cache.record(entry, stat, content)
        return True
    finally:
        cache.save()


def local_checksum(data_dir: str | os.PathLike, data_cfg: dict) -> str | None:
    """The dataset checksum of the files as they are now, which is what a run reads: each file's
    content MD5 from the manifest while the manifest or the verified cache knows its size and mtime,
    else hashed again. A changed file that no longer matches a checksum in the config is an error;
    without one (data=custom) the run goes on and records the checksum of the new content."""
    manifest = read_manifest(data_dir, data_cfg["name"])
    if manifest is None or manifest_format(manifest) != "idx":
        return None
    folder = Path(data_dir) / data_cfg["name"]
    cache = _VerifiedCache(data_dir, data_cfg["name"])
    contents = []
    try:
        for key in FILE_KEYS:
            entry, spec = manifest["files"][key], data_cfg["files"][key]
            path = folder / entry["name"]
            try:
                stat = path.stat()
            except OSError:
                raise CnnlabError(f"{path} is missing since it was fetched: fetch it again (`cnnlab fetch`)") from None
            if cache.known(entry, stat):
                contents.append(entry["content_md5"])
                continue
            try:
                content = verify(path, key, spec.get("md5"), spec.get("content_md5"))
            except SourceError as exc:
                raise CnnlabError(f"{path} changed since it was fetched and no longer verifies ({exc}): "
                                  f"fetch it again (`cnnlab fetch`)") from None
            if content == entry["content_md5"]:
                cache.record(entry, stat, content)
            else:
                log.warning("%s changed since it was fetched; this run records the checksum of what it read", path)
            contents.append(content)
    finally:
        cache.save()
    return _dataset_checksum(contents)


def _dataset_checksum(contents: list[str]) -> str:
    """One checksum for a dataset: the MD5 of its four files' content MD5s, in FILE_KEYS order."""
    return hashlib.md5("".join(contents).encode()).hexdigest()


def read_manifest(data_dir: str | os.PathLike, name: str) -> dict | None:
    """The manifest in <data_dir>/<name>/, or None: none there, or unreadable or cut short (fetched again)."""
    return prepared.read_manifest(Path(data_dir) / name)
