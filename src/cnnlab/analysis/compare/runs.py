"""Reading MLflow into rows: the scopes compared (experiments, sweeps), their training runs, and
one frozen `RunRow` per run; validation curves for the charts. Every store call is here."""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from cnnlab.core import keys
from cnnlab.core.errors import CnnlabError
from cnnlab.tracking import tasks
from cnnlab.tracking.repeats import as_used, configuration, configuration_id
from cnnlab.tracking.store import mlflow_env
from cnnlab.tracking.sync import close_orphaned_runs

if TYPE_CHECKING:  # MLflow itself is imported where it is used: `cnnlab compare --help` does not wait for it
    from mlflow.entities import Experiment, Run

    from cnnlab.tracking.store import StoreClient

log = logging.getLogger(__name__)
DEFAULT_EXPERIMENT = "cnnlab"
ERROR_CHARS = 70  # errors are cut to one short line in the table (the run keeps the whole one)
PROGRESS_BAR_VAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # one bar per downloaded run would bury the table

# Run row key -> the MLflow metric (final value) it is read from.
METRICS = {
    "params": keys.PARAMS,
    "macs": keys.MACS,
    "epoch_time_s": keys.MEDIAN_EPOCH_TIME,
    "latency_ms": keys.LATENCY.format(batch=1),
    "best_val_acc": keys.BEST_VAL_ACC,
    "best_val_epoch": keys.BEST_VAL_EPOCH,
    "test_acc": keys.TEST_ACC,
}
COUNTS = {"params", "macs", "best_val_epoch"}  # stored as floats by MLflow, shown as integers


class Record:
    """A frozen dataclass read by name as well (`row["test_acc"]`), as the dicts before rows and
    groups were, and as its fields by name (shallow), as csv rows take them."""

    def __getitem__(self, key: str):
        return getattr(self, key)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class RunRow(Record):
    """One training run as compared: who it is, its configuration and task, and its final metrics
    (None where missing or not finite). `label` is its configuration's label once grouped."""

    label: str
    architecture: str
    seed: int | None
    run_id: str
    status: str          # "finished", "failed", "killed", "running", or "superseded" (a newer run of its seed)
    data: str
    configuration: str   # the configuration id (cnnlab.tracking.repeats); seeds of one share it
    parent_run_id: str
    experiment_id: str
    config: dict[str, str] = field(compare=False)  # its params as a configuration: the source of labels
    overrides: tuple[str, ...] = ()  # what its sweep overrode (cnnlab.repeats), each `key=value`
    task: str = ""
    binary_view: str | None = None   # the binary task its summed softmax answers, if any
    view: bool = False               # this row is a ten-class run seen in that binary task
    params: int | None = None
    macs: int | None = None
    epoch_time_s: float | None = None
    latency_ms: float | None = None
    best_val_acc: float | None = None
    best_val_epoch: int | None = None
    test_acc: float | None = None
    binary_acc: float | None = None
    start_time: int = 0
    device: str = ""
    error: str = ""


def training_runs(client: StoreClient, uri: str, experiment: str,
                  sweep: str | None) -> tuple[Experiment, Run | None, list[Run]]:
    """The experiment, the sweep's parent run (when `sweep` names one, or is "latest") and its
    training runs, newest first; runs left RUNNING by a dead process are marked KILLED first."""
    [(exp, parent)] = _scopes(client, uri, [experiment], [sweep] if sweep else [])
    return exp, parent, _runs_in(client, exp, parent)


def _names(value: str | list[str] | None) -> list[str]:
    """"a,b" or ["a", "b"] -> ["a", "b"]."""
    items = value.split(",") if isinstance(value, str) else value or []
    return [item.strip() for item in items if item.strip()]


def _scopes(client: StoreClient, uri: str, experiments: list[str],
            sweeps: list[str]) -> list[tuple[Experiment, Run | None]]:
    """(experiment, sweep parent run or None) pairs to read runs from: every experiment when no
    sweep is named; each named sweep (its own experiment); each experiment's latest sweep for
    "latest". Runs left RUNNING by a dead process are marked KILLED first."""
    scopes = []
    for sweep in sweeps or [None]:
        if sweep and sweep != "latest":  # an explicit run id names its own experiment
            parent = _sweep_parent(client, uri, sweep)
            scopes.append((client.get_experiment(parent.info.experiment_id), parent))
        else:
            scopes += [_resolve(client, uri, name, sweep) for name in experiments]
    from cnnlab.tracking.sync import send_pending

    send_pending()  # runs whose store was away mid-training: their backlogs first, so they count as they ended
    for exp_id in {exp.experiment_id for exp, _ in scopes}:
        for run_id in close_orphaned_runs(client, [exp_id]):  # listed as killed, not as running
            log.info("run %s was RUNNING but its process is gone: marked KILLED", run_id)
    return list({(exp.experiment_id, parent.info.run_id if parent else None): (exp, parent)
                 for exp, parent in scopes}.values())


