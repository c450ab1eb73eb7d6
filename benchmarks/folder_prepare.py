"""Image-folder preparation benchmark (cnnlab.training.folder) on a real-size folder, such as the
70,000 Fashion-MNIST PNGs of benchmarks/export_png_folder.py:

1. first prepare: the prepared folder deleted first, every image decoded and converted;
2. unchanged: a run's check of the folder as it is (`ready`: stat calls only);
3. touched: every file's mtime changed, bytes the same (a copy, `dvc checkout`): the run's check
   finds it changed and `prepare` hashes every file again and rewrites only the manifest.

    python benchmarks/folder_prepare.py [--folder /tmp/fmnist-png] [--rounds 3] [OVERRIDE ...]

OVERRIDEs are config overrides (data.channels=1 data.image_size=28); by default conf/data/folder.yaml's.
"Cold" means no prepared arrays, not an empty page cache: the folder's files are read from memory
once the export has written them. Prints a markdown table and writes benchmarks/results/folder-prepare.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import PIL
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from cnnlab.core.config import DataSpec, compose_params, parse  # noqa: E402
from cnnlab.training import folder  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "folder-prepare.md"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def touch_all(root: Path) -> int:
    """Give every file a new mtime (its bytes stay): what a copy or `dvc checkout` does."""
    now, count = time.time_ns(), 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            os.utime(os.path.join(dirpath, name), ns=(now, now))
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/fmnist-png"), help="the image folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="the markdown table to write")
    parser.add_argument("overrides", nargs="*", help="config overrides, as on a command line")
    args = parser.parse_args()
    image_root = args.folder.resolve()
    if not image_root.is_dir():
        raise SystemExit(f"{image_root} is not a folder: run benchmarks/export_png_folder.py --out {image_root} first")
    data = yaml.safe_load(compose_params(["data=folder", f"data.path={image_root}", *args.overrides]))["data"]
    spec = dataclasses.asdict(parse(DataSpec, data, "data"))
    data_dir = Path(tempfile.mkdtemp(prefix="cnnlab-folder-bench-"))
    times: dict[str, list[float]] = {"first prepare": [], "unchanged (ready)": [], "touched: check": [],
                                     "touched: check + rehash": []}
    try:
        for n in range(args.rounds):
            shutil.rmtree(data_dir / spec["name"], ignore_errors=True)
            elapsed, manifest = timed(lambda: folder.prepare(spec, data_dir, 60))
            times["first prepare"].append(elapsed)
            elapsed, ready = timed(lambda: folder.ready(spec, data_dir))
            assert ready, "the folder is not ready right after it was prepared"
            times["unchanged (ready)"].append(elapsed)
            count = touch_all(image_root)
            check, ready = timed(lambda: folder.ready(spec, data_dir))
            assert not ready, "a touched folder must be checked again"
            rehash, touched = timed(lambda: folder.prepare(spec, data_dir, 60))
            assert touched["arrays"] == manifest["arrays"], "a touch must not convert the images again"
            assert folder.ready(spec, data_dir)
            times["touched: check"].append(check)
            times["touched: check + rehash"].append(check + rehash)
            print(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    lines = [
        f"# Image-folder preparation: {count:,} files ({image_root.name}), "
        f"{spec['channels']}x{spec['image_size']}x{spec['image_size']}",
        "",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, Pillow {PIL.__version__}. "
        f"Median of {args.rounds} rounds (min-max); `python benchmarks/folder_prepare.py --folder {image_root}"
        f"{' ' + ' '.join(args.overrides) if args.overrides else ''}`.",
        "",
        "| step | median s | min-max s |",
        "|---|---:|---:|",
        *(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f}-{max(v):.2f} |" for name, v in times.items()),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
