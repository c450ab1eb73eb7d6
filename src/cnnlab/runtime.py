"""How a run uses the machine (conf `runtime`): torch threads, the memory allocator, matmul precision.

Measured on a 2-core AVX-512 CPU (benchmarks/speed.py; the numbers are in the README):
- Threads: torch's intra-op threads spin while they wait for each other, so when another process
  holds one of the cores, two threads train several times slower than one. `num_threads: auto`
  uses the cores other processes leave idle, and looks again every few seconds while training.
- Allocator: a training step frees and reallocates the same few activation buffers of 1-3 MB.
  glibc returns blocks that size to the OS on free and page-faults them back in on the next step
  (up to 1,600 page faults per step here); keeping them (`malloc_keep_memory`) cut page faults
  about 10x and trained 1.3-1.5x faster in single-process probes (in whole runs the gain is within
  this machine's noise). PyTorch has no caching allocator for CPU tensors, so this sets glibc's
  own thresholds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

import torch
from pytorch_lightning.callbacks import Callback

from cnnlab.config import Runtime

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30
THREAD_CHECK_INTERVAL_S = 5.0  # how often `auto` threads look at the load while training


def apply(runtime: Runtime) -> int:
    """Apply the runtime settings to this process; return the torch threads it starts with."""
    torch.set_float32_matmul_precision(runtime.matmul_precision)
    if runtime.malloc_keep_memory:
        keep_freed_memory()
    threads = runtime.num_threads if isinstance(runtime.num_threads, int) else auto_threads()
    torch.set_num_threads(threads)
    return threads


def keep_freed_memory() -> bool:
    """Ask glibc to serve blocks up to 32 MB from the heap and to keep freed memory (no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def auto_threads(others_busy: float | None = None) -> int:
    """Threads for this process: the usable CPUs minus those other processes keep busy (sampled over
    0.25 s unless given), at least 1.
    With the joblib launcher, each of n parallel jobs gets its share of the CPUs."""
    cpus = usable_cpus()
    share = _parallel_jobs()
    if share > 1:
        return max(1, cpus // share)
    busy = sample_others_busy() if others_busy is None else others_busy
    return max(1, min(cpus, round(cpus - busy)))


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (on CPUs without it, oneDNN emulates it slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


class CpuClock:
    """CPU seconds the whole machine and this process have used, from /proc/stat and os.times()."""

    def __init__(self):
        self.reset()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        own = os.times()
        return (sum(fields[:8]) - idle) / tick, own.user + own.system, time.monotonic()

    def reset(self) -> None:
        self.start = self._read()

    def others_busy(self) -> float:
        """Cores' worth of CPU that other processes used since the last reset."""
        (busy0, own0, t0), (busy1, own1, t1) = self.start, self._read()
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-6))


def sample_others_busy(seconds: float = 0.25) -> float:
    """How many cores other processes keep busy right now (0 where /proc/stat is missing)."""
    try:
        clock = CpuClock()
        time.sleep(seconds)
        return clock.others_busy()
    except (OSError, ValueError):
        return 0.0


def _parallel_jobs() -> int:
    """How many jobs the Hydra joblib launcher runs at once (1 outside such a sweep)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return 1
    n_jobs = launcher.get("n_jobs") or 1
    return usable_cpus() if n_jobs < 0 else n_jobs


class AdaptiveThreads(Callback):
    """`num_threads: auto` while training: every few seconds, use the cores other processes left idle.

    Torch's threads busy-wait for each other, so one thread sharing its core with another process
    stalls all of them; dropping to the idle cores keeps the run near full speed, and it goes back
    up when the other process ends. (Lightning has no such callback; this is its whole job.)
    """

    def __init__(self, interval_s: float = THREAD_CHECK_INTERVAL_S):
        self.interval_s = interval_s
        self.clock: CpuClock | None = None
        self.changes: list[int] = []

    def on_train_start(self, trainer, pl_module):
        try:
            self.clock = CpuClock()
        except (OSError, ValueError):  # no /proc/stat (not Linux): keep the threads we have
            self.clock = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.clock is None or time.monotonic() - self.clock.start[2] < self.interval_s:
            return
        others_busy = self.clock.others_busy()
        threads = auto_threads(others_busy)
        if threads != torch.get_num_threads():
            log.info("other processes use %.1f cores: training on %d threads", others_busy, threads)
            torch.set_num_threads(threads)
            self.changes.append(threads)
        self.clock.reset()
