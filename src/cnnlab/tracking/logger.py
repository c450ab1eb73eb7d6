"""The Lightning logger of every cnnlab run: Lightning's MLFlowLogger with the project's store, the
run's tags and pointer file, and a Backlog (cnnlab.tracking.backlog), so that a store going away
mid-training costs no training. The one module of the tracking wing that imports Lightning."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from mlflow.entities import RunTag
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from cnnlab.core import keys
from cnnlab.core.errors import one_line
from cnnlab.core.internals import dataset_entity, lightning_params, system_metrics_monitor
from cnnlab.tracking import sync
from cnnlab.tracking.backlog import BACKLOG_FILE, Backlog
from cnnlab.tracking.lineage import process_tags, run_tags, write_run_pointer
from cnnlab.tracking.store import (
    HTTP_TIMEOUT_VAR,
    StoreClient,
    ensure_experiment,
    failure_kind,
    http_settings,
    store_call,
    tracking_uri,
    ui_path,
    unusable_store,
)

log = logging.getLogger(__name__)


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, plus what a cnnlab run needs: the project's default store, the
    run's tags (git, overrides, DVC experiment, sweep parent), retries while SQLite is busy, and a
    pointer file naming the run beside the checkpoint. Lightning marks the run FINISHED or FAILED.

    Building it asks the store once (ensure_experiment): one that cannot be used stops the run
    before any work. Every write afterwards goes through `send` and a Backlog: a store that goes
    away mid-training costs no training, and what it never took is listed in models/mlflow_backlog.json.
    """

    def __init__(self, experiment_name: str, run_name: str, uri: str | None = None,
                 run_pointer: str | None = None, tags: dict[str, Any] | None = None,
                 timeout_s: int = 10, max_retries: int = 3, system_metrics_interval_s: float | None = 10):
        uri = tracking_uri(uri)
        http_settings(timeout_s, max_retries)
        experiment_id = ensure_experiment(uri, experiment_name)
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri,
                         tags=run_tags({keys.ROLE: keys.ROLE_TRAIN, **(tags or {})}))
        self._experiment_id = experiment_id
        self._store_client: StoreClient | None = None  # Lightning's client, retried
        self.run_pointer = run_pointer
        self._continued = self._interrupted = False
        self._logged_up_to: dict[str, int] = {}  # continued run: last step of each metric already logged
        self.backlog = Backlog(uri)  # what the store did not take yet (a server gone mid-training)
        self.system_metrics_interval_s = system_metrics_interval_s
        self._system_metrics = None  # MLflow's SystemMetricsMonitor, while the run trains

    @property
    @rank_zero_experiment  # in distributed training only global rank 0 opens and writes the run
    def experiment(self) -> StoreClient:
        """The run's client (opening the run on first use), every call of which is retried (StoreClient)."""
        opening = not self._initialized
        if opening:  # the store's other runs from this machine whose process died: KILLED, not RUNNING forever
            sync.close_orphaned_runs(StoreClient(self._tracking_uri), [self._experiment_id])
        # Lightning's getter opens the run with a client of its own: retried as a whole.
        raw = store_call(lambda: MLFlowLogger.experiment.fget(self))
        if self._store_client is None or self._store_client.mlflow is not raw:
            self._store_client = StoreClient.wrap(raw)
        client = self._store_client
        if opening and self._run_id:
            if self._continued:
                run = client.get_run(self._run_id)
                client.update_run(self._run_id, status="RUNNING")
                if keys.ERROR in run.data.tags:  # e.g. closed as orphaned meanwhile
                    client.delete_tag(self._run_id, keys.ERROR)
                # A run that goes on (and then finishes) is interrupted no more: what stopped each
                # earlier attempt stays as history, in cnnlab.resumed_after.
                if keys.INTERRUPTED in run.data.tags:
                    client.delete_tag(self._run_id, keys.INTERRUPTED)
                stopped = run.data.tags.get(keys.INTERRUPTED) or (
                    "FAILED" if run.info.status == "FAILED" else "process died")  # SIGKILL, power cut, OOM killer
                history = ", ".join(filter(None, (run.data.tags.get(keys.RESUMED_AFTER), stopped)))
                # The killed attempt may have logged an epoch after its last checkpoint; the resumed
                # attempt trains that epoch again, and its points must not appear twice.
                self._logged_up_to = {key: max(m.step for m in client.get_metric_history(self._run_id, key))
                                      for key in run.data.metrics}
                # The run now belongs to this attempt: its git commit and overrides, and in a re-run
                # sweep the new sweep's parent run (which then shows every job).
                tags = {**self.tags, keys.RESUMES: str(int(run.data.tags.get(keys.RESUMES, "0")) + 1),
                        keys.RESUMED_AFTER: history}
            else:
                tags = {}
            tags.update(process_tags())
            client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            if self.run_pointer:
                write_run_pointer(self.run_pointer, self._run_id, self._experiment_id, self._tracking_uri)
            self._start_system_metrics()
        return client

    def _start_system_metrics(self) -> None:
        """MLflow's own system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes,
        disk, network, and GPU utilisation and memory where pynvml finds one), sampled every
        tracking.system_metrics_interval_s in a background thread. Lightning's logger opens runs with
        the client, so MLflow's `log_system_metrics` switch (fluent runs only) never starts it."""
        if not self.system_metrics_interval_s or self._system_metrics is not None:
            return
        try:
            self._system_metrics = system_metrics_monitor(self._run_id, self.system_metrics_interval_s,
                                                          self._continued, self._tracking_uri)
            self._system_metrics.start()
        except Exception as exc:  # e.g. psutil missing: the training matters more than these curves
            log.warning("system metrics are not recorded: %s", one_line(exc))
            self._system_metrics = None

    def _stop_system_metrics(self) -> None:
        """Stop the monitor; its last write waits at most one tracking timeout (a server that went away
        must not hold up the end of a training: these are the only writes that bypass the Backlog)."""
        monitor, self._system_metrics = self._system_metrics, None
        if monitor is not None:
            import threading

            stopper = threading.Thread(target=monitor.finish, daemon=True, name="stop-system-metrics")
            stopper.start()
            stopper.join(timeout=float(os.environ.get(HTTP_TIMEOUT_VAR) or 10))

    @property
    def opened(self) -> bool:
        """Has the MLflow run been created yet (it is, lazily, on first use)?"""
        return self._initialized

    def log_hyperparams(self, params) -> None:
        self.send({"kind": "params", "params": lightning_params(params)}, super().log_hyperparams, params)

    def log_metrics(self, metrics, step=None) -> None:
        if self._logged_up_to and step is not None:  # a continued run: what the killed attempt logged stays
            metrics = {k: v for k, v in metrics.items() if step > self._logged_up_to.get(k, -1)}
        if metrics:
            points, entry = Backlog.points(metrics, step or 0)
            self.send(entry, lambda: self.experiment.log_batch(self.run_id, metrics=points))

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return  # no run was opened: nothing to close (and none to open now)
        self._stop_system_metrics()
        status = "KILLED" if self._interrupted and status == "failed" else status
        # The end of the run (Lightning calls this after fit and after test): one more try for
        # whatever waits, then the list of what the store never took.
        entry = {"kind": "status", "status": {"success": "FINISHED", "failed": "FAILED"}.get(status, status),
                 "end_time": int(time.time() * 1000)}  # sent later, the run still ends when it ended
        self.backlog.send(entry, lambda: store_call(super(MLflowLogger, self).finalize, status), now=True)
        self.backlog.save(Path(self.run_pointer).with_name(BACKLOG_FILE) if self.run_pointer else None, self._run_id)

    @rank_zero_only
    def send(self, what: dict, write, *args, spool=None, **kwargs) -> None:
        """One write to the run, `write(*args, **kwargs)`, through the backlog: if the store does not
        take it, the training goes on (see Backlog). `what` describes it in the backlog file, and
        `spool(folder)` writes an artifact's files there for `cnnlab sync`.
        Every write goes through here, so in distributed training this (with `experiment` and
        `finalize`) is where the processes other than global rank 0 are kept from writing."""
        if not self._initialized:  # the run opens with its first write: a store gone by then fails the run
            try:
                self.experiment  # noqa: B018 - opens the run; each of its store calls is retried
            except Exception as exc:
                if failure_kind(exc) in ("down", "failed"):
                    raise unusable_store(self._tracking_uri, exc) from None
                raise
        self.backlog.send(what, lambda: store_call(write, *args, **kwargs), spool=spool)

    # --- resuming (cnnlab.training.resume, cnnlab.training.checkpoints) ---

    def continue_run(self, pointer: dict | None) -> None:
        """Log into the run an interrupted attempt at this training opened (its run pointer), when it is
        in this store; it goes back to RUNNING when it opens."""
        if pointer and pointer.get("run_id") and pointer.get("tracking_uri") == self._tracking_uri:
            self._run_id, self._continued = pointer["run_id"], True
        elif pointer:
            log.warning("the interrupted run %s is in another store (%s): starting a new run",
                        pointer.get("run_id"), pointer.get("tracking_uri"))

    def interrupted_by(self, signal_name: str) -> None:
        """A signal stopped the training: the run ends KILLED and says which signal."""
        self._interrupted = True
        if self.opened:
            self.set_tags({keys.INTERRUPTED: signal_name})

    def set_tags(self, tags: dict[str, Any]) -> None:
        batch = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        self.send({"kind": "tags", "tags": {t.key: t.value for t in batch}},
                  lambda: self.experiment.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: str | Path, folder: str) -> None:
        self.send({"kind": "artifact", "path": str(path), "folder": folder},
                  lambda: self.experiment.log_artifact(self.run_id, str(path), folder),
                  spool=lambda to: shutil.copy2(path, to / Path(path).name))

    def log_figure(self, figure, artifact_file: str) -> None:
        self.send({"kind": "artifact", "path": artifact_file},
                  lambda: self.experiment.log_figure(self.run_id, figure, artifact_file),
                  spool=lambda to: figure.savefig(to / Path(artifact_file).name))  # as MLflow's log_figure

    def log_datasets(self, datasets: list[tuple[Any, str]]) -> None:
        """The data the run read, as MLflow dataset inputs: (an mlflow.data Dataset, its context:
        train, validation or test), shown in the UI's Datasets column and searchable."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [DatasetInput(dataset_entity(d), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
                  for d, context in datasets]
        self.send({"kind": "datasets", "datasets": [f"{d.name} ({context})" for d, context in datasets],
                   "inputs": [{"dataset": i.dataset.to_dictionary(), "context": context}
                              for i, (_, context) in zip(inputs, datasets)]},
                  lambda: self.experiment.log_inputs(self.run_id, datasets=inputs))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.send({"kind": "artifact", "path": artifact_file},
                  lambda: self.experiment.log_text(self.run_id, text, artifact_file),
                  spool=lambda to: (to / Path(artifact_file).name).write_text(text))

    def log_dict(self, data: dict, artifact_file: str) -> None:
        def spool(to: Path) -> None:  # as MLflow's log_dict writes it: YAML for .yaml/.yml, else JSON
            if Path(artifact_file).suffix in (".yaml", ".yml"):
                import yaml

                (to / Path(artifact_file).name).write_text(yaml.safe_dump(data, default_flow_style=False))
            else:
                (to / Path(artifact_file).name).write_text(json.dumps(data, indent=2))

        self.send({"kind": "artifact", "path": artifact_file},
                  lambda: self.experiment.log_dict(self.run_id, data, artifact_file), spool=spool)

    def ui_link(self) -> str:
        return f"{self._tracking_uri} (UI: {ui_path(self._experiment_id, self.run_id)})"


def mlflow_loggers(trainer) -> list[MLflowLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, MLflowLogger)]
