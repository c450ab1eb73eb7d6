"""Training: `cnnlab train [overrides]` or `python -m cnnlab.train [overrides]` (a Hydra app over
conf/; `-m` sweeps), and the DVC `train` stage. Outputs in paths.output_dir (fixed names, so DVC
can track them; see cnnlab.core.keys):
  models/model.ckpt        best checkpoint by validation accuracy (callbacks.model_checkpoint)
  models/mlflow_run.json   the MLflow run this model belongs to (logger.mlflow)
  metrics/curves.csv       one row per epoch (callbacks.epoch_curves)
  metrics/train.json       the run's metrics: test metrics and what the callbacks measured
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import sys
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from cnnlab.core import keys
from cnnlab.core.config import CONF_DIR, instantiate, instantiate_all, to_container
from cnnlab.core.errors import CnnlabError, RunFailed, exit_with
from cnnlab.core.files import write_atomic
from cnnlab.tracking import lineage, sync
from cnnlab.tracking import store as tracking
from cnnlab.tracking.logger import mlflow_loggers
from cnnlab.training import resume, runtime
from cnnlab.training.callbacks import RunRecord
from cnnlab.training.checkpoints import Interrupted, ResumeCheckpoint, interruptions_reported
from cnnlab.training.config import load
from cnnlab.training.data import ImageDataModule
from cnnlab.training.heads import build_head
from cnnlab.training.module import Classifier
from cnnlab.training.network import build_network

log = logging.getLogger(__name__)


def train(cfg: DictConfig | dict) -> dict:
    """Build data, model, callbacks, loggers and trainer from config; fit (continuing an
    interrupted attempt at the same training, see cnnlab.training.resume); test; return the metrics."""
    config = load(cfg)  # every knob is checked before any work starts
    key = resume.config_key(config.as_dict(), config.paths.output_dir)
    done = resume.finished_in_sweep(key)  # a re-run sweep: this job finished in its interrupted attempt
    if done is not None:
        return done
    previous = resume.find(key, config.paths.output_dir)
    if previous is not None and previous.resolve() != Path(config.paths.output_dir).resolve():
        log.info("continuing the interrupted training in %s", previous)
        config = load(resume.moved(cfg, config.paths.output_dir, str(previous)))
    runtime.apply(config.runtime)
    sync.send_pending()  # what an earlier training's store never received, now that it may be back
    # In-memory tensors need no worker processes; Lightning's advice to add some does not apply.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # models/ also holds the run pointer (mlflow_run.json) and the resume checkpoint.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    quiet_startup()
    pl.seed_everything(config.seed, workers=True, verbose=False)

    # `auto` knobs take this machine's fast choice; the run records what was asked (params) and
    # what was used (tags), and what was used is what makes its configuration (cnnlab.tracking.repeats).
    accelerator = str(config.trainer.get("accelerator", "auto"))
    device = runtime.training_device(accelerator)
    precision = runtime.resolve_precision(str(config.trainer["precision"]), accelerator)
    channels_last = runtime.resolve_channels_last(config.runtime.channels_last, precision, device)
    optimizer = runtime.resolve_optimizer(config.optimizer, device, precision,
                                          clipping=bool(config.trainer.get("gradient_clip_val")))
    benchmark = runtime.resolve_benchmark(config.trainer.get("benchmark"), config.trainer.get("deterministic"), device)
    datamodule = ImageDataModule(config.data, config.paths.data_dir, seed=config.seed,
                               channels_last=channels_last, fetch_timeout_s=config.fetch.timeout_s)
    head = build_head(config.model, config.data.num_classes)
    net = build_network(config.model, config.data.channels, config.data.image_size, head.num_outputs)
    resolved = config.as_dict()
    model = Classifier(net, head, optimizer=instantiate("optimizer", optimizer),
                       scheduler=instantiate("scheduler", config.scheduler) if config.scheduler else None,
                       architecture={"model": resolved["model"], "input_shape": list(datamodule.input_shape),
                                     "num_labels": config.data.num_classes})
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The precision and device used are the trainer's (RunRecord reads them there, as Lightning names them).
    used = {"runtime.channels_last": channels_last, "optimizer.fused": optimizer.get("fused"),
            "trainer.benchmark": benchmark}
    record = RunRecord(resolved, used)
    callbacks = [record,
                 *instantiate_all("callbacks", config.callbacks)]
    if config.trainer.get("enable_progress_bar") is False:  # Lightning's switch hides the configured bar too
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if config.runtime.num_threads == "auto" and device.type == "cpu":  # a GPU step does not wait on CPU threads
        callbacks.append(runtime.AdaptiveThreads())
    loggers = instantiate_all("logger", config.logger)  # an MLflow store that cannot be used fails here
    if not loggers:
        log.warning("logger=none: this run is not tracked; its checkpoint and metrics are in %s",
                    config.paths.output_dir)
    trainer: pl.Trainer = instantiate("trainer", config.trainer, precision=precision, benchmark=benchmark,
                                      callbacks=callbacks, logger=loggers or False)
    # In distributed training global rank 0 claims the folder and writes to it (Lightning saves
    # checkpoints and logs from rank 0 only); the other processes resume from the same checkpoint.
    leader = trainer.is_global_zero
    attempt = (resume.begin if leader else resume.follow)(key, config.paths.output_dir)
    try:
        if attempt.checkpoint:
            log.info("resuming from %s", attempt.checkpoint)
            for logger in mlflow_loggers(trainer):
                logger.continue_run(attempt.run)
        with interruptions_reported(callbacks), failures_named(record):
            trainer.fit(model, datamodule=datamodule, ckpt_path=attempt.checkpoint)
            if trainer.world_size > 1:  # each process says it did its share
                log.info("process %d of %d trained %d steps", trainer.global_rank, trainer.world_size,
                         trainer.global_step)
            # trainer.fast_dev_run, Lightning's smoke test, keeps no checkpoint: test the weights it has.
            best = None if trainer.fast_dev_run else best_checkpoint(trainer)
            test = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0]

        metrics = {k: float(v) for k, v in test.items()}
        for callback in callbacks:
            metrics.update(getattr(callback, "summary", {}))
        runs = [lg.run_id for lg in mlflow_loggers(trainer)]
        result = {**metrics, "device": str(trainer.strategy.root_device), "mlflow_run_id": runs[0] if runs else None}
        # JSON has no NaN: a metric that is not a number is written as null (DVC reads it as missing)
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}
        if leader:
            write_atomic(Path(config.paths.output_dir) / keys.TRAIN_METRICS, json.dumps(finite, indent=2) + "\n")
            attempt.finish()
    finally:
        attempt.close()
    if leader:
        log.info("; ".join([f"test accuracy {metrics[keys.TEST_ACC]:.4f}",
                            *(f"MLflow run {lg.run_id} in {lg.ui_link()}" for lg in mlflow_loggers(trainer))]))
    return result


@contextlib.contextmanager
def failures_named(record: RunRecord):
    """Around fit and test: an error after the run's MLflow run was opened (RunRecord marked it
    FAILED with the error) becomes RunFailed with that run's id, raised from the error itself."""
    try:
        yield
    except Exception as exc:
        if record.failed_run_id is None or isinstance(exc, RunFailed):
            raise
        raise RunFailed(str(exc).strip() or type(exc).__name__, record.failed_run_id) from exc


