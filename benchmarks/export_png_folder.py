"""Export Fashion-MNIST (the IDX files of Debian's dataset-fashion-mnist) as an image folder:
OUT/train/<class>/<index:05d>.png and OUT/test/<class>/<index:05d>.png, 70,000 PNGs, the input of
`data=folder` at a realistic size (benchmarks/folder_prepare.py measures its preparation).

    python benchmarks/export_png_folder.py [--source /usr/share/datasets/fashion-mnist] [--out /tmp/fmnist-png]

The class folders are the names in conf/data/fashion_mnist.yaml, made valid folder names and
prefixed with their label ("T-shirt/top" becomes "0_T-shirt_top"), so that the folders' sorted
order (data=folder's labels) is the IDX files' label order; with the files numbered in their IDX
order, a run on the folder trains on the very tensors a run on the IDX files does (README, Image
folders). Written into a temporary folder beside OUT and renamed
into place when complete: an interrupted export leaves no half-filled OUT behind.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from cnnlab.training.idx import read_idx  # noqa: E402

SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def folder_name(class_name: str) -> str:
    """A class name as a folder name: a path separator (and anything else odd) becomes '_'."""
    return re.sub(r"[^A-Za-z0-9 ._-]+", "_", class_name).strip() or "class"


def class_names() -> list[str]:
    names = yaml.safe_load((ROOT / "conf" / "data" / "fashion_mnist.yaml").read_text())["class_names"]
    folders = [f"{label}_{folder_name(n)}" for label, n in enumerate(names)]
    if len(set(folders)) != len(folders):
        raise SystemExit(f"class names {names} do not give distinct folder names: {folders}")
    return folders


def export_split(source: Path, out: Path, split: str, folders: list[str]) -> int:
    images, labels = (read_idx(source / name) for name in SPLITS[split])
    for name in folders:
        (out / split / name).mkdir(parents=True)
    for index, (pixels, label) in enumerate(zip(images, labels)):
        Image.fromarray(pixels, "L").save(out / split / folders[label] / f"{index:05d}.png")
    return len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="folder holding the four IDX .gz files (apt-get install dataset-fashion-mnist)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fmnist-png"), help="the image folder to write")
    args = parser.parse_args()
    out = args.out.resolve()
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first (this script never writes into an existing folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folders = class_names()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    try:
        count = sum(export_split(args.source, tmp, split, folders) for split in SPLITS)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the folder from the machine's other users
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {count} PNGs to {out} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
