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
        usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
