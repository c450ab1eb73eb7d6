"""Start-up benchmark: how long each `cnnlab` command takes as a whole process, as a user waits for it.

Every command runs in a fresh process, the commands interleaved round after round (so a slow moment
of the machine spreads over all of them); the table gives the median and the spread over rounds.
The training's fixed cost is the wall time of a training that has almost nothing to train (64
images, one epoch) minus that epoch's own seconds: imports, store, data check, test pass, profile,
model export. `predict` classifies one PNG from a checkpoint this script trains first.

    python benchmarks/startup.py [--rounds 5]

Writes benchmarks/results/startup.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_dataset  # noqa: E402 (the tests' tiny learnable IDX dataset)

CNNLAB = str(Path(sys.executable).parent / "cnnlab")
COMMANDS = ("train", "fetch", "evaluate", "compare", "register", "predict", "params")


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cnnlab-startup-"))
    data = write_dataset(work / "tiny", n_train=164, n_test=64)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    tiny = ["data=custom", f"data.path={data}", "data.val_size=100", f"paths.data_dir={work / 'data'}"]

    def train(name: str, *extra: str) -> list[str]:
        return [CNNLAB, "train", *tiny, f"hydra.run.dir={work / name}", "trainer.max_epochs=1",
                "callbacks.progress_bar.refresh_rate=0", *extra]

    subprocess.run(train("reference", "debug=smoke"), cwd=work, env=env, check=True, capture_output=True)
    checkpoint = work / "reference" / "models" / "model.ckpt"
    image = work / "digit.png"
    pixels = np.zeros((28, 28), np.uint8)
    pixels[7:9, 4:24] = 255
    Image.fromarray(pixels).save(image)

    cases = {"cnnlab --help": [CNNLAB, "--help"]}
    cases.update({f"cnnlab {name} --help": [CNNLAB, name, "--help"] for name in COMMANDS})
    cases["cnnlab params (compose conf/)"] = [CNNLAB, "params", "--output", str(work / "params.yaml")]
    cases["cnnlab predict, 1 PNG, checkpoint"] = [CNNLAB, "predict", str(image), "--model", str(checkpoint)]
    trainings = {"training fixed cost, defaults": [], "training fixed cost, debug=smoke": ["debug=smoke"]}
    times: dict[str, list[float]] = {name: [] for name in [*cases, *trainings]}
    for round_ in range(args.rounds):
        for name, cmd in cases.items():
            times[name].append(timed(cmd, work, env))
        for i, (name, extra) in enumerate(trainings.items()):
            folder = work / f"training-{i}-{round_}"
            elapsed = timed(train(folder.name, *extra), work, env)
            rows = list(csv.DictReader((folder / "metrics" / "curves.csv").open()))
            times[name].append(elapsed - sum(float(r["epoch_time_s"]) for r in rows))  # minus the epoch itself
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [f"Start-up, whole processes, median of {args.rounds} rounds (min-max); {cpu}, {os.cpu_count()} "
             f"CPUs, {time.strftime('%Y-%m-%d')}", "", "| command | median s | min-max s |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f}-{max(ts):.2f} |" for name, ts in times.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "startup.md").write_text(text)
    (out / "startup.json").write_text(json.dumps({"cpu": cpu, "rounds": args.rounds, "seconds": times}, indent=2))


if __name__ == "__main__":
    main()