def quiet_startup() -> None:
    """Leave out start-up messages that do not apply to a cnnlab run: Lightning's SLURM hint (a
    srun on the machine does not make a local run a SLURM job; trainer=ddp documents SLURM), its
    advertising tips, the model summary's note that it sizes layers in fp32 under bf16, and a
    deprecation inside torch's own pytree that no caller can act on; and, for trainer.overfit_batches,
    that it turns shuffling off: cnnlab's loaders already are sequential then (cnnlab.training.data); and, under
    trainer=ddp, torch 2.13+'s renaming of DDP's broadcast_buffers (conf/trainer/ddp.yaml keeps the
    name every supported torch knows) and the deprecated all_gather Lightning calls for self.all_gather."""
    for message in (r"The `srun` command is available", r"Precision .* is not supported by the model summary",
                    r"You requested to overfit but enabled", r"`broadcast_buffers` is deprecated",
                    r".*all_gather.* is deprecated",
                    r".*isinstance\(treespec, LeafSpec\) is deprecated"):
        warnings.filterwarnings("ignore", message=message)
    tips = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in tips.filters):
        tips.addFilter(_NoTips())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def best_checkpoint(trainer: pl.Trainer) -> str:
    """The best checkpoint by validation (callbacks.model_checkpoint), which test and evaluate use."""
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ResumeCheckpoint) and callback.best_model_path:
            return callback.best_model_path
    raise CnnlabError("training produced no checkpoint (did validation run? check trainer.limit_val_batches)")