def _runs_in(client: StoreClient, exp: Experiment, parent: Run | None, filter_string: str | None = None) -> list[Run]:
    query = f"tags.`{keys.ROLE}` = '{keys.ROLE_TRAIN}'"
    if parent:
        query += f" and tags.`{keys.PARENT_RUN}` = '{parent.info.run_id}'"
    if filter_string:
        query += f" and {filter_string}"
    return _search_all(client, exp.experiment_id, query)


def _describe(scopes: list[tuple[Experiment, Run | None]]) -> str:
    return ", ".join(f"sweep {parent.info.run_id} ({parent.info.run_name})" if parent else f"experiment {exp.name!r}"
                     for exp, parent in scopes)


def _resolve(client: StoreClient, uri: str, name: str, sweep: str | None) -> tuple[Experiment, Run | None]:
    """The experiment and, when comparing its latest sweep, that sweep's parent run."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CnnlabError(f"unknown experiment {name!r} in {uri}; experiments there: {', '.join(names) or '(none)'}")
    if sweep is None:
        return exp, None
    latest = client.search_runs([exp.experiment_id], f"tags.`{keys.ROLE}` = '{keys.ROLE_SWEEP}'",
                    order_by=["attributes.start_time DESC"], max_results=1)
    if not latest:
        raise CnnlabError(f"experiment {name!r} has no sweep runs (a sweep is `python -m cnnlab.train -m ...`)")
    return exp, latest[0]


def _sweep_parent(client: StoreClient, uri: str, run_id: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise CnnlabError(f"no MLflow run with id {run_id!r} in {uri}") from None
    role = run.data.tags.get(keys.ROLE)
    if role != keys.ROLE_SWEEP:
        parent = run.data.tags.get(keys.PARENT_RUN)
        hint = f"; its parent is {parent}" if parent else ""
        raise CnnlabError(f"run {run_id} ({run.info.run_name}) is not a sweep parent run "
                          f"(cnnlab.role={role or 'unset'}){hint}")
    return run


def _search_all(client: StoreClient, experiment_id: str, filter_string: str) -> list[Run]:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, ViewType.ACTIVE_ONLY,
                      order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(run: Run) -> RunRow:
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    architecture = run.info.run_name or tags.get(keys.MODEL_NAME) or run.info.run_id[:8]
    seed = params.get("seed", "")
    # What the run repeats: its tag, or for a run older than the tag the same id from its params;
    # a run with neither (not made by cnnlab's training) is a configuration of its own name.
    params = as_used(params, tags)  # labels name the precision and layout the run trained with
    config_id = tags.get(keys.CONFIGURATION) or (configuration_id(params) if params else f"name:{architecture}")
    measured = {}
    for key, metric in METRICS.items():
        value = metrics.get(metric)
        # A NaN (a diverged run's loss-driven metrics) is no measurement: left out like a missing one.
        measured[key] = None if value is None or not math.isfinite(value) else int(value) if key in COUNTS \
            else float(value)
    binary = metrics.get(keys.TEST_BINARY_ACC)
    error = (tags.get(keys.ERROR) or "").strip().split("\n")[0]
    return RunRow(label=architecture, architecture=architecture, seed=int(seed) if seed.isdigit() else None,
                  run_id=run.info.run_id, status=run.info.status.lower(), data=tags.get(keys.DATA_NAME, ""),
                  configuration=config_id, parent_run_id=tags.get(keys.PARENT_RUN, ""),
                  experiment_id=run.info.experiment_id, config=configuration(params),
                  overrides=tuple(tags.get(keys.REPEATS, "").split()), task=tasks.run_task(params, tags),
                  binary_view=tasks.binary_view(params, tags), view=False, **measured,
                  binary_acc=float(binary) if binary is not None and math.isfinite(binary) else None,
                  start_time=run.info.start_time or 0, device=tags.get(keys.DEVICE, ""),
                  error=error if len(error) <= ERROR_CHARS else error[:ERROR_CHARS - 3] + "...")


def val_curve(client: StoreClient, run_id: str) -> list[tuple[int, float]]:
    """(epoch, validation accuracy) points of a run, epochs counted from 1.

    From the run's metrics/curves.csv artifact when it has one, else from its `val/acc` history,
    whose steps are mapped to epochs through the `epoch` metric Lightning logs (counted from 0).
    """
    folder = keys.CURVES_ARTIFACT.rpartition("/")[0]
    if any(a.path == keys.CURVES_ARTIFACT for a in client.list_artifacts(run_id, folder)):
        with tempfile.TemporaryDirectory() as tmp, mlflow_env(**{PROGRESS_BAR_VAR: "false"}):
            path = client.download_artifacts(run_id, keys.CURVES_ARTIFACT, tmp)
            with open(path, newline="") as fh:
                return [(int(r["epoch"]), float(r["val_acc"])) for r in csv.DictReader(fh) if r.get("val_acc")]
    epochs = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, "epoch"))
    history = sorted(client.get_metric_history(run_id, keys.VAL_ACC), key=lambda m: (m.step, m.timestamp))
    points = []
    for i, m in enumerate(history):
        logged = [value for step, _, value in epochs if step <= m.step]
        points.append((int(logged[-1]) + 1 if logged else i + 1, m.value))
    return points

