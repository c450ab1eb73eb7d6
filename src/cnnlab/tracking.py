"""MLflow: where runs go, what every run carries, the Lightning logger, and sweep parent runs.

One training run = one MLflow run, opened by `MLflowLogger` (Lightning's MLFlowLogger, see
conf/logger/mlflow.yaml). A Hydra multirun opens one parent run (SweepParentRunCallback) and every
job nests under it. The default store is sqlite:///<project>/mlflow.db with artifacts in
<project>/mlartifacts, so runs from DVC's temporary experiment copies land in the project's store.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, RunTag
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from pytorch_lightning.loggers import MLFlowLogger

from cnnlab import keys
from cnnlab.config import project_root
from cnnlab.errors import CnnlabError, one_line
from cnnlab.files import write_atomic

log = logging.getLogger(__name__)
PARENT_RUN_FILE = "mlflow_parent_run.json"
BACKLOG_FILE = "mlflow_backlog.json"      # beside the run pointer: what a vanished store never received


def tracking_uri(cfg_uri: str | None = None) -> str:
    """Config key, else $MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def retry(fn, *args, attempts: int = 8, **kwargs):
    """Call an MLflow store function, retrying while SQLite reports a concurrent writer.

    SQLite serialises writers; with several sweep jobs logging at once a write can exceed the
    driver's busy timeout. MLflow has no retry for this, so back off and try again.
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MlflowException wraps sqlalchemy.exc.OperationalError
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)


def http_settings(timeout_s: int, max_retries: int) -> None:
    """How long MLflow's HTTP client waits for a tracking server (per request) and how often it
    retries. MLflow reads these variables at each request; its defaults (120 s, 7 retries with
    backoff) wait minutes on a server that is gone, which is what cnnlab must not do."""
    os.environ[MLFLOW_HTTP_REQUEST_TIMEOUT.name] = str(int(timeout_s))
    os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = str(int(max_retries))
    os.environ[MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name] = "1"  # waits 1, 2, 4 s between retries


@contextmanager
def mlflow_env(**settings: str):
    """MLflow settings that are environment variables (read at each use), for one block only."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name` in the store at `uri`, created if needed: the first contact
    with the store, so a store that cannot be used fails here, in one line naming it."""
    try:
        # The start-up check asks once: an unreachable store is reported in about one timeout.
        with mlflow_env(**{MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0"}):
            return _ensure_experiment(uri, name)
    except CnnlabError:
        raise
    except Exception as exc:  # MlflowException (HTTP, SQLAlchemy), OSError, requests' errors
        raise StoreUnavailable(f"tracking store {uri} cannot be used ({_reason(exc)}): start or fix it (tracking.uri, "
                          f"$MLFLOW_TRACKING_URI), or train without tracking with logger=none") from None


class StoreUnavailable(CnnlabError):
    """The tracking store cannot be reached or written: nothing can be tracked, so nothing starts."""


def _reason(exc: BaseException) -> str:
    """The useful part of an MLflow error: its cause's first line, without MLflow's retry chatter."""
    text = one_line(exc.__cause__ or exc)
    for marker in ("Connection refused", "Read timed out", "Name or service not known", "unable to open database file",
                   "attempt to write a readonly database", "Max retries exceeded"):
        if marker in text:
            return marker.lower()
    return text[:200]


def _ensure_experiment(uri: str, name: str) -> str:
    default_store = uri == f"sqlite:///{project_root() / 'mlflow.db'}"
    # The first use of a new SQLite store creates its tables; two processes doing that at once
    # collide, so creation is serialised with a lock file beside the database.
    sqlite = uri.startswith("sqlite:///")
    with FileLock(uri.removeprefix("sqlite:///") + ".lock") if sqlite else nullcontext():
        client = MlflowClient(uri)  # MLflow creates a new store's tables as soon as a client opens it
        experiment = retry(client.get_experiment_by_name, name)
    if experiment is None:
        # Artifacts next to the SQLite file, not in ./mlruns of whatever folder a run starts in.
        location = (project_root() / "mlartifacts").as_uri() if default_store else None
        try:
            retry(client.create_experiment, name, artifact_location=location)
        except Exception:  # another process created it first
            pass
        experiment = retry(client.get_experiment_by_name, name)
        if experiment is None:
            raise RuntimeError(f"could not create MLflow experiment {name!r} in {uri}")
    return experiment.experiment_id


def ui_path(experiment_id: str, run_id: str | None = None) -> str:
    """MLflow UI link path; `workflowType=machine_learning` skips MLflow 3's default GenAI view."""
    return f"#/experiments/{experiment_id}/runs{'/' + run_id if run_id else ''}?workflowType=machine_learning"


