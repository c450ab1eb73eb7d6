"""How a run uses the machine (conf `runtime`): torch threads, the memory allocator, matmul precision;
and the machine's fast choice for the knobs set to `auto` (precision, layout, fused optimizer, cuDNN).

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

from cnnlab.core.config import Runtime
from cnnlab.core.errors import CnnlabError
from cnnlab.core.internals import bf16_native_on_cpu

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30
THREAD_CHECK_INTERVAL_S = 5.0  # how often `auto` threads look at the load while training


NVML_CHECK_VAR = "PYTORCH_NVML_BASED_CUDA_CHECK"


def apply(runtime: Runtime) -> int:
    """Apply the runtime settings to this process; return the torch threads it starts with."""
    skip_nvml_probe_without_nvml()
    torch.set_float32_matmul_precision(runtime.matmul_precision)
    # cuDNN's convolutions follow it too: torch leaves their TF32 on whatever the matmul precision says.
    torch.backends.cudnn.allow_tf32 = runtime.matmul_precision != "highest"
    if runtime.malloc_keep_memory:
        keep_freed_memory()
    threads = runtime.num_threads if isinstance(runtime.num_threads, int) else auto_threads()
    torch.set_num_threads(threads)
    return threads


def skip_nvml_probe_without_nvml() -> bool:
    """Drop Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1 where NVML cannot load (no NVIDIA driver).

    Lightning sets it at import so that asking whether CUDA is there does not initialise CUDA before
    a fork. torch then loads NVML (libnvidia-ml) at every torch.cuda.is_available(), and torch.optim
    asks that at every optimizer step (its graph-capture health check): without the library each
    try fails, torch falls back to the plain check anyway, and the failed load costs 0.5-0.7 ms per
    step on this project's CPU (about 4% of a fp32 step: README, Speed). With a driver, nothing changes."""
    if os.environ.get(NVML_CHECK_VAR) != "1":
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return False
    except OSError:
        del os.environ[NVML_CHECK_VAR]
        return True


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
    A sweep job gets what its launcher gave it instead (launcher_threads: joblib, Ray, SLURM)."""
    given = launcher_threads()
    if given is not None:
        return given
    cpus = usable_cpus()
    busy = sample_others_busy() if others_busy is None else others_busy
    return max(1, min(cpus, round(cpus - busy)))


def training_device(accelerator: str) -> torch.device:
    """The device Lightning's Trainer will train on for `trainer.accelerator` (its `auto`: a CUDA GPU
    when torch finds one, else the CPU)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(asked: str, accelerator: str) -> str:
    """`trainer.precision: auto`: bf16 autocast where the training device computes bf16 natively
    (1.4-2.1x fp32 there), fp32 elsewhere (emulated bf16 runs about 5x slower than fp32; README, Speed).
    Any other value is Lightning's and is used as asked."""
    if asked != "auto":
        return asked
    return "bf16-mixed" if bf16_is_native(training_device(accelerator)) else "32"


def resolve_channels_last(asked: bool | str, precision: str, device: torch.device) -> bool:
    """`runtime.channels_last: auto`: NHWC on a CPU, where oneDNN's convolutions run fastest in it
    in fp32 and bf16 alike (fp32 1.4-1.8x on this project's AVX2 CPU: README, Speed), and on a GPU
    where the step runs in reduced precision (tensor cores want it); the default layout for fp32
    on a GPU. true or false are used as asked."""
    if asked != "auto":
        return bool(asked)
    return device.type == "cpu" or precision.startswith(("bf16", "16"))


