"""File output that readers never see half-written, files' checksums, and the CSV text DVC plots read."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write a file so readers never see it half-written: temp file in the same folder (so the
    rename cannot cross file systems), flushed to disk, then renamed over the old one. A failed
    write (disk full, a kill) leaves the previous file as it was and no temp file behind."""
    text = isinstance(data, str)
    return write_atomic_with(path, lambda fh: fh.write(data.encode() if text else data))


def write_atomic_with(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """write_atomic for content too large to hold twice in memory: `write` writes it into the
    temporary file (np.save of a prepared array, say)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_md5(path: str | os.PathLike) -> str:
    """The MD5 of a file's bytes, read a MiB at a time."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def usual_mode(path: str | os.PathLike) -> None:
    """Give a file made by mkstemp (mode 0600) the mode any new file gets here (0666 less the
    umask): a fetched dataset or a report must be readable by the others who use the machine."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def csv_text(fieldnames, rows) -> str:
    """A CSV document (header + dict rows, keys not in fieldnames ignored), ready for write_atomic."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(fieldnames), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