def failure_policy(task):
    """What happens when a training fails, in one place.

    SIGTERM or Ctrl-C stop a single run and a sweep alike: the run is KILLED, its resume checkpoint
    written, and the exit status is 128 + the signal's number (143, 130). So does a tracking store
    that cannot be used (one line naming it, status 1). A run that was already
    open and failed is marked FAILED by Lightning, with its error (RunRecord). In a
    sweep, a failing job is logged (an MLflow run marked FAILED under the sweep's parent, if none
    was open yet) and scores NaN so the sweep goes on. A single run exits with status 1 and one
    `error:` line for a problem the user can fix; anything else keeps its traceback.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> float:
        from hydra.core.hydra_config import HydraConfig

        try:
            return task(cfg)
        except Interrupted as exc:  # SIGTERM or Ctrl-C: stop (a sweep too), with the shell's status for it
            exit_with(str(exc), exc.exit_code)
        except tracking.StoreUnavailable as exc:  # no job of a sweep could be tracked either: stop
            exit_with(str(exc))
        except Exception as exc:
            if HydraConfig.get().mode.name == "MULTIRUN":
                log.error("job %s failed, the sweep goes on: %s", HydraConfig.get().job.num, exc)
                if not isinstance(exc, RunFailed):  # its run is recorded already
                    lineage.record_failed_run(to_container(cfg.tracking), str(cfg.model.get("name")), exc)
                return math.nan
            error = exc.__cause__ if isinstance(exc, RunFailed) and exc.__cause__ else exc
            if isinstance(error, (CnnlabError, MisconfigurationException)):  # both say what to fix
                exit_with(str(error).strip().splitlines()[0])
            raise

    return wrapped


def objective(cfg: DictConfig) -> float:
    """Train; return the metric named by `optimized_metric`, the value a sweeper optimises."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("seeds", 1) != 1 and HydraConfig.get().mode.name != "MULTIRUN":
        raise CnnlabError(f"config seeds: seeds={cfg.seeds} repeats the jobs of a sweep, and this is one run: add -m "
                          f"(or choose the seed with seed=N; DVC: dvc exp run --queue -S 'seed=1,2,3')")
    metrics = train(cfg)
    if cfg.optimized_metric not in metrics:
        raise RunFailed(f"config optimized_metric: this run has no metric {cfg.optimized_metric!r}; "
                        f"it has {', '.join(sorted(k for k in metrics if '/' in k))}",
                        metrics.get("mlflow_run_id"))  # the run itself trained and finished
    return metrics[cfg.optimized_metric]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: train in the Hydra run (or sweep job) folder."""
    from hydra.core.hydra_config import HydraConfig

    cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    return failure_policy(objective)(cfg)


def check_group_choices(argv: list[str]) -> None:
    """A config-group option that conf/ does not have (`callbacks=[default,earlystopping]`) is one
    line listing the options, before Hydra composes anything: Hydra lists them for a single
    choice, but for a list it only says "Could not load 'callbacks/earlystopping'"."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        folder = CONF_DIR / key
        if not sep or "." in key or "(" in value or not folder.is_dir():  # not a group, or a sweep function
            continue
        options = sorted(path.stem for path in folder.glob("*.yaml"))
        unknown = [c for c in re.split(r"[\[\],\s]+", value) if c and c != "null" and c not in options]
        if unknown:
            exit_with(f"{arg}: conf/{key}/ has no {', '.join(unknown)} (options: {', '.join(options)})")


if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    main()
