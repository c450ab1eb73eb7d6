"""MLflow's store: where runs go, the one client whose every call is retried, and how a store fails.
What every run carries (git, overrides, process) is cnnlab.tracking.lineage, the Lightning logger
cnnlab.tracking.logger, the sweeps' parent runs cnnlab.training.sweep_parent; this module imports
neither Lightning nor MLflow at the top, so commands that only read runs start fast.

One training run = one MLflow run, opened by `MLflowLogger` (Lightning's MLFlowLogger, see
conf/logger/mlflow.yaml). A Hydra multirun opens one parent run (SweepParentRunCallback) and every
job nests under it. The default store is sqlite:///<project>/mlflow.db with artifacts in
<project>/mlartifacts, so runs from DVC's temporary experiment copies land in the project's store.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from cnnlab.core.config import Tracking, project_root
from cnnlab.core.errors import CnnlabError, one_line
from cnnlab.core.internals import HTTP_STATUS_TEXT

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


def tracking_uri(cfg_uri: str | None = None) -> str:
    """Config key, else $MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


STORE_HINT = "run from the cnnlab project, pass --tracking-uri, or set MLFLOW_TRACKING_URI"
REGISTRY_VAR = "MLFLOW_REGISTRY_URI"  # mlflow.set_registry_uri exports it


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

    # The registry as it was set, not as it resolves: unset, it follows the tracking URI, and putting
    # back its resolved value would pin it to this store (set_registry_uri also exports
    # MLFLOW_REGISTRY_URI to the process and its children).
    tracking, registry = mlflow.get_tracking_uri(), os.environ.get(REGISTRY_VAR)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)
        if registry is None:
            os.environ.pop(REGISTRY_VAR, None)


def store_client(uri: str | None = None) -> StoreClient:
    """A client of the store that `existing_store` names, for its runs and its model registry alike
    (MLflow's registry would otherwise default to ./mlflow.db of the current folder)."""
    resolved = existing_store(uri)
    default_http_settings()  # MLflow's own would wait minutes on a dead server
    return StoreClient(resolved, registry_uri=resolved)


_retrying = threading.local()  # .active: this thread is inside a retry, which retries the whole call


def retry(fn, *args, attempts: int = 8, **kwargs):
    """Call an MLflow store function, retrying while SQLite reports a concurrent writer.

    SQLite serialises writers; with several sweep jobs logging at once a write can exceed the
    driver's busy timeout. MLflow has no retry for this, so back off and try again.

    Inside another retry (a StoreClient call made by a write that `store_call` retries as a whole)
    it calls `fn` once: the outer one retries, and the waits do not multiply.
    Outside this module, use StoreClient (every method retried) or `store_call`.
    """
    if getattr(_retrying, "active", False):
        return fn(*args, **kwargs)
    _retrying.active = True
    try:
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # MlflowException wraps sqlalchemy.exc.OperationalError
                if "database is locked" not in str(exc) or attempt == attempts - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
    finally:
        _retrying.active = False


def store_call(fn, *args, **kwargs):
    """A store operation that is not one StoreClient method, retried as those are: a write made
    through several client calls (Lightning's MLFlowLogger opening or closing its run, logging its
    params), or through MLflow's module functions (mlflow.pytorch.log_model). The StoreClient calls
    inside it are then tried once each: the whole operation is what is retried."""
    return retry(fn, *args, **kwargs)


class StoreClient:
    """MLflow's MlflowClient, every method of which is retried (`retry`: SQLite's "database is
    locked", with backoff) and otherwise raises what MLflow raised, for failure_kind and
    failure_reason to classify. Attributes that are not methods pass through.

    `StoreClient(uri, registry_uri=None)` opens a client as MlflowClient does; `StoreClient.wrap(client)`
    wraps one made elsewhere (Lightning's). MLflow's HTTP retries are its own: `with single_try():`
    around a call still asks once."""

    def __init__(self, tracking_uri: str | None = None, registry_uri: str | None = None, *,
                 client: MlflowClient | None = None):
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri, registry_uri=registry_uri)
        self.mlflow = client  # the client itself, its calls not retried

    @classmethod
    def wrap(cls, client: MlflowClient | StoreClient) -> StoreClient:
        return client if isinstance(client, StoreClient) else cls(client=client)

    def __getattr__(self, name: str):
        if name == "mlflow":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        value = getattr(self.mlflow, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def retried(*args, **kwargs):
            return retry(value, *args, **kwargs)

        return retried

    def __repr__(self) -> str:
        return f"StoreClient({self.mlflow.tracking_uri!r})"


# --- a store that cannot be used, or goes away ---------------------------------------------------
#
# MLflow's HTTP client reads its timeout and retries from the environment at every request
# (mlflow/utils/rest_utils.py); its defaults (120 s per try, 7 retries with backoff) keep a training
# waiting for many minutes on a server that is gone. cnnlab sets them from tracking.timeout_s and
# tracking.max_retries; the first contact asks once, so an unusable store is reported in about
# timeout_s, before any work; while training, a write the store does not take waits in a Backlog.

# their names in mlflow.environment_variables (not imported here: importing MLflow takes seconds)
HTTP_TIMEOUT_VAR, HTTP_RETRIES_VAR = "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
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
    for var, key, value in ((HTTP_TIMEOUT_VAR, "timeout_s", timeout_s), (HTTP_RETRIES_VAR, "max_retries", max_retries)):
        value, before = str(int(value)), os.environ.get(var)
        if before is not None and before not in (value, _SET_HERE.get(var)):
            log.warning("%s=%s in the environment is replaced by tracking.%s=%s (set that key instead)",
                        var, before, key, value)
        os.environ[var] = _SET_HERE[var] = value


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


def single_try():
    """MLflow's HTTP client without retries: the start-up check, and a store known to be away, cost
    one timeout, not (max_retries + 1) timeouts plus backoff."""
    return mlflow_env(**{HTTP_RETRIES_VAR: "0"})


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


def failure_kind(exc: BaseException) -> str | None:
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


def failure_reason(exc: BaseException) -> str:
    """Why the store did not take a write, in a few words: MLflow's messages repeat the URL and
    urllib3's retry chatter."""
    import requests

    causes = list(_causes(exc))
    text = " ".join(str(e) for e in causes)
    if any(isinstance(e, (requests.Timeout, TimeoutError)) for e in causes) or "timed out" in text:
        return f"no answer within {os.environ.get(HTTP_TIMEOUT_VAR, 120)} s"  # 120: MLflow's default
    for marker, words in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                          ("Failed to resolve", "unknown host"), ("database is locked", "database is locked"),
                          ("readonly database", "read-only database"),
                          ("unable to open database file", "unable to open the database file")):
        if marker in text:
            return words
    status = re.search(HTTP_STATUS_TEXT, text)
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
    return StoreUnavailable(f"tracking store {uri} cannot be used ({failure_reason(exc)}): {fix}, "
                            f"or train without tracking with logger=none")


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name` in the store at `uri`, created if needed. This is the first
    contact with the store, asked once: a store that cannot be used fails here, in about
    tracking.timeout_s, in one line naming it, before any data or training work."""
    try:
        with single_try():
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
        client = StoreClient(uri)  # MLflow creates a new store's tables as soon as a client opens it
        experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # Artifacts next to the SQLite file, not in ./mlruns of whatever folder a run starts in.
        location = (project_root() / "mlartifacts").as_uri() if default_store else None
        try:
            client.create_experiment(name, artifact_location=location)
        except Exception:  # another process created it first
            pass
        experiment = client.get_experiment_by_name(name)
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