def git_info(root: Path | None = None) -> dict[str, str]:
    root = root or project_root()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {keys.GIT_COMMIT: "unknown", keys.GIT_DIRTY: "unknown"}
    return {keys.GIT_COMMIT: commit, keys.GIT_DIRTY: str(dirty).lower()}


def _hydra():
    """The current Hydra job's config, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def run_tags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    """What every run records to be rerun: git commit and dirty flag, Hydra overrides, the DVC
    experiment it belongs to, and the parent run when it is a sweep job."""
    hydra = _hydra()
    overrides = list(hydra.overrides.task) if hydra else []
    tags = {**git_info(), keys.OVERRIDES: " ".join(overrides) or "(none)"}
    dvc = (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"), ("DVC_STAGE", "dvc.stage"))
    for env, tag in dvc:
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    parent = sweep_parent_run_id()
    if parent:
        tags[keys.PARENT_RUN] = parent
    tags.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    return tags


def write_run_pointer(path: str | Path, run_id: str, experiment_id: str, uri: str) -> None:
    """Record which MLflow run trained a model, so evaluation logs into that same run."""
    pointer = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}
    write_atomic(path, json.dumps(pointer, indent=2) + "\n")


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, plus what a cnnlab run needs: the project's default store, the
    run's tags (git, overrides, DVC experiment, sweep parent), retries while SQLite is busy, and a
    pointer file naming the run beside the checkpoint. Lightning marks the run FINISHED or FAILED."""

    def __init__(self, experiment_name: str, run_name: str, uri: str | None = None,
                 run_pointer: str | None = None, tags: dict[str, Any] | None = None,
                 timeout_s: int = 10, max_retries: int = 3):
        uri = tracking_uri(uri)
        http_settings(timeout_s, max_retries)
        experiment_id = ensure_experiment(uri, experiment_name)
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri,
                         tags=run_tags({keys.ROLE: keys.ROLE_TRAIN, **(tags or {})}))
        self._experiment_id = experiment_id
        self.run_pointer = run_pointer
        self._continued = self._interrupted = False
        self._logged_up_to: dict[str, int] = {}  # continued run: last step of each metric already logged
        self._pending: list[tuple[dict, Any]] = []  # writes waiting for the store (see send)
        self._retry_at, self._store_error = 0.0, ""

    @property
    def experiment(self) -> MlflowClient:
        opening = not self._initialized
        if opening:  # the store's other runs from this machine whose process died: KILLED, not RUNNING forever
            close_orphaned_runs(MlflowClient(self._tracking_uri), [self._experiment_id])
        client = retry(lambda: MLFlowLogger.experiment.fget(self))
        if opening and self._run_id:
            if self._continued:
                retry(client.update_run, self._run_id, status="RUNNING")
                run = client.get_run(self._run_id)
                if keys.ERROR in run.data.tags:  # e.g. closed as orphaned meanwhile
                    retry(client.delete_tag, self._run_id, keys.ERROR)
                # The killed attempt may have logged an epoch after its last checkpoint; the resumed
                # attempt trains that epoch again, and its points must not appear twice.
                self._logged_up_to = {key: max(m.step for m in client.get_metric_history(self._run_id, key))
                                      for key in run.data.metrics}
                # The run now belongs to this attempt: its git commit and overrides, and in a re-run
                # sweep the new sweep's parent run (which then shows every job).
                tags = {**self.tags, keys.RESUMES: str(int(run.data.tags.get(keys.RESUMES, "0")) + 1)}
            else:
                tags = {}
            tags.update(process_tags())
            retry(client.log_batch, self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            if self.run_pointer:
                write_run_pointer(self.run_pointer, self._run_id, self._experiment_id, self._tracking_uri)
        return client

    @property
    def opened(self) -> bool:
        """Has the MLflow run been created yet (it is, lazily, on first use)?"""
        return self._initialized

    def log_hyperparams(self, params) -> None:
        self.send({"kind": "params", "count": len(params)}, super().log_hyperparams, params)

    def log_metrics(self, metrics, step=None) -> None:
        if self._logged_up_to and step is not None:  # a continued run: what the killed attempt logged stays
            metrics = {k: v for k, v in metrics.items() if step > self._logged_up_to.get(k, -1)}
        if metrics:  # stamped now, sent now or later (see send)
            stamp, step = int(time.time() * 1000), step or 0
            points = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
            self.send({"kind": "metrics", "points": [[m.key, m.value, m.step, m.timestamp] for m in points]},
                      lambda: self.experiment.log_batch(self.run_id, metrics=points))

    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return  # no run was opened: nothing to close (and none to open now)
        self._retry_at = 0.0  # one more try for whatever is waiting
        self._send_pending()
        status = "KILLED" if self._interrupted and status == "failed" else status
        self.send({"kind": "status", "status": status}, super().finalize, status)
        if self._pending:
            self._write_backlog()

    # --- a store that goes away mid-training ---

    def send(self, what: dict, write, *args, **kwargs) -> None:
        """One write to the open run. If the store does not answer, the training goes on: the write
        waits in a backlog and is tried again, in order, with the next write after RETRY_S seconds
        (so a dead server costs one timeout per RETRY_S, not one per step); what is still waiting
        when the run ends is listed in models/mlflow_backlog.json. `what` describes it for that file."""
        if not self._initialized:
            retry(lambda: self.experiment)  # opening the run: a failure here is the caller's to see
        self._pending.append((what, lambda: retry(write, *args, **kwargs)))
        self._send_pending()

    RETRY_S = 30.0

    def _send_pending(self) -> None:
        if time.monotonic() < self._retry_at:
            return
        while self._pending:
            what, write = self._pending[0]
            try:
                write()
            except Exception as exc:  # HTTP errors and timeouts, a vanished SQLite file...
                if not self._retry_at:
                    log.warning("tracking store %s stopped answering (%s): training goes on, and what cannot be "
                                "logged waits to be sent", self._tracking_uri, _reason(exc))
                self._retry_at, self._store_error = time.monotonic() + self.RETRY_S, _reason(exc)
                return
            self._pending.pop(0)
        if self._retry_at:
            log.warning("tracking store %s answers again: everything waiting was logged", self._tracking_uri)
            self._retry_at = 0.0

    def _write_backlog(self) -> None:
        backlog = {"tracking_uri": self._tracking_uri, "run_id": self._run_id, "error": self._store_error,
                   "not_logged": [what for what, _ in self._pending]}
        points = sum(len(w.get("points", [])) for w, _ in self._pending)
        where = Path(self.run_pointer).with_name(BACKLOG_FILE) if self.run_pointer else None
        if where:
            write_atomic(where, json.dumps(backlog, indent=2) + "\n")
        log.error("tracking store %s did not answer (%s): %d metric points and %d other writes of run %s were not "
                  "logged%s; the checkpoint and metrics files are complete", self._tracking_uri, self._store_error,
                  points, len(self._pending) - sum(1 for w, _ in self._pending if w["kind"] == "metrics"),
                  self._run_id, f" (listed in {where})" if where else "")

    # --- resuming (cnnlab.resume, cnnlab.checkpoints) ---

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
                  lambda: self.experiment.log_artifact(self.run_id, str(path), folder))

    def log_figure(self, figure, artifact_file: str) -> None:
        self.send({"kind": "artifact", "path": artifact_file},
                  lambda: self.experiment.log_figure(self.run_id, figure, artifact_file))

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.send({"kind": "artifact", "path": artifact_file},
                  lambda: self.experiment.log_dict(self.run_id, data, artifact_file))

    def ui_link(self) -> str:
        return f"{self._tracking_uri} (UI: {ui_path(self._experiment_id, self.run_id)})"


