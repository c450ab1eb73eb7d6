"""MLflow: where runs go, what every run carries, the Lightning logger, and sweep parent runs.

One training run = one MLflow run, opened by `MLflowLogger` (Lightning's MLFlowLogger, see
conf/logger/mlflow.yaml). A Hydra multirun opens one parent run (SweepParentRunCallback) and every
job nests under it. The default store is sqlite:///<project>/mlflow.db with artifacts in
<project>/mlartifacts, so runs from DVC's temporary experiment copies land in the project's store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, RunTag
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from cnnlab import keys, resume
from cnnlab.config import Tracking, parse, project_root, to_container
from cnnlab.errors import CnnlabError, one_line
from cnnlab.files import write_atomic
from cnnlab.repeats import is_configuration, override_key, sweep_problem

log = logging.getLogger(__name__)
PARENT_RUN_FILE = "mlflow_parent_run.json"
BACKLOG_FILE = "mlflow_backlog.json"      # beside the run pointer: what a vanished store never received


def tracking_uri(cfg_uri: str | None = None) -> str:
    """Config key, else $MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


STORE_HINT = "run from the cnnlab project, pass --tracking-uri, or set MLFLOW_TRACKING_URI"


def existing_store(uri: str | None = None) -> str:
    """The store a command that reads runs or models (compare, register, predict) uses: --tracking-uri,
    else $MLFLOW_TRACKING_URI, else the project's mlflow.db, the same resolution as training's.

    Such a command never makes a store: MLflow creates an empty database at any SQLite path it is
    given, and a command run in the wrong folder would then report "no such model" from it (and
    leave it there). Outside a cnnlab project (no dvc.yaml in this folder or above), there is no
    project store to default to: project_root() would be the current folder, so it is an error too.
    """
    resolved = tracking_uri(uri)
    if not (uri or os.environ.get("MLFLOW_TRACKING_URI") or (project_root() / "dvc.yaml").is_file()):
        raise CnnlabError(f"{Path.cwd()} is not inside a cnnlab project (no dvc.yaml here or above), so there is "
                          f"no project store: {STORE_HINT}")
    if resolved.startswith("sqlite:///") and not resolved.startswith("sqlite:///:memory:"):
        path = Path(resolved.removeprefix("sqlite:///").partition("?")[0])
        if not path.is_file():
            raise CnnlabError(f"no MLflow store at {path}: {STORE_HINT}")
    return resolved


