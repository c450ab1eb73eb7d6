"""Speed benchmark: cnnlab's tracked training against a plain PyTorch loop and the Keras example.

Each variant is a fresh process (so imports, set-up and peak memory count as they do for a user),
run interleaved with the others, round after round; the table gives the median over rounds of:
training images/s (median over epochs), ms per step, seconds per epoch (training + validation),
fixed cost (process wall time minus its epochs: imports, set-up, testing, profiling, model export),
peak host memory (the process's max RSS, CUDA's libraries included on a GPU), peak device memory
(torch.cuda.max_memory_allocated, on CUDA) and test accuracy; ratios and the overhead per step
compare medians measured side by side. On a machine with CUDA, cnnlab and the plain loop train on
the GPU with the data resident there (each row names its device); Keras stays on the CPU
(tensorflow-cpu), so a ratio against it is given only when both ran on the same kind of device.
On CUDA the default variants add the GPU's own (CUDA_VARIANTS: float16 with a grad scaler, the NaN
guard's cost, a plain loop under torch.compile(mode="reduce-overhead")).

    python benchmarks/speed.py [--rounds 3] [--epochs 2] [--variants plain,cnnlab,...] [--load 1]
    python benchmarks/speed.py --data custom --data-path /idx/folder ...   # a folder of IDX files (data=custom)

`--load N` runs N busy processes (one core each) during every variant, to see how each degrades
when the machine is shared. Writes benchmarks/results/speed[-load<N>].{md,json,png}.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
FP32 = ["trainer.precision=32", "runtime.channels_last=false"]
BF16 = ["trainer.precision=bf16-mixed", "runtime.channels_last=true"]


def cnnlab(*overrides: str) -> dict:
    return {"kind": "cnnlab", "overrides": list(overrides)}


def plain(*flags: str) -> dict:
    return {"kind": "plain", "flags": list(flags)}


# name -> how to run it. cnnlab-default is conf/ as shipped; -malloc: glibc keeps freed memory, as
# cnnlab's runtime does by default; bf16cl: bf16-mixed autocast with channels_last; -untuned: fp32
# with PyTorch's default threads and glibc's default allocator (cnnlab's runtime before this suite);
# -2threads: two torch threads whatever the load (num_threads: auto follows the load).
VARIANTS = {
    "plain-fp32": plain(),
    "plain-fp32-malloc": plain("--malloc-keep-memory"),
    "plain-bf16cl-malloc": plain("--malloc-keep-memory", "--precision", "bf16-mixed", "--channels-last"),
    "plain-fp32cl-malloc": plain("--malloc-keep-memory", "--channels-last"),  # cnnlab's auto on a CPU without bf16
    "cnnlab-default": cnnlab(),
    "cnnlab-fp32": cnnlab(*FP32),
    "cnnlab-bf16cl": cnnlab(*BF16),
    "cnnlab-fp32-untuned": cnnlab(*FP32, "runtime.num_threads=2", "runtime.malloc_keep_memory=false"),
    "cnnlab-default-2threads": cnnlab("runtime.num_threads=2"),
    # what MLflow's system-metrics monitor costs
    "cnnlab-fp32-no-sysmetrics": cnnlab(*FP32, "tracking.system_metrics_interval_s=null"),
    "keras": {"kind": "keras"},
    # CUDA_VARIANTS: float16 autocast with a grad scaler (a GPU's), what the NaN guard costs, and a
    # plain loop under torch.compile(mode="reduce-overhead"): CUDA graphs, whether a runtime.compile pays
    "plain-fp16cl-malloc": plain("--malloc-keep-memory", "--precision", "16-mixed", "--channels-last"),
    "cnnlab-fp16cl": cnnlab("trainer.precision=16-mixed", "runtime.channels_last=true"),
    "cnnlab-default-no-nan-guard": cnnlab("~callbacks.nan_guard"),
    "plain-bf16cl-compile": plain("--malloc-keep-memory", "--precision", "bf16-mixed", "--channels-last", "--compile"),
}
CUDA_VARIANTS = ("plain-fp16cl-malloc", "cnnlab-fp16cl", "cnnlab-default-no-nan-guard", "plain-bf16cl-compile")
CUDA_ONLY = ("plain-fp16cl-malloc", "cnnlab-fp16cl")  # cnnlab refuses 16-mixed on a CPU
RATIOS = [("cnnlab-default", "plain-bf16cl-malloc"), ("cnnlab-default", "plain-fp32cl-malloc"),
          ("cnnlab-fp32", "plain-fp32"),
          ("cnnlab-fp32", "plain-fp32-malloc"),
          ("cnnlab-bf16cl", "plain-bf16cl-malloc"), ("cnnlab-default", "keras"),
          ("cnnlab-bf16cl", "keras"), ("cnnlab-fp32", "keras"), ("cnnlab-default", "cnnlab-fp32-untuned"),
          ("cnnlab-default", "cnnlab-default-2threads"), ("cnnlab-fp32", "cnnlab-fp32-no-sysmetrics"),
          ("cnnlab-fp16cl", "plain-fp16cl-malloc"), ("cnnlab-default", "cnnlab-default-no-nan-guard"),
          ("plain-bf16cl-compile", "plain-bf16cl-malloc")]


def command(spec: dict, args, workdir: Path) -> list[str]:
    common = ["--data", args.data, "--data-dir", str(args.data_dir), "--epochs", str(args.epochs)]
    if spec["kind"] == "plain":
        path = ["--data-path", str(args.data_path)] if args.data_path else []
        return [PY, str(HERE / "plain_loop.py"), *common, *path, *spec["flags"]]
    if spec["kind"] == "keras":
        return [PY, str(HERE / "keras_example.py"), *common]
    return [PY, "-m", "cnnlab.train", f"data={args.data}", f"paths.data_dir={args.data_dir}",
            *([f"data.path={args.data_path}"] if args.data_path else []),
            f"trainer.max_epochs={args.epochs}", f"hydra.run.dir={workdir}",
            f"tracking.uri=sqlite:///{args.store}/mlflow.db", "tracking.experiment_name=speed", *spec["overrides"]]


def run_once(name: str, spec: dict, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="cnnlab-speed-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        start = time.perf_counter()
        proc = subprocess.Popen(command(spec, args, workdir), cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate()
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"{name} failed ({proc.returncode}):\n{err[-3000:]}")
        if spec["kind"] == "cnnlab":
            metrics = json.loads((workdir / "metrics/train.json").read_text())
            with open(workdir / "metrics/curves.csv") as fh:
                rows = list(csv.DictReader(fh))
            epochs = [{"train_images_per_s": float(r["train_images_per_s"]), "epoch_time_s": float(r["epoch_time_s"])}
                      for r in rows]
            result = {"epochs": epochs, "test_acc": metrics["test/acc"], "peak_rss_mb": metrics["perf/peak_memory_mb"],
                      "peak_device_mb": metrics.get("perf/peak_device_memory_mb"), "device": metrics["device"]}
        else:
            result = json.loads(out.strip().splitlines()[-1])
    images_per_s = statistics.median(e["train_images_per_s"] for e in result["epochs"])
    return {"images_per_s": images_per_s, "ms_per_step": 1000 * args.batch_size / images_per_s,
            "epoch_s": statistics.median(e["epoch_time_s"] for e in result["epochs"]),
            "fixed_s": wall - sum(e["epoch_time_s"] for e in result["epochs"]), "wall_s": wall,
            "peak_mb": result["peak_rss_mb"], "peak_device_mb": result.get("peak_device_mb"),
            "test_acc": result["test_acc"],
            "device": str(result.get("device", "cpu"))}  # Keras: tensorflow-cpu


def busy(_: int) -> None:
    while True:
        pass


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPUs, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def medians(runs: list[dict]) -> dict:
    """Each number's median over rounds (a value missing in a round, e.g. device memory on a CPU, is
    left out); the device as the first round names it."""
    med: dict = {"device": runs[0]["device"]}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if key != "device":
            med[key] = statistics.median(values) if values else None
    return med


def device_kind(device: str) -> str:
    return device.split(":")[0]


def table(results: dict[str, list[dict]]) -> tuple[list[str], dict[str, dict]]:
    med = {name: medians(runs) for name, runs in results.items()}
    lines = ["| variant | device | images/s | steps/s | ms/step | s/epoch | fixed s | peak RSS MB | peak device MB "
             "| test acc | images/s by round |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, m in med.items():
        rounds = ", ".join(f"{r['images_per_s']:,.0f}" for r in results[name])
        device_mb = f"{m['peak_device_mb']:,.0f}" if m.get("peak_device_mb") is not None else "-"
        lines.append(f"| {name} | {m['device']} | {m['images_per_s']:,.0f} | {1000 / m['ms_per_step']:,.0f} | "
                     f"{m['ms_per_step']:.2f} | {m['epoch_s']:.1f} | "
                     f"{m['fixed_s']:.1f} | {m['peak_mb']:,.0f} | {device_mb} | {m['test_acc']:.4f} | {rounds} |")
    lines += ["", "| ratio (images/s) | value | overhead ms/step |", "| --- | ---: | ---: |"]
    for a, b in RATIOS:
        if a in med and b in med:
            where_a, where_b = device_kind(med[a]["device"]), device_kind(med[b]["device"])
            if where_a != where_b:  # e.g. cnnlab on a GPU against Keras, which is CPU-only here (tensorflow-cpu)
                lines.append(f"| {a} / {b} | not compared: {a} ran on {where_a}, {b} on {where_b} | |")
                continue
            overhead = med[a]["ms_per_step"] - med[b]["ms_per_step"]
            lines.append(f"| {a} / {b} | {med[a]['images_per_s'] / med[b]['images_per_s']:.2f}x | {overhead:+.2f} |")
    return lines, med


def plot(results: dict[str, list[dict]], med: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    ax.barh(names, [med[n]["images_per_s"] for n in names], color="#8fb3d9")
    for i, n in enumerate(names):
        ax.plot([r["images_per_s"] for r in results[n]], [i] * len(results[n]), "k.", ms=5)
    ax.invert_yaxis()
    ax.set_xlabel("training images/s (bar: median; dots: rounds)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--data-path", type=Path, default=None,
                        help="--data custom: the folder of IDX files it is fetched from (data.path)")
    parser.add_argument("--batch-size", type=int, default=32, help="the batch size of conf/ (for ms/step)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated names from: {', '.join(VARIANTS)} (default: all; on a CPU "
                             f"all but {', '.join(CUDA_VARIANTS)})")
    parser.add_argument("--load", type=int, default=0, help="busy processes running alongside (default 0)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if args.variants is None:
        names = [n for n in VARIANTS if cuda or n not in CUDA_VARIANTS]
    else:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if not cuda and any(n in CUDA_ONLY for n in names):
        raise SystemExit(f"{[n for n in names if n in CUDA_ONLY]}: float16 training needs a CUDA GPU")
    if "keras" in names and importlib.util.find_spec("keras") is None:
        print("keras: TensorFlow is not installed (pip install -e '.[bench]'); skipped", file=sys.stderr)
        names.remove("keras")
    if not (args.data_dir / args.data / "manifest.json").is_file():
        path = f" data.path={args.data_path}" if args.data_path else ""
        raise SystemExit(f"{args.data_dir / args.data}: fetch the data first (cnnlab params data={args.data}{path} "
                         f"paths.data_dir={args.data_dir} && cnnlab fetch)")

    # One MLflow store for all runs, as in a project (a new store's schema set-up is a one-off cost).
    args.store = Path(tempfile.mkdtemp(prefix="cnnlab-speed-store-"))
    subprocess.run([PY, "-c", f"import mlflow; mlflow.MlflowClient('sqlite:///{args.store}/mlflow.db')"
                              ".search_experiments()"], check=True, capture_output=True)
    hogs = [multiprocessing.Process(target=busy, args=(i,), daemon=True) for i in range(args.load)]
    for hog in hogs:
        hog.start()
    results: dict[str, list[dict]] = {n: [] for n in names}
    try:
        for r in range(args.rounds):
            for name in names:
                results[name].append(run_once(name, VARIANTS[name], args))
                print(f"round {r + 1}/{args.rounds} {name}: {results[name][-1]['images_per_s']:,.0f} images/s, "
                      f"fixed {results[name][-1]['fixed_s']:.1f} s", file=sys.stderr, flush=True)
    finally:
        for hog in hogs:
            hog.terminate()
        shutil.rmtree(args.store, ignore_errors=True)

    lines, med = table(results)
    load = f", {args.load} busy process(es) alongside" if args.load else ""
    title = (f"{args.data}, batch {args.batch_size}, {args.epochs} epochs x {args.rounds} interleaved rounds{load}\n"
             f"{machine()}")
    report = "\n".join([f"# Speed: {title.splitlines()[0]}", "", f"Machine: {machine()}.", "",
                        f"`python benchmarks/speed.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "", *lines, ""])
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "speed" + (f"-load{args.load}" if args.load else "")
    (args.out / f"{stem}.md").write_text(report)
    (args.out / f"{stem}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "machine": machine(), "runs": results, "medians": med},
                                                      indent=2) + "\n")
    plot(results, med, title, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