def resolve_optimizer(node: dict, device: torch.device, precision: str = "32", clipping: bool = False) -> dict:
    """`optimizer.fused: auto`: the optimizer's fused kernel on a GPU, where it replaces about eight
    foreach kernels per step with one and, under 16-mixed, lets the grad scaler skip its per-step
    host read of found_inf (the optimizer checks it on the device); torch's default elsewhere (CPU
    steps are not launch-bound). An optimizer class without `fused` leaves it out; true or false
    are passed as asked. Returns the optimizer's config with the value used.

    Lightning cannot clip gradients (trainer.gradient_clip_val) under mixed precision for an optimizer
    that unscales them itself, as a fused one does: `auto` is then not fused, and `true` is refused."""
    mixed = precision.endswith("-mixed") or precision in ("16", "bf16")
    if clipping and mixed and node.get("fused") is True:
        raise CnnlabError(f"config optimizer.fused: a fused optimizer unscales its own gradients, so Lightning "
                          f"cannot clip them under trainer.precision={precision}; set optimizer.fused=auto or "
                          f"false, or trainer.gradient_clip_val=null")
    if node.get("fused") != "auto":
        return node
    resolved = {k: v for k, v in node.items() if k != "fused"}
    if accepts(node, "fused"):
        resolved["fused"] = device.type == "cuda" and not (clipping and mixed)
    return resolved


def accepts(node: dict, argument: str) -> bool:
    """Whether the class a config node names (`_target_`) takes `argument`."""
    import inspect

    from hydra.utils import get_class

    return argument in inspect.signature(get_class(node["_target_"])).parameters


def resolve_benchmark(asked, deterministic, device: torch.device) -> bool | None:
    """`trainer.benchmark: auto`: cuDNN autotuning on a GPU (each convolution's fastest algorithm is
    timed once per input shape; cnnlab's batches have two shapes per split), unless
    trainer.deterministic asks for reproducible kernels; off elsewhere. Otherwise Lightning's own."""
    if asked != "auto":
        return asked
    return device.type == "cuda" and not deterministic


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (on CPUs without it, oneDNN emulates it slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bf16_native_on_cpu()
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


def launcher_threads() -> int | None:
    """The torch threads a sweep job's launcher gives it; None outside such a job (then the load decides).

    joblib (hydra/launcher=parallel): its share of the usable CPUs, n_jobs running side by side.
    Ray (hydra/launcher=ray): the CPUs Ray reserved for the job (ray.remote.num_cpus), at least 1;
    other jobs on the same node hold the rest, so the machine's load says nothing about what is free.
    SLURM (hydra/launcher=slurm): the job's --cpus-per-task (SLURM_CPUS_PER_TASK), when it was set.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().launcher
    target = str(launcher.get("_target_", "")).lower()
    if "joblib" in target:
        n_jobs = launcher.get("n_jobs") or 1
        n_jobs = usable_cpus() if n_jobs < 0 else n_jobs
        return max(1, usable_cpus() // n_jobs) if n_jobs > 1 else None
    if "ray_launcher" in target:
        cpus = _ray_job_cpus()
        return max(1, int(cpus)) if cpus is not None else None
    if "submitit" in target and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return None


def _ray_job_cpus() -> float | None:
    """CPUs Ray assigned to the task this process runs (None outside a Ray worker, or none reserved)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_assigned_resources().get("CPU") or None


LAUNCH_DIR_ENV = "CNNLAB_LAUNCH_DIR"  # set by conf/hydra/launcher/ray.yaml: where the sweep command ran


def ray_worker_setup() -> None:
    """Ray's worker_process_setup_hook for sweep jobs (conf/hydra/launcher/ray.yaml), run as each Ray
    worker process starts.

    A Ray worker starts in the folder `ray start` ran in on its node and with that command's
    environment, not the sweep command's. Hydra places the job's folder relative to the working
    directory (hydra.sweep.dir is `outputs/sweeps/...`) and the MLflow parent run's pointer is in
    it, as are relative paths.data_dir; so the worker moves to the folder the sweep command ran in
    (the same path on a shared filesystem). An empty MLFLOW_TRACKING_URI (unset where the sweep was
    started) is removed, so the job uses the same default store as the sweep command.
    """
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    if launch_dir:
        if not os.path.isdir(launch_dir):
            raise FileNotFoundError(f"the sweep was started in {launch_dir}, which this Ray node "
                                    f"({os.uname().nodename}) does not have: the sweep needs a filesystem "
                                    "shared by every node, at the same path (docs/cluster-sweeps.md)")
        os.chdir(launch_dir)
    if os.environ.get("MLFLOW_TRACKING_URI") == "":
        del os.environ["MLFLOW_TRACKING_URI"]


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