@contextmanager
def global_store(uri: str):
    """MLflow's process-wide tracking and registry URIs set to `uri` for one block. Some MLflow calls
    made through a client still read them: create_model_version resolves a `models:/<model id>`
    source with a new MlflowClient() (mlflow/store/model_registry/sqlalchemy_store.py says so in a
    TODO), which outside the project would open, and create, ./mlflow.db."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def store_client(uri: str | None = None) -> MlflowClient:
    """A client of the store that `existing_store` names, for its runs and its model registry alike
    (MLflow's registry would otherwise default to ./mlflow.db of the current folder)."""
    resolved = existing_store(uri)
    default_http_settings()  # MLflow's own would wait minutes on a dead server
    return MlflowClient(resolved, registry_uri=resolved)


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


# --- a store that cannot be used, or goes away ---------------------------------------------------
#
# MLflow's HTTP client reads its timeout and retries from the environment at every request
# (mlflow/utils/rest_utils.py); its defaults (120 s per try, 7 retries with backoff) keep a training
# waiting for many minutes on a server that is gone. cnnlab sets them from tracking.timeout_s and
# tracking.max_retries; the first contact asks once, so an unusable store is reported in about
# timeout_s, before any work; while training, a write the store does not take waits in a Backlog.

_SET_HERE: dict[str, str] = {}  # the values http_settings wrote, so that only a user's own value is warned about


def http_settings(timeout_s: int, max_retries: int) -> None:
    """Per-try timeout and retries of MLflow's HTTP client, from tracking.timeout_s and max_retries.

    The config wins over MLFLOW_HTTP_REQUEST_TIMEOUT and MLFLOW_HTTP_REQUEST_MAX_RETRIES set in the
    environment: the config is what is checked, recorded with the run and overridden per run
    (`tracking.timeout_s=60`), and the promise that an unusable store is reported in seconds and a
    dead one never stalls a training must not depend on a variable exported long ago in a shell
    profile or CI image. A different value found there is named in a warning, never replaced silently.
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR (the wait between retries) is left to the user and MLflow.
    """
    for var, key, value in ((MLFLOW_HTTP_REQUEST_TIMEOUT, "timeout_s", timeout_s),
                            (MLFLOW_HTTP_REQUEST_MAX_RETRIES, "max_retries", max_retries)):
        value, before = str(int(value)), os.environ.get(var.name)
        if before is not None and before not in (value, _SET_HERE.get(var.name)):
            log.warning("%s=%s in the environment is replaced by tracking.%s=%s (set that key instead)",
                        var.name, before, key, value)
        os.environ[var.name] = _SET_HERE[var.name] = value


def default_http_settings() -> None:
    """http_settings for commands that read no tracking config (evaluate, compare): conf/tracking's defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(Tracking)}
    http_settings(defaults["timeout_s"], defaults["max_retries"])


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


def _one_try():
    """MLflow's HTTP client without retries: the start-up check, and a store known to be away, cost
    one timeout, not (max_retries + 1) timeouts plus backoff."""
    return mlflow_env(**{MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0"})


class StoreUnavailable(CnnlabError):
    """The tracking store cannot be reached or written: nothing could be tracked, so nothing starts."""


def _causes(exc: BaseException):
    """The exception and what it was raised from or while handling (MLflow wraps requests' and
    SQLAlchemy's errors in its own)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _failure(exc: BaseException) -> str | None:
    """How a write to the store failed: "down" (no connection, no answer, a SQLite file that cannot
    be opened: try later, and not the writes behind it now), "failed" (an error the store may not
    make next time, e.g. HTTP 5xx after retries: try later), "refused" (the store answered no:
    trying again cannot help), or None (not the store's doing: a bug, raised)."""
    import requests
    import sqlalchemy.exc
    import urllib3.exceptions
    from mlflow.exceptions import MlflowException

    causes = list(_causes(exc))
    down = (requests.ConnectionError, requests.Timeout, sqlalchemy.exc.OperationalError, ConnectionError, TimeoutError)
    if any(isinstance(e, down) for e in causes) or any("database is locked" in str(e) for e in causes):
        return "down"
    if any(isinstance(e, (requests.RequestException, urllib3.exceptions.HTTPError, OSError)) for e in causes):
        return "failed"
    return "refused" if isinstance(exc, MlflowException) else None


def _reason(exc: BaseException) -> str:
    """Why the store did not take a write, in a few words: MLflow's messages repeat the URL and
    urllib3's retry chatter."""
    import requests

    causes = list(_causes(exc))
    text = " ".join(str(e) for e in causes)
    if any(isinstance(e, (requests.Timeout, TimeoutError)) for e in causes) or "timed out" in text:
        return f"no answer within {MLFLOW_HTTP_REQUEST_TIMEOUT.get()} s"
    for marker, words in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                          ("Failed to resolve", "unknown host"), ("database is locked", "database is locked"),
                          ("readonly database", "read-only database"),
                          ("unable to open database file", "unable to open the database file")):
        if marker in text:
            return words
    status = re.search(r"failed with error code (\d+)", text)
    if status and status[1] == "401":  # a server with authentication (mlflow server --app-name basic-auth)
        return "HTTP 401: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    if status:
        return f"HTTP status {status[1]}: is it an MLflow tracking server?"
    for e in causes:
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return one_line(causes[-1] if len(causes) > 1 else exc)[:200]


def unusable_store(uri: str, exc: BaseException) -> StoreUnavailable:
    """The one line saying that the store at `uri` cannot be used, why, and what to do."""
    source = "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == uri else "tracking.uri"
    fix = f"start the server or fix {source}" if uri.startswith(("http:", "https:")) else f"fix {source}"
    return StoreUnavailable(f"tracking store {uri} cannot be used ({_reason(exc)}): {fix}, "
                            f"or train without tracking with logger=none")


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name` in the store at `uri`, created if needed. This is the first
    contact with the store, asked once: a store that cannot be used fails here, in about
    tracking.timeout_s, in one line naming it, before any data or training work."""
    try:
        with _one_try():
            return _ensure_experiment(uri, name)
    except CnnlabError:
        raise
    except Exception as exc:  # MlflowException (HTTP, SQLAlchemy), OSError (the lock file), requests' errors
        raise unusable_store(uri, exc) from None


def _ensure_experiment(uri: str, name: str) -> str:
    default_store = uri == f"sqlite:///{project_root() / 'mlflow.db'}"
    # The first use of a new SQLite store creates its tables; two processes doing that at once
    # collide, so creation is serialised with a lock file beside the database. Its timeout only
    # ends a wait that could not end (a folder where no file can be made, such as /proc/self).
    sqlite = uri.startswith("sqlite:///")
    with FileLock(uri.removeprefix("sqlite:///") + ".lock", timeout=120) if sqlite else nullcontext():
        if sqlite:
            _check_sqlite(uri.removeprefix("sqlite:///").partition("?")[0])
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


def _check_sqlite(path: str) -> None:
    """Open the SQLite file and take its write lock, as MLflow will: MLflow retries a file it
    cannot open (a folder, a read-only file, not a database) for about 100 s; this fails at once."""
    import sqlite3

    db = sqlite3.connect(path, timeout=30)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("SELECT count(*) FROM sqlite_master")
    except sqlite3.OperationalError as exc:
        if "database is locked" not in str(exc):  # another writer: MLflow waits for it (see retry)
            raise
    finally:
        db.close()


def ui_path(experiment_id: str, run_id: str | None = None) -> str:
    """MLflow UI link path; `workflowType=machine_learning` skips MLflow 3's default GenAI view."""
    return f"#/experiments/{experiment_id}/runs{'/' + run_id if run_id else ''}?workflowType=machine_learning"


# Tracked files that are a run's config or the pipeline's results, not code: params.yaml is the
# composed config (`cnnlab params`, `make run DATA=...` write it; every run records its whole config
# as params anyway), and dvc.lock, metrics/, plots/ and models/ are what `dvc repro` writes and the
# README says to commit. Changed, they leave git.dirty false; any other changed tracked file counts.
NOT_CODE = ("params.yaml", "dvc.lock", "metrics/", "plots/", "models/")


def git_info(root: Path | None = None) -> dict[str, str]:
    """The commit, and whether the code differs from it: git.dirty, with the changed tracked files
    that make it so in git.dirty_paths (NOT_CODE does not count; untracked files neither)."""
    root = root or project_root()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        prefix = git("rev-parse", "--show-prefix").strip()  # the project's folder inside the repository
        # -z: paths exactly as stored (no quoting); --no-renames: a renamed file is its two paths
        entries = git("status", "--porcelain=v1", "-z", "--untracked-files=no", "--no-renames").split("\0")
    except (OSError, subprocess.CalledProcessError):
        return {keys.GIT_COMMIT: "unknown", keys.GIT_DIRTY: "unknown"}
    changed = [entry[3:] for entry in entries if entry]
    code = [path for path in changed
            if not any(path == prefix + p or (p.endswith("/") and path.startswith(prefix + p)) for p in NOT_CODE)]
    return {keys.GIT_COMMIT: commit, keys.GIT_DIRTY: str(bool(code)).lower(),
            keys.GIT_DIRTY_PATHS: ", ".join(code)[:5000] or "(none)"}


def _hydra():
    """The current Hydra job's config, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def job_overrides() -> list[str]:
    """The current Hydra run's or sweep job's overrides (none outside a Hydra app)."""
    hydra = _hydra()
    return list(hydra.overrides.task) if hydra else []


def run_tags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    """What every run records to be rerun: git commit and dirty flag, Hydra overrides, the DVC
    experiment it belongs to, and the parent run when it is a sweep job."""
    tags = {**git_info(), keys.OVERRIDES: " ".join(job_overrides()) or "(none)"}
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


class Backlog:
    """The writes to one MLflow run that its store did not take, so that a tracking server going
    away mid-training costs no training (MLflowLogger sends every write through one).

    A write the store does not answer (connection refused, no answer within tracking.timeout_s, a
    SQLite file that cannot be opened) waits here, in order, with every write after it. They are
    sent again with the first write at least RETRY_S seconds after the last failure, each tried
    once (no retries) while the store stays away: a dead server costs one timeout per RETRY_S of
    training, not one per step. A write the store answers with an error is not tried again but
    listed. What still waits at the end of the run is written to a JSON file (`save`), metric
    points with their step and timestamp, so nothing measured is lost with the server.
    """

    RETRY_S = 30.0

    def __init__(self, uri: str):
        self.uri = uri
        self.waiting: list[tuple[dict, Callable[[], Any]]] = []  # (what, for the file; the write)
        self.refused: list[dict] = []
        self.error = ""          # why the store did not take the last write tried, while it does not
        self._next_try = 0.0     # time.monotonic() before which the store is not asked again
        self._saved: Path | None = None

    def send(self, what: dict, write: Callable[[], Any], now: bool = False) -> None:
        """Write now, or after what already waits; `now`: try even if the store failed less than
        RETRY_S ago (the end of a run)."""
        self.waiting.append((what, write))
        if now or time.monotonic() >= self._next_try:
            self._flush()

    def _flush(self) -> None:
        away, kept = bool(self.error), []
        while self.waiting:
            what, write = self.waiting.pop(0)
            try:
                with _one_try() if away else nullcontext():
                    write()
                continue
            except Exception as exc:
                failure = _failure(exc)
                if failure is None:
                    raise  # not the store's doing
                if failure == "refused":
                    self.refused.append({**what, "error": one_line(exc)[:500]})
                    log.warning("tracking store %s refused a write to the run (%s): it is not tried again",
                                self.uri, one_line(exc)[:300])
                    continue
                if not self.error:
                    log.warning("tracking store %s stopped answering (%s): the training goes on; what it does not "
                                "receive waits and is sent again every %.0f s", self.uri, _reason(exc), self.RETRY_S)
                self.error, self._next_try, away = _reason(exc), time.monotonic() + self.RETRY_S, True
                kept.append((what, write))
                if failure == "down":  # the writes behind it would only wait for their own timeouts
                    break
        self.waiting[:0] = kept
        if not self.waiting and self.error:
            log.warning("tracking store %s answers again: every write that waited is logged", self.uri)
            self.error = ""

    def save(self, path: Path | None, run_id: str | None) -> None:
        """List what the store did not take in `path` (JSON), with a warning saying how much and
        where; once everything is logged, remove the list this object wrote."""
        if not (self.waiting or self.refused):
            if self._saved:
                self._saved.unlink(missing_ok=True)
                self._saved = None
            return
        entries = [what for what, _ in self.waiting] + self.refused
        points = sum(len(w.get("points", ())) for w in entries)
        artifacts = sum(w["kind"] in ("artifact", "model") for w in entries)
        other = len(entries) - artifacts - sum(w["kind"] == "metrics" for w in entries)
        record = {"tracking_uri": self.uri, "run_id": run_id, "error": self.error or None,
                  "not_logged": [what for what, _ in self.waiting], "refused": self.refused}
        text = json.dumps(record, indent=2, default=str) + "\n"
        if path and path == self._saved and path.is_file() and path.read_text() == text:
            return  # said already (Lightning ends a run twice: after fit and after test)
        if path:
            write_atomic(path, text)
            self._saved = path
        log.warning("tracking store %s did not take %d metric points, %d artifacts and %d other writes (params, tags, "
                    "run status) of run %s%s", self.uri, points, artifacts, other, run_id,
                    f": they are listed in {path}" if path else "")

    @staticmethod
    def points(metrics: dict[str, float], step: int) -> tuple[list[Metric], dict]:
        """Metric points stamped now (sent now or later, they keep the time they were measured), and
        their entry for the file (a value that is not a finite number as null, as in train.json)."""
        stamp = int(time.time() * 1000)
        # As Lightning's MLFlowLogger.log_metrics: no text values, and only the characters MLflow allows in keys.
        points = [Metric(re.sub(r"[^a-zA-Z0-9_/. -]+", "", k), float(v), stamp, step)
                  for k, v in metrics.items() if not isinstance(v, str)]
        return points, {"kind": "metrics", "points": [
            {"key": m.key, "value": m.value if math.isfinite(m.value) else None, "step": m.step,
             "timestamp": m.timestamp} for m in points]}


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
        self.run_pointer = run_pointer
        self._continued = self._interrupted = False
        self._logged_up_to: dict[str, int] = {}  # continued run: last step of each metric already logged
        self.backlog = Backlog(uri)  # what the store did not take yet (a server gone mid-training)
        self.system_metrics_interval_s = system_metrics_interval_s
        self._system_metrics = None  # MLflow's SystemMetricsMonitor, while the run trains

    @property
    @rank_zero_experiment  # in distributed training only global rank 0 opens and writes the run
    def experiment(self) -> MlflowClient:
        opening = not self._initialized
        if opening:  # the store's other runs from this machine whose process died: KILLED, not RUNNING forever
            close_orphaned_runs(MlflowClient(self._tracking_uri), [self._experiment_id])
        client = retry(lambda: MLFlowLogger.experiment.fget(self))
        if opening and self._run_id:
            if self._continued:
                run = client.get_run(self._run_id)
                retry(client.update_run, self._run_id, status="RUNNING")
                if keys.ERROR in run.data.tags:  # e.g. closed as orphaned meanwhile
                    retry(client.delete_tag, self._run_id, keys.ERROR)
                # A run that goes on (and then finishes) is interrupted no more: what stopped each
                # earlier attempt stays as history, in cnnlab.resumed_after.
                if keys.INTERRUPTED in run.data.tags:
                    retry(client.delete_tag, self._run_id, keys.INTERRUPTED)
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
            retry(client.log_batch, self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
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
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._system_metrics = SystemMetricsMonitor(self._run_id, sampling_interval=self.system_metrics_interval_s,
                                                        resume_logging=self._continued, tracking_uri=self._tracking_uri)
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
            stopper.join(timeout=float(MLFLOW_HTTP_REQUEST_TIMEOUT.get() or 10))

    @property
    def opened(self) -> bool:
        """Has the MLflow run been created yet (it is, lazily, on first use)?"""
        return self._initialized

    def log_hyperparams(self, params) -> None:
        entry = {"kind": "params", "params": dict(params) if isinstance(params, Mapping) else vars(params)}
        self.send(entry, super().log_hyperparams, params)

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
        entry = {"kind": "status", "status": {"success": "FINISHED", "failed": "FAILED"}.get(status, status)}
        self.backlog.send(entry, lambda: retry(super(MLflowLogger, self).finalize, status), now=True)
        self.backlog.save(Path(self.run_pointer).with_name(BACKLOG_FILE) if self.run_pointer else None, self._run_id)

    @rank_zero_only
    def send(self, what: dict, write, *args, **kwargs) -> None:
        """One write to the run, `write(*args, **kwargs)`, through the backlog: if the store does not
        take it, the training goes on (see Backlog). `what` describes it in the backlog file.
        Every write goes through here, so in distributed training this (with `experiment` and
        `finalize`) is where the processes other than global rank 0 are kept from writing."""
        if not self._initialized:  # the run opens with its first write: a store gone by then fails the run
            try:
                retry(lambda: self.experiment)
            except Exception as exc:
                if _failure(exc) in ("down", "failed"):
                    raise unusable_store(self._tracking_uri, exc) from None
                raise
        self.backlog.send(what, lambda: retry(write, *args, **kwargs))

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

    def log_datasets(self, datasets: list[tuple[Any, str]]) -> None:
        """The data the run read, as MLflow dataset inputs: (an mlflow.data Dataset, its context:
        train, validation or test), shown in the UI's Datasets column and searchable."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [DatasetInput(d._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
                  for d, context in datasets]
        self.send({"kind": "datasets", "datasets": [f"{d.name} ({context})" for d, context in datasets]},
                  lambda: self.experiment.log_inputs(self.run_id, datasets=inputs))

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


def record_failed_run(tracking: dict, run_name: str, error: BaseException) -> str | None:
    """An MLflow run marked FAILED for a sweep job that died before its run was opened
    (a bad value in the sweep, data that would not fetch), so the sweep shows every job. None in
    a sweep without tracking (logger=none: no parent run), or when the store cannot be used: the
    job has failed already, and the sweep goes on."""
    if sweep_parent_run_id() is None:
        return None
    uri = tracking_uri(tracking.get("uri"))
    try:
        experiment_id = ensure_experiment(uri, tracking.get("experiment_name") or "cnnlab")
    except StoreUnavailable as exc:
        log.warning("the failed job is not recorded: %s", exc)
        return None
    tags = run_tags({keys.ROLE: keys.ROLE_TRAIN, keys.ERROR: one_line(error)[:5000], keys.MODEL_NAME: run_name})
    client = MlflowClient(uri)
    run = retry(client.create_run, experiment_id, run_name=run_name or "failed", tags=tags)
    retry(client.set_terminated, run.info.run_id, "FAILED")
    return run.info.run_id


def sweep_run_name(overrides: list[str], sweeper_params: dict[str, Any], seeds: int, now: float | None = None) -> str:
    """A sweep parent run's name: what varies first (sweeper params from config, such as an
    experiment's or Optuna's search space, and comma/range overrides), then the experiment, what
    the sweep fixed (data=, trainer.* and any other override of the configuration: a 1-epoch sweep
    says so), the seeds, and the start time. The MLflow UI cuts names to a column's width, so the
    part that tells two sweeps apart comes first; the time tells apart two sweeps of one command."""
    swept = [f"{k}={v}" for k, v in sweeper_params.items()]
    swept += [o for o in overrides if "," in o or "(" in o]
    named = [o for o in overrides if o.startswith(("experiment=", "hparams_search="))]
    fixed = [o for o in overrides if o not in swept and o not in named and override_key(o) not in ("seed", "seeds")
             and is_configuration(override_key(o))]  # not paths.*, tracking.*, progress bars...
    fixed += [f"seeds={seeds}"] if seeds != 1 else []  # from the command line or an experiment
    stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(now))
    return f"{' '.join([*swept, *named, *fixed])[:220] or 'sweep'} (sweep {stamp})"


class SweepParentRunCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun, recording the sweep's overrides. The same
    sweep command after a Ctrl-C or a kill continues that sweep's parent run (cnnlab.resume).

    Jobs may run in other processes (joblib launcher), so the parent's id is handed over through a
    file in the sweep folder rather than through MLflow's in-process active-run stack.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        seeds = config.get("seeds", 1)
        problem = sweep_problem(seeds, config.get("seed"), list(config.hydra.overrides.task),
                                config.hydra.sweeper._target_)
        if problem:  # Hydra would turn an exception here into a warning and run the jobs anyway
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(1)
        # The same sweep command after a kill or Ctrl-C continues that sweep (cnnlab.resume): its
        # parent run below, its finished jobs not trained again (only the key is kept here:
        # launchers pickle this callback for their job processes).
        self._sweep_key = resume.sweep_key(config)
        previous = resume.begin_sweep(self._sweep_key, config.hydra.sweep.dir)
        if not config.get("logger"):
            return  # logger=none: the sweep is not tracked (each job says so)
        try:
            settings = parse(Tracking, to_container(config.tracking), "tracking")
            uri = tracking_uri(settings.uri)
            http_settings(settings.timeout_s, settings.max_retries)
            experiment_id = ensure_experiment(uri, settings.experiment_name)
        except CnnlabError as exc:
            # Hydra turns a callback's exception into a warning and launches the jobs anyway; a
            # store that cannot be used stops the sweep here, before any job, as it stops a run.
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        if self._continue_parent(previous.get("parent"), uri, config.hydra.sweep.dir):
            return
        overrides = list(config.hydra.overrides.task)
        name = sweep_run_name(overrides, dict(config.hydra.sweeper.get("params") or {}), seeds)
        client = MlflowClient(uri)
        parent = retry(client.create_run, experiment_id, run_name=name, tags={
            **git_info(), **process_tags(), keys.ROLE: keys.ROLE_SWEEP, keys.OVERRIDES: " ".join(overrides) or "(none)",
            "hydra.sweeper": config.hydra.sweeper._target_, "hydra.launcher": config.hydra.launcher._target_,
            keys.SEEDS: str(seeds),
        })
        write_run_pointer(Path(config.hydra.sweep.dir) / PARENT_RUN_FILE, parent.info.run_id, experiment_id, uri)
        resume.set_sweep_parent(self._sweep_key, {"run_id": parent.info.run_id, "experiment_id": experiment_id,
                                                  "tracking_uri": uri})
        log.info("MLflow sweep parent run %s (%s)", parent.info.run_id, uri)

    @staticmethod
    def _continue_parent(pointer: dict | None, uri: str, sweep_dir: str) -> bool:
        """Continue the parent run of the interrupted attempt at this sweep, if it is in this store and
        did not finish: RUNNING again, written by this process (so nothing closes it as orphaned), one
        more in its cnnlab.resumes, and named to this attempt's jobs. False: a new parent run."""
        from mlflow.exceptions import MlflowException

        if not pointer:
            return False
        if pointer.get("tracking_uri") != uri:
            log.warning("the interrupted sweep's parent run %s is in another store (%s): starting a new parent run",
                        pointer.get("run_id"), pointer.get("tracking_uri"))
            return False
        client = MlflowClient(uri)
        try:
            run = retry(client.get_run, pointer["run_id"])
        except MlflowException:  # deleted meanwhile
            return False
        if run.info.lifecycle_stage != "active" or run.info.status == "FINISHED":
            return False
        run_id = run.info.run_id
        retry(client.update_run, run_id, status="RUNNING")
        if keys.ERROR in run.data.tags:  # closed as orphaned meanwhile: that error is over
            retry(client.delete_tag, run_id, keys.ERROR)
        tags = {**git_info(), **process_tags(), keys.RESUMES: str(int(run.data.tags.get(keys.RESUMES, "0")) + 1)}
        retry(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        write_run_pointer(Path(sweep_dir) / PARENT_RUN_FILE, run_id, run.info.experiment_id, uri)
        log.info("continuing the interrupted sweep: MLflow sweep parent run %s (%s)", run_id, uri)
        return True

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if getattr(self, "_sweep_key", None):  # every job ran: the same command is a new sweep now
            resume.end_sweep(self._sweep_key)
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
