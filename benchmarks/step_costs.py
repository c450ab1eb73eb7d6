"""What each part of cnnlab's tracked loop costs per training step, measured by adding it alone to a
bare Lightning loop.

One process, the documented CNN on Fashion-MNIST (batch 32), fixed torch threads. Each variant is a
short fit (`--steps` steps, inside the first epoch: no validation, no epoch end), timed from the
start of step `--warmup` to the start of the last step, so every hook of the steps in between counts
and set-up does not. Variants run interleaved, round after round; the table gives each one's median
ms/step and its difference to the bare Lightning loop's median of the same rounds.

  plain loop          the steps without Lightning (forward, loss, backward, Adam), the reference
  bare Lightning      a minimal LightningModule over pre-cut batches; no logger, no callbacks
  + <part>            bare Lightning plus that one part of what `cnnlab train` runs
  cnnlab              all of them together, as `cnnlab train` assembles them

    python benchmarks/step_costs.py [--precision 32] [--steps 400] [--rounds 5]

Writes benchmarks/results/step_costs-<precision>[-<isa>].{md,json}; set ONEDNN_MAX_CPU_ISA=AVX2 to
measure the path of a CPU without native bf16.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from cnnlab.core.config import CONF_DIR, instantiate, instantiate_all
from cnnlab.training import runtime
from cnnlab.training.callbacks import RunRecord
from cnnlab.training.config import load
from cnnlab.training.data import ImageDataModule
from cnnlab.training.heads import build_head
from cnnlab.training.module import Classifier
from cnnlab.training.network import build_network

RESULTS = Path(__file__).resolve().parent / "results"
# The callbacks of conf/callbacks/default.yaml with work in a step, each measured alone; model_profile
# and mlflow_model work once training is over (they are in the "cnnlab" variant, outside the timed steps).
CALLBACKS = ("nan_guard", "epoch_curves", "resume_checkpoint", "model_checkpoint", "progress_bar")
AFTER_TRAINING = ("model_profile", "mlflow_model")


class StepTimer(pl.Callback):
    """perf_counter() at the start of step `warmup` and of step `last`."""

    def __init__(self, warmup: int, last: int):
        self.warmup, self.last, self.marks = warmup, last, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in (self.warmup, self.last):
            self.marks[trainer.global_step] = time.perf_counter()

    def ms_per_step(self) -> float:
        return (self.marks[self.last] - self.marks[self.warmup]) * 1000 / (self.last - self.warmup)


class PreCut:
    """Batches cut before the fit (Lightning would take a list for a list of loaders)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class BareModule(pl.LightningModule):
    """What Lightning needs to train the network, nothing else."""

    def __init__(self, net: nn.Module, lr: float, channels_last: bool):
        super().__init__()
        self.net, self.lr, self.channels_last = net, lr, channels_last

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Bench:
    def __init__(self, args, workdir: Path):
        self.args, self.workdir = args, workdir
        overrides = [f"data={args.data}", f"paths.data_dir={args.data_dir}", f"paths.output_dir={workdir}",
                     f"trainer.precision={args.precision}", f"runtime.num_threads={args.threads}",
                     f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", "trainer.enable_model_summary=false",
                     "trainer.num_sanity_val_steps=0"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            self.cfg = compose("config", overrides=overrides)
        self.config = load(self.cfg)
        if args.keep_nvml_probe:  # Lightning's setting as it is, to measure what runtime.apply saves
            runtime.skip_nvml_probe_without_nvml = lambda: False
        runtime.apply(self.config.runtime)
        self.precision = runtime.resolve_precision(args.precision, "cpu")
        self.channels_last = runtime.resolve_channels_last(self.config.runtime.channels_last, self.precision,
                                                           torch.device("cpu"))
        loader = self._datamodule(channels_last=False).train_dataloader()
        self.batches = PreCut([b for _, b in zip(range(args.steps + 1), loader)])  # no iterator cost

    def _datamodule(self, channels_last: bool | None = None) -> ImageDataModule:
        channels_last = self.channels_last if channels_last is None else channels_last
        dm = ImageDataModule(self.config.data, self.config.paths.data_dir, seed=0, channels_last=channels_last)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    def _net_and_head(self):
        """The configured network and head, with the same initial weights for every variant."""
        torch.manual_seed(0)
        head = build_head(self.config.model, self.config.data.num_classes)
        return build_network(self.config.model, self.config.data.channels, self.config.data.image_size,
                             head.num_outputs), head

    def network(self) -> nn.Module:
        net, _ = self._net_and_head()
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def bare(self) -> BareModule:
        return BareModule(self.network(), self.config.optimizer["lr"], self.channels_last)

    def classifier(self) -> Classifier:
        net, head = self._net_and_head()
        model = Classifier(net, head, optimizer=instantiate("optimizer", self.config.optimizer))
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def plain(self, precision: str | None = None, channels_last: bool | None = None) -> float:
        precision = precision or self.precision
        channels_last = self.channels_last if channels_last is None else channels_last
        net = self.network().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        optimizer = torch.optim.Adam(net.parameters(), lr=self.config.optimizer["lr"])
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision.startswith("bf16"))
        for i, (x, y) in enumerate(self.batches.batches):
            if i == self.args.warmup:
                start = time.perf_counter()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) * 1000 / (len(self.batches.batches) - self.args.warmup)

    def fit(self, module: pl.LightningModule, loader, callbacks=(), loggers=(), datamodule=None) -> float:
        timer = StepTimer(self.args.warmup, self.args.steps)
        trainer = instantiate("trainer", self.config.trainer, precision=self.precision, accelerator="cpu",
                              max_steps=self.args.steps + 1, callbacks=[timer, *callbacks],
                              logger=list(loggers) or False, enable_progress_bar=any(
                                  isinstance(c, pl.callbacks.ProgressBar) for c in callbacks),
                              enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint)
                                                       for c in callbacks))
        if datamodule is not None:
            trainer.fit(module, datamodule=datamodule)
        else:
            trainer.fit(module, train_dataloaders=loader)
        return timer.ms_per_step()

    def callbacks(self, *names: str) -> list:
        return instantiate_all("callbacks", {n: self.config.callbacks[n] for n in names})

    def logger(self, system_metrics: bool) -> list:
        node = dict(self.config.logger["mlflow"])
        node["system_metrics_interval_s"] = self.config.tracking.system_metrics_interval_s if system_metrics else None
        return instantiate_all("logger", {"mlflow": node})

    def variants(self) -> dict:
        bare = lambda **kw: self.fit(self.bare(), self.batches, **kw)  # noqa: E731
        found = {
            "plain loop": self.plain,
            "bare Lightning": bare,
            "+ cnnlab's LightningModule (Classifier)": lambda: self.fit(self.classifier(), self.batches),
            "+ cnnlab's batch iterator (ImageDataModule)": lambda: self.fit(
                BareModule(self.network(), self.config.optimizer["lr"], False), None, datamodule=self._datamodule()),
            "+ adaptive threads (num_threads: auto)": lambda: bare(callbacks=[runtime.AdaptiveThreads()]),
            "+ MLflow logger": lambda: bare(loggers=self.logger(system_metrics=False)),
            "+ MLflow logger with system metrics": lambda: bare(loggers=self.logger(system_metrics=True)),
        }
        for name in CALLBACKS:
            found[f"+ callbacks.{name}"] = lambda name=name: bare(callbacks=self.callbacks(name))
        found["cnnlab (all of the above)"] = lambda: self.fit(
            self.classifier(), None, datamodule=self._datamodule(), loggers=self.logger(system_metrics=True),
            callbacks=[RunRecord(self.config.as_dict(), {"runtime.channels_last": self.channels_last}),
                       *self.callbacks(*CALLBACKS, *AFTER_TRAINING), runtime.AdaptiveThreads()])
        return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "auto"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--keep-nvml-probe", action="store_true",
                        help="leave Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1 (cnnlab.training.runtime drops it "
                             "without NVML)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        bench = Bench(args, Path(tmp))
        variants = bench.variants()
        if args.only:
            wanted = ["plain loop", "bare Lightning", *args.only.split(",")]
            variants = {k: v for k, v in variants.items() if k in wanted}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, run in variants.items():
                times[name].append(run())
                print(f"round {round_ + 1}: {name}: {times[name][-1]:.3f} ms/step", flush=True)
    report(args, bench, times)


