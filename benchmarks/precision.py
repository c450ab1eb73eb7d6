"""Benchmark: training-step throughput of a zoo model in fp32 vs bf16 autocast + channels_last.

Timings on a shared machine are noisy, so the variants run interleaved, round after round, and
the report gives medians and their ratio rather than any single time.

    python benchmarks/precision.py [--model cnn] [--batch-size 32] [--rounds 7] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from cnnlab.config import CONF_DIR, load
from cnnlab.heads import build_head
from cnnlab.network import build_network

VARIANTS = {"fp32": (False, False), "bf16+channels_last": (True, True)}


def images_per_second(net, x, y, steps: int, bf16: bool, channels_last: bool) -> float:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = load(compose("config", overrides=[f"model={args.model}", "model.head=softmax"]))
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, (bf16, channels_last) in VARIANTS.items():
            net = build_network(config.model, 1, 28, build_head(config.model, 10).num_outputs)
            results[name].append(images_per_second(net, x, y, args.steps, bf16, channels_last))
    medians = {name: statistics.median(values[1:]) for name, values in results.items()}
    print(f"model={args.model} batch={args.batch_size} rounds={args.rounds} steps={args.steps} "
          f"threads={torch.get_num_threads()}")
    for name, value in medians.items():
        print(f"  {name:20s} median {value:9.0f} images/s")
    print(f"  speed-up bf16+channels_last / fp32: {medians['bf16+channels_last'] / medians['fp32']:.2f}x")


if __name__ == "__main__":
    main()
