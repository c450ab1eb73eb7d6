"""What each machine-dependent default buys on this machine: precision, memory layout and threads.

The training steps of the documented CNN (Fashion-MNIST, batch 32, Adam) in a plain loop, one
process, each setting in turn, interleaved over rounds; medians. The `auto` row is what cnnlab's
`trainer.precision: auto` and `runtime.channels_last: auto` choose here. Run it twice to see both
CPU paths: as is, and with `ONEDNN_MAX_CPU_ISA=AVX2` (a bf16 CPU then computes as one without).

    python benchmarks/machine_defaults.py [--rounds 5] [--steps 300]

Writes benchmarks/results/machine_defaults[-<isa>].{md,json}.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

import torch

from cnnlab.training import runtime
from step_costs import Bench, machine, write_results  # benchmarks/, the script's own folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    args.precision, args.only, args.keep_nvml_probe = "32", "", False
    settings = [(p, cl, int(t)) for p, cl, t in itertools.product(("32", "bf16-mixed"), (False, True),
                                                                    args.threads.split(","))]
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(argparse.Namespace(**{**vars(args), "threads": int(args.threads.split(",")[-1])}), Path(tmp))
        for round_ in range(args.rounds):
            for precision, channels_last, threads in settings:
                torch.set_num_threads(threads)
                ms = bench.plain(precision, channels_last)
                times[(precision, channels_last, threads)].append(ms)
                print(f"round {round_ + 1}: {precision} channels_last={channels_last} threads={threads}: "
                      f"{ms:.2f} ms/step", flush=True)
    auto_precision = runtime.resolve_precision("auto", "cpu")
    auto_layout = runtime.resolve_channels_last("auto", auto_precision, torch.device("cpu"))
    fastest = min(statistics.median(v) for v in times.values())
    rows = []
    for (precision, channels_last, threads), values in times.items():
        median = statistics.median(values)
        rows.append({"precision": precision, "channels_last": channels_last, "threads": threads,
                     "ms_per_step": round(median, 3), "images_per_s": round(32_000 / median),
                     "vs_fastest": round(fastest / median, 3),
                     "auto": precision == auto_precision and channels_last == auto_layout,
                     "rounds": [round(v, 3) for v in values]})
    header = (f"# Machine defaults: {args.data}, batch 32, the documented CNN in a plain loop\n\n{machine()}\n"
              f"{args.rounds} interleaved rounds of {args.steps} steps (timed after {args.warmup}); medians. "
              f"auto here: precision {auto_precision}, channels_last {auto_layout}.\n\n"
              "| precision | channels_last | threads | ms/step | images/s | x fastest | auto |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | --- |\n")
    lines = [f"| {r['precision']} | {r['channels_last']} | {r['threads']} | {r['ms_per_step']:.2f} | "
             f"{r['images_per_s']:,} | {r['vs_fastest']:.2f} | {'yes' if r['auto'] else ''} |" for r in rows]
    write_results("machine_defaults", header, lines, args, rows)


if __name__ == "__main__":
    main()
