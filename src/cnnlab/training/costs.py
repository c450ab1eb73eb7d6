"""What a model costs: parameters, multiply-accumulates, bytes and inference latency.

MACs come from torch's own FlopCounterMode (which Lightning's `measure_flops` wraps): it counts
the FLOPs of each matmul and convolution, two per multiply-accumulate. Latency is timed with
torch.utils.benchmark, which warms up, synchronises CUDA and reports a median over blocks.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def size_bytes(net: nn.Module) -> int:
    """Bytes of the network's state (weights and buffers), as saved."""
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


def count_macs(net: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates for one image: {"total": n} plus one entry per counted submodule,
    keyed by its name in `net` (for an nn.Sequential, the layer index)."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.zeros(1, *input_shape, device=device))
    finally:
        net.train(was_training)
    root = type(net).__name__
    macs = {name.removeprefix(root + "."): sum(ops.values()) // 2
            for name, ops in counter.get_flop_counts().items() if name.startswith(root + ".")}
    macs["total"] = counter.get_total_flops() // 2
    return macs


def latency_ms_per_image(net: nn.Module, input_shape: tuple[int, ...], batch_size: int,
                         min_run_time_s: float = 0.2) -> float:
    """Median milliseconds per image of an inference forward pass at `batch_size`, on the network's device."""
    # torch.utils.benchmark imports torch's C++-extension helper, which warns on every CPU-only
    # machine that it found no CUDA runtime; that says nothing about the measurement, so hush it.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    x = torch.randn(batch_size, *input_shape, device=next(net.parameters()).device)
    was_training = net.training
    net.eval()

    def forward():
        with torch.inference_mode():
            return net(x)

    try:
        timer = benchmark.Timer("forward()", globals={"forward": forward}, num_threads=torch.get_num_threads())
        # Blocks of calls sized to ~1/10 of min_run_time, median over ten: blocked_autorange's
        # block sizing asks for 1e-4 relative timer overhead, which for a 0.1 ms batch-1 forward
        # grows blocks to 10,000 calls and spends seconds (measured: 2.4 s instead of 0.2 s).
        timer.timeit(1)  # warm-up: the first call at a new shape sets up oneDNN's kernels
        per_call = timer.timeit(2).mean
        number = max(1, int(min_run_time_s / 10 / max(per_call, 1e-9)))
        measurement = benchmark.Measurement.merge([timer.timeit(number) for _ in range(10)])[0]
    finally:
        net.train(was_training)
    return 1000.0 * measurement.median / batch_size