def mlflow_loggers(trainer) -> list[MLflowLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, MLflowLogger)]


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), or None if it
    is gone: with the pid, it names one process, never a later one that reuses the number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Which process is writing a run, so a run whose process died can be told from a live one."""
    return {keys.HOST: socket.gethostname(), keys.PROCESS: f"{os.getpid()}:{_process_start(os.getpid())}"}


def close_orphaned_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """Mark KILLED the RUNNING runs whose training process on this machine is gone (a SIGKILL, a
    power cut leaves them RUNNING forever); return their ids. Runs from other machines cannot be
    checked from here and are left alone. A rerun of the same command resumes such a run anyway."""
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`{keys.HOST}` = '{host}'"
    closed = []
    for run in client.search_runs(experiment_ids, query, max_results=1000):
        pid, _, start = run.data.tags.get(keys.PROCESS, "").partition(":")
        if not pid.isdigit() or _process_start(int(pid)) == start:
            continue  # alive (or not written by cnnlab)
        retry(client.set_tag, run.info.run_id, keys.ERROR,
              f"its training process ({pid} on {host}) ended without closing the run (killed?)")
        retry(client.set_terminated, run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


def sweep_parent_run_id() -> str | None:
    """Parent run of the current multirun job, written by SweepParentRunCallback."""
    hydra = _hydra()
    if hydra is None or hydra.mode is None or hydra.mode.name != "MULTIRUN":
        return None
    pointer = Path(hydra.sweep.dir) / PARENT_RUN_FILE
    return json.loads(pointer.read_text())["run_id"] if pointer.is_file() else None


def record_failed_run(tracking: dict, run_name: str, error: BaseException) -> str:
    """An MLflow run marked FAILED for a sweep job that died before its run was opened
    (a bad value in the sweep, data that would not fetch), so the sweep shows every job."""
    uri = tracking_uri(tracking.get("uri"))
    experiment_id = ensure_experiment(uri, tracking.get("experiment_name") or "cnnlab")
    tags = run_tags({keys.ROLE: keys.ROLE_TRAIN, keys.ERROR: one_line(error)[:5000], keys.MODEL_NAME: run_name})
    client = MlflowClient(uri)
    run = retry(client.create_run, experiment_id, run_name=run_name or "failed", tags=tags)
    retry(client.set_terminated, run.info.run_id, "FAILED")
    return run.info.run_id


class SweepParentRunCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun, recording the sweep's overrides.

    Jobs may run in other processes (joblib launcher), so the parent's id is handed over through a
    file in the sweep folder rather than through MLflow's in-process active-run stack.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        uri = tracking_uri(config.tracking.get("uri"))
        http_settings(config.tracking.get("timeout_s", 10), config.tracking.get("max_retries", 3))
        experiment_id = ensure_experiment(uri, config.tracking.experiment_name)
        overrides = list(config.hydra.overrides.task)
        # Name the sweep by what varies: sweeper params from config (experiment files, Optuna's
        # search space) and comma/range overrides from the command line.
        named = [o for o in overrides if o.startswith(("experiment=", "hparams_search="))]
        swept = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        swept += [o for o in overrides if "," in o or "(" in o]
        name = " ".join(["sweep", *named, *swept])[:250]
        client = MlflowClient(uri)
        parent = retry(client.create_run, experiment_id, run_name=name, tags={
            **git_info(), **process_tags(), keys.ROLE: keys.ROLE_SWEEP, keys.OVERRIDES: " ".join(overrides) or "(none)",
            "hydra.sweeper": config.hydra.sweeper._target_, "hydra.launcher": config.hydra.launcher._target_,
        })
        write_run_pointer(Path(config.hydra.sweep.dir) / PARENT_RUN_FILE, parent.info.run_id, experiment_id, uri)
        log.info("MLflow sweep parent run %s (%s)", parent.info.run_id, uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        pointer = Path(config.hydra.sweep.dir) / PARENT_RUN_FILE
        if not pointer.is_file():
            return
        info = json.loads(pointer.read_text())
        client = MlflowClient(info["tracking_uri"])
        children = client.search_runs([info["experiment_id"]], f"tags.`{keys.PARENT_RUN}` = '{info['run_id']}'")
        failed = [r for r in children if r.info.status == "FAILED"]
        retry(client.set_tag, info["run_id"], keys.CHILDREN, str(len(children)))
        retry(client.set_tag, info["run_id"], keys.FAILED_CHILDREN, str(len(failed)))
        all_failed = children and len(failed) == len(children)
        retry(client.set_terminated, info["run_id"], "FAILED" if all_failed else "FINISHED")
