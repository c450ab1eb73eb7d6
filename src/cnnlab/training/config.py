"""A training run's whole config: the root `Config` (every section, typed) and `load()`, which
checks every knob before any work and raises one CnnlabError line naming the key to fix.

The sections other wings read too (data, tracking, evaluate...) and the loader's machinery are
cnnlab.core.config; the model's spec is cnnlab.training.network's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from omegaconf import DictConfig

from cnnlab.core.config import (
    DataSpec,
    Evaluate,
    Fetch,
    Paths,
    Runtime,
    Tracking,
    at_least,
    fail,
    instantiate,
    is_int,
    parse,
    to_container,
    trains_on_cuda,
)
from cnnlab.core.errors import CnnlabError, one_line
from cnnlab.training.network import ModelSpec, fit_problem

PRECISIONS = ("auto", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true", "64", "64-true")


@dataclass
class Config:
    seed: int = at_least(0)
    seeds: int = at_least(1)            # a sweep's repeats of each configuration (cnnlab.tracking.repeats)
    optimized_metric: str               # the metric train() returns to a sweeper
    paths: Paths
    data: DataSpec
    model: ModelSpec
    runtime: Runtime
    evaluate: Evaluate
    fetch: Fetch
    tracking: Tracking
    # Instantiated by Hydra; checked by building them (see check_instantiable).
    optimizer: dict
    scheduler: dict | None
    trainer: dict
    callbacks: dict | None
    logger: dict | None

    def problems(self):
        # Every conv block must fit the data's images: said now, not when the network is built
        # after the data is fetched and the MLflow run opened.
        shrinks = fit_problem(self.model, self.data.image_size)
        if shrinks:
            yield shrinks
        if self.optimized_metric.startswith("test/"):
            yield "optimized_metric", "the test set is never used for model selection; name a val/ metric"
        if self.model.head == "sigmoid":
            positives, k = self.model.positive_classes, self.data.num_classes
            if not positives or any(not 0 <= p < k for p in positives):
                yield "model.positive_classes", f"expected class indices in [0, {k}), got {positives!r}"
            elif len(set(positives)) == k:
                yield "model.positive_classes", "every class is positive: nothing left to tell apart"
        if not (self.callbacks or {}).get("model_checkpoint"):
            yield "callbacks.model_checkpoint", "required: test and evaluate use the best checkpoint it keeps " \
                                                "(choose callbacks as a list that includes default)"
        lr = self.optimizer.get("lr")
        if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0):
            yield "optimizer.lr", f"expected a number > 0, got {lr!r}"  # torch itself accepts 0
        yield from _trainer_problems(self.trainer)

    def as_dict(self) -> dict:
        """The resolved config, defaults filled in: what MLflow records and checkpoints keep."""
        return dataclasses.asdict(self)


def _trainer_problems(trainer: dict):
    epochs = trainer.get("max_epochs")
    if not is_int(epochs) or epochs < 1:
        yield "trainer.max_epochs", f"expected an integer >= 1, got {epochs!r}"
    if str(trainer.get("precision")) not in PRECISIONS:
        yield "trainer.precision", f"expected one of {', '.join(PRECISIONS)}, got {trainer.get('precision')!r}"
    yield from _device_problems(str(trainer.get("accelerator", "auto")), str(trainer.get("precision")))
    if trainer.get("benchmark") not in ("auto", True, False, None):
        yield "trainer.benchmark", f"expected auto, true, false or null, got {trainer.get('benchmark')!r}"
    value = trainer.get("limit_train_batches")
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
        yield "trainer.limit_train_batches", f"expected a number > 0 (or null), got {value!r}"
    value = trainer.get("limit_val_batches")
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
        yield "trainer.limit_val_batches", (
            f"expected a number > 0 (or null), got {value!r}: the best checkpoint, which test and evaluate "
            f"use, is chosen by validation; validate less with a fraction (0.1) or trainer.check_val_every_n_epoch")
    every, epochs_ok = trainer.get("check_val_every_n_epoch", 1), is_int(epochs) and epochs >= 1
    if every is not None and (not is_int(every) or every < 1):
        yield "trainer.check_val_every_n_epoch", f"expected an integer >= 1, got {every!r}"
    elif every is not None and epochs_ok and every > epochs and not trainer.get("max_steps", -1) > 0:
        yield "trainer.check_val_every_n_epoch", (
            f"{every} > trainer.max_epochs={epochs}: no epoch would be validated, so there would be no best "
            f"checkpoint to test; choose at most {epochs}")
    devices = trainer.get("devices", "auto")
    if trainer.get("strategy") is None and devices not in ("auto", 1, "1"):
        yield "trainer.devices", (f"{devices!r} devices train with DDP, which needs cnnlab's settings for it: "
                                  f"use trainer=ddp trainer.devices={devices} (or devices=1)")
    accelerator = trainer.get("accelerator", "auto")
    if trainer.get("sync_batchnorm") is True and not trains_on_cuda(accelerator):
        yield "trainer.sync_batchnorm", (f"true needs a training on CUDA GPUs (torch's SyncBatchNorm refuses CPU "
                                         f"tensors), and trainer.accelerator={accelerator} trains on the CPU here: "
                                         f"set it false")


def _device_problems(accelerator: str, precision: str):
    """What this machine cannot run, said before Lightning says it in its own words."""
    import torch

    has_gpu = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not has_gpu:
        yield "trainer.accelerator", f"{accelerator!r} asked for, but torch finds no CUDA GPU on this machine; " \
                                     f"use auto (the GPU when there is one) or cpu"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not has_gpu)
    if on_cpu and precision in ("16", "16-mixed"):
        yield "trainer.precision", f"{precision!r} (float16 autocast) runs on a GPU only; on a CPU use bf16-mixed or 32"


# Sections a composed config may lack (their group selected nothing): they default to none.
_OPTIONAL_SECTIONS = ("scheduler", "callbacks", "logger")


def load(cfg: DictConfig | dict) -> Config:
    """Check every knob before any work; return the typed config (or raise one CnnlabError line)."""
    plain = to_container(cfg)
    plain = {**{k: None for k in _OPTIONAL_SECTIONS}, **{k: v for k, v in plain.items() if k != "hydra"}}
    config = parse(Config, plain, "")
    check_instantiable("optimizer", config.optimizer)
    if config.scheduler:
        check_instantiable("scheduler", config.scheduler)
    return config


def check_instantiable(section: str, node: dict) -> None:
    """Build the optimizer (or scheduler) on a dummy parameter, so a bad argument such as
    `optimizer.betas=[2.0,0.999]` fails now, in the library's own words, not after data loads."""
    import torch

    if not isinstance(node, dict) or "_target_" not in node:
        fail(section, "expected a mapping with a _target_ (a torch class)")
    if node.get("fused") == "auto":  # optimizer.fused: auto is cnnlab's (runtime.resolve_optimizer)
        node = {k: v for k, v in node.items() if k != "fused"}
    make, params = instantiate(section, node), [torch.nn.Parameter(torch.zeros(1))]
    try:
        make(params if section == "optimizer" else torch.optim.SGD(params, lr=0.1))
    except Exception as exc:
        raise CnnlabError(f"config {section}: {one_line(exc)}") from None