def machine() -> str:
    """The CPU, its bf16 path and the library versions, for a results header."""
    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                   platform.processor())
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return (f"CPU: {cpu}, {os.cpu_count()} cores; native bf16: {runtime.bf16_native_on_cpu()}"
            f"{f' (ONEDNN_MAX_CPU_ISA={isa})' if isa else ''}; torch {torch.__version__}, Lightning {pl.__version__}.")


def report(args, bench: Bench, times: dict[str, list[float]]) -> None:
    bare = times["bare Lightning"]
    plain = statistics.median(times["plain loop"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        # Per round against the bare loop of the same round: slow drifts of the machine cancel.
        extra = statistics.median(v - b for v, b in zip(values, bare))
        rows.append({"variant": name, "ms_per_step": round(median, 3), "extra_ms_vs_bare": round(extra, 3),
                     "images_per_s": round(32_000 / median), "vs_plain": round(plain / median, 3),
                     "rounds": [round(v, 3) for v in values]})
    header = (f"# Per-step costs: {args.data}, batch 32, precision {bench.precision} (asked {args.precision}), "
              f"channels_last {bench.channels_last}, {args.threads} threads\n\n{machine()}\n"
              f"{args.rounds} interleaved rounds of {args.steps} steps "
              f"(timed after {args.warmup}); medians.\n\n"
              "| variant | ms/step | extra ms/step vs bare Lightning | images/s | x plain loop |\n"
              "| --- | ---: | ---: | ---: | ---: |\n")
    lines = [f"| {r['variant']} | {r['ms_per_step']:.2f} | {r['extra_ms_vs_bare']:+.2f} | "
             f"{r['images_per_s']:,} | {r['vs_plain']:.2f} |" for r in rows]
    write_results(f"step_costs-{bench.precision}", header, lines, args, rows)


def write_results(stem: str, header: str, lines: list[str], args, rows: list[dict]) -> None:
    """benchmarks/results/<stem>[-<isa>].md (the table) and .json (the rows with every round), and print."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    stem += f"-{isa.lower()}" if isa else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(header + "\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
