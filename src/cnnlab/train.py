"""Training: `cnnlab train [overrides]` or `python -m cnnlab.train [overrides]` (a Hydra app over
conf/; `-m` sweeps), and the DVC `train` stage. Outputs in paths.output_dir (fixed names, so DVC
can track them; see cnnlab.keys):
  models/model.ckpt        best checkpoint by validation accuracy (callbacks.model_checkpoint)
  models/mlflow_run.json   the MLflow run this model belongs to (logger.mlflow)
  metrics/curves.csv       one row per epoch (callbacks.epoch_curves)
  metrics/train.json       the run's metrics: test metrics and what the callbacks measured
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from cnnlab import keys, runtime, tracking
from cnnlab.callbacks import RunRecord
from cnnlab.config import CONF_DIR, instantiate, instantiate_all, load, to_container
from cnnlab.data import IDXDataModule
from cnnlab.errors import CnnlabError
from cnnlab.files import write_atomic
from cnnlab.heads import build_head
from cnnlab.module import Classifier
from cnnlab.network import build_network

log = logging.getLogger(__name__)


def train(cfg: DictConfig | dict) -> dict:
    """Build data, model, callbacks, loggers and trainer from config; fit; test; return the metrics."""
    config = load(cfg)  # every knob is checked before any work starts
    runtime.apply(config.runtime)
    # In-memory tensors need no worker processes; Lightning's advice to add some does not apply.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # models/ also holds the run pointer (mlflow_run.json), written when the MLflow run opens.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    pl.seed_everything(config.seed, workers=True, verbose=False)

    datamodule = IDXDataModule(config.data, config.paths.data_dir, seed=config.seed,
                               channels_last=config.runtime.channels_last, fetch_timeout_s=config.fetch.timeout_s)
    head = build_head(config.model, config.data.num_classes)
    net = build_network(config.model, config.data.channels, config.data.image_size, head.num_outputs)
    resolved = config.as_dict()
    model = Classifier(net, head, optimizer=instantiate("optimizer", config.optimizer),
                       scheduler=instantiate("scheduler", config.scheduler) if config.scheduler else None,
                       architecture={"model": resolved["model"], "input_shape": list(datamodule.input_shape),
                                     "num_labels": config.data.num_classes})
    if config.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    callbacks = [RunRecord(resolved), *instantiate_all("callbacks", config.callbacks)]
    if config.runtime.num_threads == "auto":
        callbacks.append(runtime.AdaptiveThreads())
    trainer: pl.Trainer = instantiate("trainer", config.trainer, callbacks=callbacks,
                                      logger=instantiate_all("logger", config.logger) or False)

    trainer.fit(model, datamodule=datamodule)
    if not trainer.checkpoint_callback.best_model_path:
        raise CnnlabError("training produced no checkpoint (did validation run? check trainer.limit_val_batches)")
    test = trainer.test(model, datamodule=datamodule, ckpt_path="best", verbose=False)[0]

    metrics = {k: float(v) for k, v in test.items()}
    for callback in callbacks:
        metrics.update(getattr(callback, "summary", {}))
    runs = [lg.run_id for lg in tracking.mlflow_loggers(trainer)]
    record = {**metrics, "device": str(trainer.strategy.root_device), "mlflow_run_id": runs[0] if runs else None}
    write_atomic(Path(config.paths.output_dir) / keys.TRAIN_METRICS, json.dumps(record, indent=2) + "\n")
    log.info("test accuracy %.4f; %s", metrics[keys.TEST_ACC],
             "; ".join(f"MLflow run {lg.run_id} in {lg.ui_link()}" for lg in tracking.mlflow_loggers(trainer)))
    return record


def failure_policy(task):
    """What happens when a training fails, in one place.

    A run that was already open is marked FAILED by Lightning, with its error (RunRecord). In a
    sweep, a failing job is logged (an MLflow run marked FAILED under the sweep's parent, if none
    was open yet) and scores NaN so the sweep goes on. A single run exits with status 1 and one
    `error:` line for a problem the user can fix; anything else keeps its traceback.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> float:
        from hydra.core.hydra_config import HydraConfig

        try:
            return task(cfg)
        except Exception as exc:
            if HydraConfig.get().mode.name == "MULTIRUN":
                log.error("job %s failed, the sweep goes on: %s", HydraConfig.get().job.num, exc)
                if not getattr(exc, "mlflow_run_id", None):
                    tracking.record_failed_run(to_container(cfg.tracking), str(cfg.model.get("name")), exc)
                return math.nan
            if isinstance(exc, (CnnlabError, MisconfigurationException)):  # both say what to fix
                print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
                sys.exit(1)
            raise

    return wrapped


def objective(cfg: DictConfig) -> float:
    """Train; return the metric named by `optimized_metric`, the value a sweeper optimises."""
    metrics = train(cfg)
    if cfg.optimized_metric not in metrics:
        error = CnnlabError(f"config optimized_metric: this run has no metric {cfg.optimized_metric!r}; "
                            f"it has {', '.join(sorted(k for k in metrics if '/' in k))}")
        error.mlflow_run_id = metrics.get("mlflow_run_id")  # the run itself trained and finished
        raise error
    return metrics[cfg.optimized_metric]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: train in the Hydra run (or sweep job) folder."""
    from hydra.core.hydra_config import HydraConfig

    cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    return failure_policy(objective)(cfg)


if __name__ == "__main__":
    main()
