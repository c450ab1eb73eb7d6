"""File output that readers never see half-written, and the CSV text DVC plots read."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write a file so readers never see it half-written: temp file in the same folder (so the
    rename cannot cross file systems), flushed to disk, then renamed over the old one. A failed
    write (disk full, a kill) leaves the previous file as it was and no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w" if isinstance(data, str) else "wb"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def csv_text(fieldnames, rows) -> str:
    """A CSV document (header + dict rows, keys not in fieldnames ignored), ready for write_atomic."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(fieldnames), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
