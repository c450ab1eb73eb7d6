"""Every place cnnlab relies on a library's private or undocumented parts, gathered in one module.

Each touch has a fast test in tests/test_internals.py, so an upgrade that changes one fails there,
by name, not in a user's training. pyproject.toml bounds these libraries to the versions tested
(upper bounds), constraints.txt pins the versions the suite last passed with (`make lock`).
Imports happen inside each function: importing this module costs nothing.

  torch       torch.ops.mkldnn._is_mkldnn_bf16_supported        bf16_native_on_cpu
  Lightning   the fit loop's batch counter                      batches_done_this_epoch
              MLFlowLogger's private run state (_run_id, ...)   MLFLOW_LOGGER_STATE (cnnlab.tracking.logger)
              tqdm_progress.convert_inf                         convert_inf
              the params MLFlowLogger sends (_flatten_dict...)  lightning_params
  Hydra       hydra._internal's BasicSweeper                    basic_sweeper (src/hydra_plugins/cnnlab_sweeper)
  MLflow      Dataset._to_mlflow_entity                         dataset_entity
              mlflow.system_metrics' SystemMetricsMonitor       system_metrics_monitor
              the HTTP client's error text with the status      HTTP_STATUS_TEXT (cnnlab.tracking.store.failure_reason)
"""

from __future__ import annotations

# Attributes of Lightning's MLFlowLogger that cnnlab's subclass reads and sets: whether the run is
# open, its id, its experiment's id and the store (no public setters: a resumed run is reopened by id).
MLFLOW_LOGGER_STATE = ("_initialized", "_run_id", "_experiment_id", "_tracking_uri")

# How MLflow's REST client words an HTTP error after its retries (mlflow/utils/rest_utils.py); the
# group is the status code.
HTTP_STATUS_TEXT = r"failed with error code (\d+)"


def bf16_native_on_cpu() -> bool:
    """Whether oneDNN computes bf16 in hardware on this CPU (AVX512-BF16, AMX). Private in torch, and
    the only answer that follows ONEDNN_MAX_CPU_ISA (a bf16 CPU told to behave as AVX2 says no)."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def batches_done_this_epoch(trainer) -> int:
    """How many batches of the current training epoch Lightning has processed; 0 outside training and
    at the epoch's end. `processed`, not `completed`: a checkpoint written in on_train_batch_end
    comes before Lightning counts that batch as completed, but it has been trained on."""
    if trainer is None or not trainer.training:
        return 0
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return done if done < trainer.num_training_batches else 0


def convert_inf(value):
    """Lightning's tqdm bars take None for an unknown total, not inf (its own bar's helper)."""
    from pytorch_lightning.callbacks.progress.tqdm_progress import convert_inf as lightning_convert_inf

    return lightning_convert_inf(value)


def basic_sweeper():
    """Hydra's BasicSweeper class (grids from `a,b` overrides), which cnnlab's seed sweeper extends:
    Hydra keeps its core plugins in hydra._internal."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper


def dataset_entity(dataset):
    """The MLflow entity of an mlflow.data Dataset, for MlflowClient.log_inputs (MLflow's fluent
    log_input makes it the same way; the client has no public route from a Dataset)."""
    return dataset._to_mlflow_entity()


def system_metrics_monitor(run_id: str, interval_s: float, resume: bool, uri: str):
    """MLflow's system-metrics sampler for a run opened through the client (Lightning's logger):
    MLflow starts it only for fluent runs (mlflow.start_run(log_system_metrics=True))."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    return SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=uri)


def lightning_params(params) -> dict[str, str]:
    """Params as Lightning's MLFlowLogger.log_hyperparams sends them (a backlog keeps them so, to send
    later): a dict or Namespace, nested keys joined by "/", values as text cut at 250 characters.
    Its private helpers, so the two never differ."""
    from lightning_fabric.utilities.logger import _convert_params, _flatten_dict

    return {key: str(value)[:250] for key, value in _flatten_dict(_convert_params(params)).items()}
