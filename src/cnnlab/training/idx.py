"""The IDX file format of MNIST-style datasets (LeCun's ubyte files, usually gzipped)."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from cnnlab.core.errors import CnnlabError

MAGIC_UBYTE = b"\x00\x00\x08"  # two zero bytes, then type 0x08 (unsigned byte); the 4th byte is ndim


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX ubyte file (gzip or plain) into a uint8 array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # truncated or corrupt gzip
        raise CnnlabError(f"{path}: not a complete gzip file ({exc}); fetch it again (`cnnlab fetch`)") from None
    except OSError as exc:
        raise CnnlabError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) < 4 or raw[:3] != MAGIC_UBYTE:
        raise CnnlabError(f"{path}: not an IDX ubyte file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(shape):
        raise CnnlabError(f"{path}: IDX header says {shape} but holds {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file (tests and custom datasets use it)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = MAGIC_UBYTE + bytes([array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())
