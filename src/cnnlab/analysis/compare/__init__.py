"""`cnnlab compare`: which configuration is better for its cost, and by more than seed noise.

MLflow's UI shows runs one metric at a time and one seed at a time, but the question cnnlab asks
is "which architecture is best for its cost, really": a few tenths of a point is what the seed
alone moves. This reads training runs (an experiment's, one sweep's, several of either, narrowed
by an MLflow search filter) and groups them by configuration: runs differing only in seed
(cnnlab.tracking.repeats). Per group: the seeds, mean, standard deviation and 95% interval of the test
accuracy, the cost figures (parameters, MACs, time per epoch, latency), Welch's test against the
baseline (default the documented `cnn`) with Benjamini-Hochberg adjusted p-values and a verdict,
and the Pareto frontier of accuracy against each cost (cnnlab.analysis.stats). Failed, killed and running
runs are listed apart, never averaged in.

It prints the table and the verdicts, writes report.md, groups.csv, runs.csv and plots to a folder
and, for one sweep, logs them and the aggregates (metrics and tags) onto the sweep's parent run.
`compare(...)` is a plain function returning a Comparison; `main(argv)` is the CLI wrapper.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import re
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.analysis import stats
from cnnlab.core import keys
from cnnlab.core.errors import CnnlabError, command
from cnnlab.core.files import csv_text, write_atomic
from cnnlab.tracking import tasks
from cnnlab.tracking.repeats import as_used, configuration, configuration_id, override_key
from cnnlab.tracking.store import existing_store, mlflow_env, retry, store_client, ui_path
from cnnlab.tracking.sync import close_orphaned_runs

if TYPE_CHECKING:  # MLflow itself is imported where it is used: `cnnlab compare --help` does not wait for it
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
DEFAULT_EXPERIMENT = "cnnlab"
DEFAULT_BASELINE = "cnn"  # the documented CNN of the design notes
DEFAULT_OUTPUT = "reports/compare"
MAX_CURVES = 10  # configurations whose learning curves are drawn, best first; more make the plot unreadable
MAX_LABEL_KEYS = 3  # config keys named in a label that must tell apart configurations of one architecture
# How long and on how much a model trained: named first in labels, where they differ (a short run
# beside full ones must say so).
BUDGET_KEYS = ("trainer.max_epochs", "trainer.limit_train_batches", "trainer.max_steps", "trainer.max_time")
VIEW = " [softmax summed]"  # a ten-class model's answer to a binary task (cnnlab.tracking.tasks.binary_view)
OTHER_TASKS = "Other tasks: not on this accuracy scale, so not tested, ranked or on any frontier"
LEFT_OUT = "Not included: failed, killed, still running, or a seed repeated by a newer run"
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
# The costs accuracy is weighed against: row key -> how the report names it.
COSTS = {"params": "parameters", "macs": "MACs", "epoch_time_s": "time per epoch", "latency_ms": "latency"}
CSV_FIELDS = ("label", "architecture", "seed", "run_id", "status", "task", "data", *METRICS, "binary_acc", "device",
              "configuration", "parent_run_id", "experiment_id", "error")
GROUP_FIELDS = ("label", "architecture", "task", "data", "seeds", "seed_list", "test_acc_mean", "test_acc_std",
                "test_acc_ci_low", "test_acc_ci_high", "best_val_acc_mean", "best_val_acc_std", *COSTS,
                "diff", "diff_ci_low", "diff_ci_high", "p_value", "p_adjusted", "verdict", "frontier",
                "configuration", "run_ids")
PLOTS = {
    "test_acc_vs_params.png": "Test accuracy vs parameters (mean and 95% interval over seeds; the frontier dashed)",
    "test_acc_vs_epoch_time.png": "Test accuracy vs time per epoch (mean and 95% interval; the frontier dashed)",
    "val_acc_curves.png": "Validation accuracy by epoch (mean over seeds; the band spans the lowest to the highest)",
}
# What the sweep's parent run gets per configuration, as metrics seeds/<label>/<field>.
PARENT_METRICS = ("seeds", "test_acc_mean", "test_acc_std", "test_acc_ci_low", "test_acc_ci_high", "diff", "p_value",
                  "p_adjusted")


@dataclass
class Comparison:
    """What `compare` found: configurations (best mean test accuracy first), every run (finished
    first), the baseline's label (None when there is none) and the sweep parent runs compared."""

    groups: list[dict]
    runs: list[dict]
    baseline: str | None
    parents: list[Run] = field(default_factory=list)
    no_baseline: str = ""  # why there is no baseline, when there is none
    task: str = ""         # the task of `groups` (cnnlab.tracking.tasks): what their accuracies measure
    other_tasks: list[dict] = field(default_factory=list)  # groups of other tasks, each with its "reason"

    @property
    def left_out(self) -> list[dict]:
        """Runs not in the statistics: failed, killed, running, or a seed a newer run repeated."""
        return [r for r in self.runs if r["status"] != "finished"]


def compare(experiment: str | list[str] = DEFAULT_EXPERIMENT, sweep: str | list[str] | None = None,
            uri: str | None = None, output: str | Path = DEFAULT_OUTPUT, log_to_parent: bool = True,
            baseline: str | None = None, filter_string: str | None = None,
            alpha: float = stats.ALPHA, task: str | None = None) -> Comparison:
    """Compare training runs grouped by configuration.

    experiment, sweep: names / parent run ids ("latest": each experiment's newest sweep), one or
    several (lists or comma-separated); filter_string: an MLflow search filter the runs must also
    match (`params.optimizer.lr = '0.001'`). baseline: the label of the configuration the others
    are tested against (default DEFAULT_BASELINE, when there is one). Writes report.md, groups.csv,
    runs.csv and the plots to `output`; for one sweep also logs them to its parent run under report/
    with the aggregates as metrics (unless log_to_parent is false).

    Accuracies are compared within one task only (cnnlab.tracking.tasks: data, data files, the question the
    head answers): `task` names it, else `_main_task` chooses; the groups of other tasks are listed
    apart with what differs. A ten-class model also joins a binary task of its comparison with its
    summed softmax probabilities (label suffix VIEW), so a sigmoid head has something to be tested against.
    """
    uri = existing_store(uri)
    client = store_client(uri)
    scopes = _scopes(client, uri, _names(experiment) or [DEFAULT_EXPERIMENT], _names(sweep))
    runs = [run for exp, parent in scopes for run in _runs_in(client, exp, parent, filter_string)]
    rows = _sorted([_row(run) for run in {r.info.run_id: r for r in runs}.values()])
    finished = [r for r in rows if r["status"] == "finished"]
    if not finished:
        others = Counter(r["status"] for r in rows)
        detail = f" ({', '.join(f'{n} {status}' for status, n in others.items())})" if others else ""
        raise CnnlabError(f"{_describe(scopes)} {'has' if len(scopes) == 1 else 'have'} no finished training "
                          f"runs{detail}{' matching the filter' if filter_string else ''}")

    counted = _one_run_per_seed(finished)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in counted + _binary_views(counted):
        by_task[row["task"]].append(row)
    grouped = {t: _groups(members) for t, members in by_task.items()}
    chosen = _main_task(grouped, baseline, task)
    groups = grouped.pop(chosen)
    # Another task's frontier is on another scale: none is claimed for them.
    others = [{**g, "frontier": [], "reason": tasks.difference(chosen, t)} for t, gs in grouped.items() for g in gs]
    base, why_none = _baseline(groups, baseline)
    _test_against(groups, base, alpha)
    parents = [parent for _, parent in scopes if parent]
    result = Comparison(groups, rows, base["label"] if base else None, parents, why_none, chosen, others)

    out = Path(output)
    # A view's validation curve is the ten-class one: not on this task's scale, so not drawn.
    curves = {g["label"]: [val_curve(client, run_id) for run_id in g["run_ids"]]
              for g in [g for g in groups if not g["view"]][:MAX_CURVES]}
    files = [write_atomic(out / name, data) for name, data in _plots(groups, curves).items()]
    files.append(write_atomic(out / "groups.csv", csv_text(GROUP_FIELDS, [_csv_group(g) for g in groups + others])))
    files.append(write_atomic(out / "runs.csv", csv_text(CSV_FIELDS, rows)))
    files.append(write_atomic(out / "report.md", _report(result, scopes, uri, filter_string, alpha)))
    # A filtered subset is not the sweep's result: it would overwrite the sweep's aggregates.
    if len(parents) == 1 and log_to_parent and not filter_string:
        _log_to_parent(client, parents[0].info.run_id, result, files)
    return result


# --- reading MLflow ------------------------------------------------------------------------------

def training_runs(client: MlflowClient, uri: str, experiment: str,
                  sweep: str | None) -> tuple[Experiment, Run | None, list[Run]]:
    """The experiment, the sweep's parent run (when `sweep` names one, or is "latest") and its
    training runs, newest first; runs left RUNNING by a dead process are marked KILLED first."""
    [(exp, parent)] = _scopes(client, uri, [experiment], [sweep] if sweep else [])
    return exp, parent, _runs_in(client, exp, parent)


def _names(value: str | list[str] | None) -> list[str]:
    """"a,b" or ["a", "b"] -> ["a", "b"]."""
    items = value.split(",") if isinstance(value, str) else value or []
    return [item.strip() for item in items if item.strip()]


def _scopes(client: MlflowClient, uri: str, experiments: list[str],
            sweeps: list[str]) -> list[tuple[Experiment, Run | None]]:
    """(experiment, sweep parent run or None) pairs to read runs from: every experiment when no
    sweep is named; each named sweep (its own experiment); each experiment's latest sweep for
    "latest". Runs left RUNNING by a dead process are marked KILLED first."""
    scopes = []
    for sweep in sweeps or [None]:
        if sweep and sweep != "latest":  # an explicit run id names its own experiment
            parent = _sweep_parent(client, uri, sweep)
            scopes.append((retry(client.get_experiment, parent.info.experiment_id), parent))
        else:
            scopes += [_resolve(client, uri, name, sweep) for name in experiments]
    from cnnlab.tracking.sync import send_pending

    send_pending()  # runs whose store was away mid-training: their backlogs first, so they count as they ended
    for exp_id in {exp.experiment_id for exp, _ in scopes}:
        for run_id in close_orphaned_runs(client, [exp_id]):  # listed as killed, not as running
            log.info("run %s was RUNNING but its process is gone: marked KILLED", run_id)
    return list({(exp.experiment_id, parent.info.run_id if parent else None): (exp, parent)
                 for exp, parent in scopes}.values())


def _runs_in(client: MlflowClient, exp: Experiment, parent: Run | None, filter_string: str | None = None) -> list[Run]:
    query = f"tags.`{keys.ROLE}` = '{keys.ROLE_TRAIN}'"
    if parent:
        query += f" and tags.`{keys.PARENT_RUN}` = '{parent.info.run_id}'"
    if filter_string:
        query += f" and {filter_string}"
    return _search_all(client, exp.experiment_id, query)


def _describe(scopes: list[tuple[Experiment, Run | None]]) -> str:
    return ", ".join(f"sweep {parent.info.run_id} ({parent.info.run_name})" if parent else f"experiment {exp.name!r}"
                     for exp, parent in scopes)


def _resolve(client: MlflowClient, uri: str, name: str, sweep: str | None) -> tuple[Experiment, Run | None]:
    """The experiment and, when comparing its latest sweep, that sweep's parent run."""
    exp = retry(client.get_experiment_by_name, name)
    if exp is None:
        names = sorted(e.name for e in retry(client.search_experiments))
        raise CnnlabError(f"unknown experiment {name!r} in {uri}; experiments there: {', '.join(names) or '(none)'}")
    if sweep is None:
        return exp, None
    latest = retry(client.search_runs, [exp.experiment_id], f"tags.`{keys.ROLE}` = '{keys.ROLE_SWEEP}'",
                    order_by=["attributes.start_time DESC"], max_results=1)
    if not latest:
        raise CnnlabError(f"experiment {name!r} has no sweep runs (a sweep is `python -m cnnlab.train -m ...`)")
    return exp, latest[0]


def _sweep_parent(client: MlflowClient, uri: str, run_id: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        run = retry(client.get_run, run_id)
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


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = retry(client.search_runs, [experiment_id], filter_string, ViewType.ACTIVE_ONLY,
                      order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(run: Run) -> dict:
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    architecture = run.info.run_name or tags.get(keys.MODEL_NAME) or run.info.run_id[:8]
    seed = params.get("seed", "")
    # What the run repeats: its tag, or for a run older than the tag the same id from its params;
    # a run with neither (not made by cnnlab's training) is a configuration of its own name.
    params = as_used(params, tags)  # labels name the precision and layout the run trained with
    config_id = tags.get(keys.CONFIGURATION) or (configuration_id(params) if params else f"name:{architecture}")
    row = {"label": architecture, "architecture": architecture, "seed": int(seed) if seed.isdigit() else None,
           "run_id": run.info.run_id, "status": run.info.status.lower(), "data": tags.get(keys.DATA_NAME, ""),
           "configuration": config_id, "parent_run_id": tags.get(keys.PARENT_RUN, ""),
           "experiment_id": run.info.experiment_id, "config": configuration(params),
           "overrides": tags.get(keys.REPEATS, "").split(), "task": tasks.run_task(params, tags),
           "binary_view": tasks.binary_view(params, tags), "view": False}
    for key, metric in METRICS.items():
        value = metrics.get(metric)
        # A NaN (a diverged run's loss-driven metrics) is no measurement: left out like a missing one.
        row[key] = None if value is None or not math.isfinite(value) else int(value) if key in COUNTS else float(value)
    binary = metrics.get(keys.TEST_BINARY_ACC)
    row["binary_acc"] = float(binary) if binary is not None and math.isfinite(binary) else None
    row["start_time"] = run.info.start_time or 0
    row["device"] = tags.get(keys.DEVICE, "")
    error = (tags.get(keys.ERROR) or "").strip().split("\n")[0]
    row["error"] = error if len(error) <= ERROR_CHARS else error[:ERROR_CHARS - 3] + "..."
    return row


def _sorted(rows: list[dict]) -> list[dict]:
    """Finished runs by test accuracy (best first), then the others (newest first)."""
    finished = sorted((r for r in rows if r["status"] == "finished"),
                      key=lambda r: (r["test_acc"] is None, -(r["test_acc"] or 0.0), r["architecture"]))
    return finished + [r for r in rows if r["status"] != "finished"]


def _one_run_per_seed(finished: list[dict]) -> list[dict]:
    """The newest finished run of each (configuration, seed); older ones (a sweep run twice, a seed
    retrained) are marked `superseded`: the same seed twice is one measurement, not two."""
    newest: dict[tuple[str, int], dict] = {}
    for row in sorted(finished, key=lambda r: -r["start_time"]):
        if row["seed"] is None:
            continue
        kept = newest.setdefault((row["configuration"], row["seed"]), row)
        if kept is not row:
            row["status"], row["error"] = "superseded", f"seed {row['seed']} again in newer run {kept['run_id'][:8]}"
    return [r for r in finished if r["status"] == "finished"]


def _binary_views(rows: list[dict]) -> list[dict]:
    """Each ten-class run again, in the binary task of its model.positive_classes, scored by its
    summed softmax probabilities (keys.TEST_BINARY_ACC, measured on the test set by the run), when
    the runs compared include one trained for that binary task: "does a dedicated sigmoid head
    beat the ten-class model on the binary question" then has an answer on one scale. Its
    validation accuracy is the ten-class one, so it is left out (no val columns, no curve)."""
    binary_tasks = {r["task"] for r in rows}
    return [{**r, "task": r["binary_view"], "test_acc": r["binary_acc"], "best_val_acc": None, "best_val_epoch": None,
             "configuration": f"{r['configuration']}+summed", "view": True}
            for r in rows if r["binary_view"] in binary_tasks and r["binary_acc"] is not None]


def _main_task(grouped: dict[str, list[dict]], baseline: str | None, wanted: str | None) -> str:
    """The task whose accuracies are compared: `wanted` (--task), else among the tasks holding the
    baseline (all when none does) the one most configurations were trained for, then the one with
    most configurations counting ten-class models' binary views. So a zoo of ten-class models with
    one stray sigmoid run compares the zoo; the heads experiment (a ten-class cnn and a sigmoid
    cnn_sigmoid: one each) compares both on the binary question."""
    if wanted:
        found = [t for t in grouped if tasks.matches(t, wanted)]
        if len(found) != 1:
            raise CnnlabError(f"--task {wanted}: {'matches ' + str(len(found)) if found else 'matches none'} of the "
                              f"tasks compared; there are: {', '.join(sorted(grouped))}")
        return found[0]
    name = baseline or DEFAULT_BASELINE
    holding = [t for t, gs in grouped.items() if any(name in (g["label"], g["architecture"]) for g in gs)]
    return max(holding or grouped, key=lambda t: (sum(not g["view"] for g in grouped[t]), len(grouped[t]),
                                                  sum(g["seeds"] for g in grouped[t]), t))


def val_curve(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    """(epoch, validation accuracy) points of a run, epochs counted from 1.

    From the run's metrics/curves.csv artifact when it has one, else from its `val/acc` history,
    whose steps are mapped to epochs through the `epoch` metric Lightning logs (counted from 0).
    """
    folder = keys.CURVES_ARTIFACT.rpartition("/")[0]
    if any(a.path == keys.CURVES_ARTIFACT for a in retry(client.list_artifacts, run_id, folder)):
        with tempfile.TemporaryDirectory() as tmp, mlflow_env(**{PROGRESS_BAR_VAR: "false"}):
            path = client.download_artifacts(run_id, keys.CURVES_ARTIFACT, tmp)
            with open(path, newline="") as fh:
                return [(int(r["epoch"]), float(r["val_acc"])) for r in csv.DictReader(fh) if r.get("val_acc")]
    epochs = sorted((m.step, m.timestamp, m.value) for m in retry(client.get_metric_history, run_id, "epoch"))
    history = sorted(retry(client.get_metric_history, run_id, keys.VAL_ACC), key=lambda m: (m.step, m.timestamp))
    points = []
    for i, m in enumerate(history):
        logged = [value for step, _, value in epochs if step <= m.step]
        points.append((int(logged[-1]) + 1 if logged else i + 1, m.value))
    return points


# --- grouping and testing -------------------------------------------------------------------------

def _groups(finished: list[dict]) -> list[dict]:
    """One group per configuration: its runs' seeds and statistics, best mean test accuracy first.
    Sets each run row's label to its group's."""
    members: dict[str, list[dict]] = defaultdict(list)
    for row in finished:
        members[row["configuration"]].append(row)
    labels = _labels(members)
    groups = []
    for config_id, rows in members.items():
        if rows[0]["view"]:
            labels[config_id] += VIEW
        for row in rows:
            row["label"] = labels[config_id]
        scored = [r for r in rows if r["test_acc"] is not None]
        acc = stats.summarize([r["test_acc"] for r in scored]) if scored else None
        val = [r["best_val_acc"] for r in rows if r["best_val_acc"] is not None]
        val_summary = stats.summarize(val) if val else None
        group = {"label": labels[config_id], "architecture": rows[0]["architecture"], "data": rows[0]["data"],
                 "task": rows[0]["task"], "view": rows[0]["view"], "configuration": config_id,
                 "seeds": acc.n if acc else 0,
                 "seed_list": sorted(r["seed"] for r in scored if r["seed"] is not None),
                 "acc": acc, "test_values": [r["test_acc"] for r in scored],
                 "best_val_acc_mean": val_summary.mean if val_summary else None,
                 "best_val_acc_std": val_summary.std if val_summary else None,
                 "run_ids": [r["run_id"] for r in sorted(rows, key=lambda r: -(r["test_acc"] or 0.0))],
                 "devices": sorted({r["device"] for r in rows}),
                 "diff": None, "p_value": None, "p_adjusted": None, "verdict": "", "frontier": []}
        for cost in COSTS:  # the same for every seed, or nearly (times): their mean
            values = [r[cost] for r in rows if r[cost] is not None]
            group[cost] = None if not values else (round(sum(values) / len(values)) if cost in COUNTS
                                                   else sum(values) / len(values))
        groups.append(group)
    groups.sort(key=lambda g: (g["acc"] is None, -(g["acc"].mean if g["acc"] else 0.0), g["label"]))
    scored = [g for g in groups if g["acc"]]
    for cost in COSTS:
        for group, on_frontier in zip(scored, stats.pareto([(g[cost], g["acc"].mean) for g in scored])):
            if on_frontier:
                group["frontier"].append(cost)
    return groups


def _labels(members: dict[str, list[dict]]) -> dict[str, str]:
    """A readable name per configuration: the architecture, then the config values that tell
    configurations apart (`cnn (optimizer.lr=0.0003)`), first keys the sweeps overrode, then how
    long they trained (BUDGET_KEYS), then the device and precision used, then names (`data.name`), then any.

    Every label names the training budget wherever it differs between configurations, so a
    one-epoch cnn_wide beside a ten-epoch cnn says it is one, and then other keys outside model.*
    (the architecture names those) until the labels differ; where one architecture still appears in
    several configurations, more of the keys that differ among them are named until every label differs."""
    configs = {i: rows[0]["config"] for i, rows in members.items()}
    overridden = {override_key(o) for rows in members.values() for r in rows for o in r["overrides"]}

    def differing(ids: list[str]) -> list[str]:
        found = [k for k in set().union(*(configs[i] for i in ids)) if len({configs[i].get(k) for i in ids}) > 1]
        # The device, then the precision, before the memory layout: they say what the machine chose
        # (cnnlab.tracking.repeats.USED_TAGS), and a CPU run beside a GPU run is named as one.
        return sorted(found, key=lambda k: (k not in overridden, k not in BUDGET_KEYS, k != "trainer.accelerator",
                                            k != "trainer.precision", not k.endswith(".name"), k))

    by_name: dict[str, list[str]] = defaultdict(list)
    for config_id, rows in members.items():
        by_name[rows[0]["architecture"]].append(config_id)

    def distinct(ids: list[str], shown: list[str]) -> bool:
        return len({(members[i][0]["architecture"], *(configs[i].get(k) for k in shown)) for i in ids}) == len(ids)

    # How long each trained, wherever that differs; then other keys until the labels differ.
    everywhere = [k for k in differing(list(configs)) if k in BUDGET_KEYS]
    for key in (k for k in differing(list(configs)) if not k.startswith("model.") and k not in BUDGET_KEYS):
        if distinct(list(configs), everywhere) or len(everywhere) >= MAX_LABEL_KEYS:
            break
        everywhere.append(key)
    labels = {}
    for name, ids in by_name.items():
        shown = list(everywhere)
        for key in (k for k in differing(ids) if k not in everywhere):
            if distinct(ids, shown) or len(shown) >= len(everywhere) + MAX_LABEL_KEYS:
                break
            shown.append(key)
        for i in ids:
            values = ", ".join(f"{k}={configs[i].get(k, '-')}" for k in shown)
            labels[i] = f"{name} ({values})" if shown else name
    counts = Counter(labels.values())  # still alike (more keys differ, or no params): the id tells them apart
    return {i: label if counts[label] == 1 else f"{label} [{i[:8]}]" for i, label in labels.items()}


def _baseline(groups: list[dict], wanted: str | None) -> tuple[dict | None, str]:
    """The group named `wanted` (a label, or an architecture only one group has), or None and why.
    The default baseline may be absent (a comparison without the documented CNN): no verdicts then."""
    name = wanted or DEFAULT_BASELINE
    for matches in ([g for g in groups if g["label"] == name], [g for g in groups if g["architecture"] == name]):
        if len(matches) == 1:
            if not matches[0]["acc"]:
                return None, f"the baseline `{name}` has no test accuracy: no tests"
            return matches[0], ""
        if len(matches) > 1:
            if wanted:
                raise CnnlabError(f"--baseline {wanted}: {len(matches)} configurations are {name}; name one: "
                                  + "; ".join(g["label"] for g in matches))
            return None, (f"{len(matches)} configurations are `{name}`: no tests until --baseline names one "
                          f"(" + "; ".join(f"`{g['label']}`" for g in matches) + ")")
    if wanted:
        raise CnnlabError(f"--baseline {wanted}: no such configuration; there are: "
                          + "; ".join(g["label"] for g in groups))
    return None, f"no configuration is the baseline `{name}` here: no tests (choose one with --baseline)"


def _test_against(groups: list[dict], base: dict | None, alpha: float) -> None:
    """Welch's test of each group against the baseline, adjusted for the number of tests; verdicts."""
    if base is None:
        return
    base["verdict"] = "baseline"
    tested = []
    for group in groups:
        if group is base or not group["acc"]:
            continue
        group["diff"] = group["acc"].mean - base["acc"].mean
        difference = stats.welch(group["test_values"], base["test_values"])
        if difference is None:
            few = group if group["seeds"] < 2 else base
            group["verdict"] = (f"{few['seeds']} seed{'s' if few['seeds'] != 1 else ''}"
                                f"{' (baseline)' if few is base else ''}: no test")
            continue
        group.update(diff_ci_low=difference.ci_low, diff_ci_high=difference.ci_high, p_value=difference.p_value)
        tested.append(group)
    for group, p_adjusted in zip(tested, stats.adjust([g["p_value"] for g in tested])):
        group["p_adjusted"] = p_adjusted
        real = p_adjusted < alpha
        group["verdict"] = ("better" if group["diff"] > 0 else "worse") if real else "within noise"


def _csv_group(group: dict) -> dict:
    acc = group["acc"]
    return {**group, "seed_list": " ".join(map(str, group["seed_list"])), "run_ids": " ".join(group["run_ids"]),
            "frontier": " ".join(group["frontier"]), "test_acc_mean": acc.mean if acc else None,
            "test_acc_std": acc.std if acc else None, "test_acc_ci_low": acc.ci_low if acc else None,
            "test_acc_ci_high": acc.ci_high if acc else None}


def _log_to_parent(client: MlflowClient, parent_id: str, result: Comparison, files: list[Path]) -> None:
    from mlflow.entities import Metric, RunTag

    """The report as artifacts, and per configuration its aggregates as metrics
    (`seeds/<label>/test_acc_mean`...) and the verdicts as tags, so the MLflow UI shows them."""
    metrics, names = [], set()
    stamp = int(datetime.now(timezone.utc).timestamp() * 1000)
    for group in result.groups:
        # MLflow keys allow letters, digits and _-. /; a slash inside a label would start a new level.
        name = re.sub(r"[^A-Za-z0-9_\-. ]+", "_", group["label"])[:180]
        if name in names:  # two labels alike once cleaned: the configuration id tells them apart
            name = f"{name} {group['configuration'][:8]}"
        names.add(name)
        row = _csv_group(group)
        metrics += [Metric(f"seeds/{name}/{key}", float(row[key]), stamp, 0)
                    for key in PARENT_METRICS if row[key] is not None]
    better = [g["label"] for g in result.groups if g["verdict"] == "better"]
    retry(client.log_batch, parent_id, tags=[
        RunTag("cnnlab.compare.task", result.task),
        RunTag("cnnlab.compare.other_tasks", ", ".join(g["label"] for g in result.other_tasks)[:5000] or "(none)"),
        RunTag("cnnlab.compare.baseline", result.baseline or "(none)"),
        RunTag("cnnlab.compare.better_than_baseline", ", ".join(better)[:5000] or "(none)")])
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        retry(client.log_batch, parent_id, metrics=metrics[i:i + 1000])
    for path in files:
        retry(client.log_artifact, parent_id, str(path), "report")


# --- formatting ----------------------------------------------------------------------------------

def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _points(value) -> str:
    """An accuracy difference in percentage points."""
    return "-" if value is None else f"{100 * value:+.2f}"


def _interval(low, high) -> str:
    return "-" if low is None else f"{low:.4f}-{high:.4f}"


FRONTIER_MARKS = {"params": "P", "macs": "M", "epoch_time_s": "T", "latency_ms": "L"}


def _group_columns(groups: list[dict], baseline: str | None) -> list[tuple[str, object, bool]]:
    """(header, group -> cell text, left-aligned) for each column of the configurations table."""
    columns = [
        ("configuration", lambda g: g["label"], True),
        ("seeds", lambda g: str(g["seeds"]), False),
        ("test acc", lambda g: "-" if not g["acc"] else f"{g['acc'].mean:.4f}"
         + (f" ± {g['acc'].std:.4f}" if g["acc"].std is not None else ""), False),
        ("95% CI", lambda g: _interval(g["acc"].ci_low, g["acc"].ci_high) if g["acc"] else "-", False),
    ]
    if baseline:
        columns += [
            (f"vs {baseline} (pts)", lambda g: _points(g["diff"]), False),
            ("p (adj.)", lambda g: "-" if g["p_value"] is None else f"{g['p_value']:.3g} ({g['p_adjusted']:.3g})",
             False),
            ("verdict", lambda g: g["verdict"], True),
        ]
    columns += [
        ("params", lambda g: _num(g["params"], ","), False),
        ("MACs", lambda g: _num(g["macs"], ","), False),
        ("s/epoch", lambda g: _num(g["epoch_time_s"], ".1f"), False),
        ("ms/img", lambda g: _num(g["latency_ms"], ".3f"), False),
        ("frontier", lambda g: "".join(FRONTIER_MARKS[c] for c in g["frontier"]) or "-", True),
    ]
    if len({g["data"] for g in groups}) > 1:  # accuracies on different datasets: say which is which
        columns.insert(1, ("data", lambda g: g["data"], True))
    return columns


def _run_columns(rows: list[dict]) -> list[tuple[str, object, bool]]:
    columns = [
        ("configuration", lambda r: r["label"], True),
        ("seed", lambda r: _num(r["seed"], "d"), False),
        ("run", lambda r: r["run_id"][:8], True),
        ("best val acc (epoch)", lambda r: "-" if r["best_val_acc"] is None
         else f"{r['best_val_acc']:.4f} ({_num(r['best_val_epoch'], 'd')})", False),
        ("test acc", lambda r: _num(r["test_acc"], ".4f"), False),
        ("s/epoch", lambda r: _num(r["epoch_time_s"], ".1f"), False),
    ]
    if any(r["status"] != "finished" for r in rows):
        columns.append(("status", lambda r: ": ".join(filter(None, (r["status"], r["error"]))), True))
    return columns


def _text_table(columns, items) -> str:
    cells = [[header for header, _, _ in columns]] + [[cell(i) for _, cell, _ in columns] for i in items]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def line(texts):
        padded = (t.ljust(w) if left else t.rjust(w) for t, w, (_, _, left) in zip(texts, widths, columns))
        return "  ".join(padded).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def _markdown_table(columns, items) -> str:
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join(" --- " if left else " ---: " for _, _, left in columns) + "|"]
    lines += ["| " + " | ".join(cell(i).replace("|", "\\|") for _, cell, _ in columns) + " |" for i in items]
    return "\n".join(lines)


def format_table(result: Comparison) -> str:
    """The configurations as a plain-text table with aligned columns."""
    return _text_table(_group_columns(result.groups, result.baseline), result.groups)


def _other_task_columns() -> list[tuple[str, object, bool]]:
    return [("configuration", lambda g: g["label"], True), ("seeds", lambda g: str(g["seeds"]), False),
            ("test acc", lambda g: "-" if not g["acc"] else f"{g['acc'].mean:.4f}", False),
            ("task", lambda g: g["task"], True), ("why apart", lambda g: g["reason"], True)]


def format_other_tasks(result: Comparison) -> str:
    """The configurations of tasks other than the compared one, with what differs."""
    return _text_table(_other_task_columns(), result.other_tasks)


def format_left_out(result: Comparison) -> str:
    """The runs left out of the statistics (failed, killed, running), as a table."""
    return _text_table(_run_columns(result.left_out), result.left_out)


def verdicts(result: Comparison, alpha: float = stats.ALPHA) -> list[str]:
    """One sentence per configuration tested against the baseline."""
    lines = []
    for g in result.groups:
        if g["verdict"] in ("better", "worse", "within noise"):
            beyond = {"better": "better beyond seed noise", "worse": "worse beyond seed noise",
                      "within noise": f"not distinguishable from seed noise at {alpha:g}"}[g["verdict"]]
            lines.append(f"{g['label']}: {_points(g['diff'])} points vs {result.baseline} (95% CI "
                         f"{_points(g['diff_ci_low'])} to {_points(g['diff_ci_high'])}), p = {g['p_value']:.3g}, "
                         f"adjusted {g['p_adjusted']:.3g}: {beyond}")
        elif g["verdict"].endswith("no test"):
            lines.append(f"{g['label']}: {_points(g['diff'])} points vs {result.baseline}; "
                         f"{g['verdict'].replace(': no test', '')}, so no test (repeat with seeds=3)")
    return lines


def _tally(values) -> str:
    counts = Counter(v or "unknown" for v in values)
    return ", ".join(f"{v} ({n} runs)" if len(counts) > 1 else v for v, n in counts.items())


def _report(result: Comparison, scopes, uri: str, filter_string: str | None, alpha: float) -> str:
    finished = [r for r in result.runs if r["status"] == "finished"]
    left_out = result.left_out
    parents = result.parents
    title = (parents[0].info.run_name if len(parents) == 1 and len(scopes) == 1
             else "; ".join(p.info.run_name for p in parents) if parents
             else "experiment " + ", ".join(exp.name for exp, _ in scopes))
    header = [f"- Compared: {_describe(scopes)}",
              f"- Task: `{result.task}`, {tasks.describe(tasks.split(result.task)[1])} (data/question@data checksum; "
              f"accuracies of other tasks are listed apart)"]
    for parent in parents:
        header.append(f"- Sweep `{parent.info.run_id}` ({parent.info.run_name}): overrides "
                      f"`{parent.data.tags.get(keys.OVERRIDES, '(unknown)')}`")
    if filter_string:
        header.append(f"- Filter: `{filter_string}` (a subset: not logged to the sweep's parent run)")
    experiment_ids = sorted({exp.experiment_id for exp, _ in scopes})
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header += [f"- Store: `{uri}`; browse it with `mlflow ui --backend-store-uri {uri}` and open "
               + ", ".join(f"`http://127.0.0.1:5000/{ui_path(i)}`" for i in experiment_ids) + " (Model training view)",
               f"- Runs: {len(finished)} finished in {len(result.groups)} configurations; "
               f"{len(left_out)} left out (listed apart, not averaged)",
               f"- Generated: {generated} by `cnnlab compare`"]

    lines = verdicts(result, alpha)
    if result.baseline is None:
        lines = [result.no_baseline[0].upper() + result.no_baseline[1:] + "."]
    elif not lines:
        lines = ["Only the baseline was compared."]
    notes = [f"- Dataset: {_tally(r['data'] for r in finished)}.",
             f"- Device: {_tally(r['device'] for r in finished)}. s/epoch: median wall-clock epoch, mean over seeds; "
             "ms/img: latency per image at batch 1.",
             "- A configuration is everything in a run's config but the seed and what only says where results go "
             "or how the machine is shared (`cnnlab.tracking.repeats`); its runs are its seeds.",
             "- test acc: mean ± sample standard deviation over seeds, of the checkpoint with the best validation "
             "accuracy; 95% CI: Student-t interval of the mean (none for one seed).",
             f"- Verdicts: Welch's two-sided t-test of each configuration's test accuracies against the baseline's; "
             f"p-values adjusted for the number of tests (Benjamini-Hochberg); 'better'/'worse' when the adjusted "
             f"p < {alpha:g}. Three seeds detect only differences several times the seed spread.",
             "- frontier: on the Pareto frontier of mean test accuracy against P parameters, M MACs, T time per "
             "epoch, L latency (no other configuration is at least as accurate for no more of that cost).",
             "- params: all parameters of the network; MACs: multiply-accumulates per image (Conv2d and Linear)."]
    if any(g["view"] for g in result.groups):
        notes.append(f"- `{VIEW.strip()}`: a ten-class model answering this binary task: the probabilities of its "
                     f"positive classes (model.positive_classes) summed, positive above 0.5, on the same test set "
                     f"(its run's `{keys.TEST_BINARY_ACC}`). Its parameters, MACs and times are the ten-class model's.")
    if result.other_tasks:
        notes.append("- A task is the data (name and files) and the question the head answers: accuracies of "
                     "different tasks are on different scales (a binary question scores about 0.5 by always "
                     "answering one side), so they are never compared (choose one with --task).")
    mixed = [g["label"] for g in result.groups if len(g["devices"]) > 1]
    if mixed:
        notes.append(f"- Seeds of {', '.join(mixed)} ran on different devices: their times and latencies are "
                     "averages over devices.")
    if len(result.groups) > MAX_CURVES:
        notes.append(f"- Learning curves show the {MAX_CURVES} configurations with the best mean test accuracy.")
    sections = [
        f"# cnnlab comparison: {title}", "", *header, "",
        "## Configurations, best mean test accuracy first", "",
        _markdown_table(_group_columns(result.groups, result.baseline), result.groups), "",
        f"## Against the baseline{f' `{result.baseline}`' if result.baseline else ''}", "",
        *[f"- {line}" for line in lines], "",
        "## Runs", "", _markdown_table(_run_columns(finished), finished), "",
    ]
    if result.other_tasks:
        sections += [f"## {OTHER_TASKS}", "", _markdown_table(_other_task_columns(), result.other_tasks), ""]
    if left_out:
        sections += [f"## {LEFT_OUT}", "", _markdown_table(_run_columns(left_out), left_out), ""]
    sections += ["## Notes", "", *notes, "", "## Plots", "",
                 *[f"![{caption}]({name})\n" for name, caption in PLOTS.items()]]
    return "\n".join(sections)


# --- plots ---------------------------------------------------------------------------------------

def _plots(groups: list[dict], curves: dict[str, list[list[tuple[int, float]]]]) -> dict[str, bytes]:
    """PNG bytes of each plot in PLOTS. Each configuration keeps one colour across the plots."""
    colors = {g["label"]: f"C{i % 10}" for i, g in enumerate(groups)}
    return {
        "test_acc_vs_params.png": _scatter(groups, colors, "params", "parameters (log scale)", log_x=True),
        "test_acc_vs_epoch_time.png": _scatter(groups, colors, "epoch_time_s", "time per epoch (s)", log_x=False),
        "val_acc_curves.png": _curves_plot(curves, colors),
    }


def _figure(title: str):
    # A bare Figure renders PNGs with Agg; no pyplot means no GUI backend and no global figure state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return fig, ax


def _png(fig) -> bytes:
    """The figure as PNG; its y axis is an accuracy, so it stops just above 1."""
    for ax in fig.axes:
        ax.set_ylim(top=min(ax.get_ylim()[1], 1.01))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _scatter(groups: list[dict], colors: dict, x_key: str, xlabel: str, log_x: bool) -> bytes:
    """Mean test accuracy against a cost, the 95% interval as error bars, the frontier dashed."""
    fig, ax = _figure(f"Test accuracy vs {xlabel.split(' (')[0]}")
    points = [g for g in groups if g[x_key] is not None and g["acc"]]
    for g in points:
        acc = g["acc"]
        below, above = (acc.mean - acc.ci_low, acc.ci_high - acc.mean) if acc.ci_low is not None else (0, 0)
        ax.errorbar(g[x_key], acc.mean, yerr=[[below], [above]], fmt="o", color=colors[g["label"]], capsize=4,
                    markersize=7, zorder=3)
        ax.annotate(f"{g['label']} (n={acc.n})", (g[x_key], acc.mean), xytext=(6, 4), textcoords="offset points",
                    fontsize=9)
    frontier = sorted((g[x_key], g["acc"].mean) for g in points if x_key in g["frontier"])
    if len(frontier) > 1:
        ax.step([x for x, _ in frontier], [y for _, y in frontier], where="post", linestyle="--", color="0.4",
                zorder=2, label="Pareto frontier")
        ax.legend(fontsize=9, loc="lower right")
    if log_x and points:
        from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

        xs = [g[x_key] for g in points]
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # "224k", not 2.24 x 10^5
        # Within one decade only minor ticks fall in range: label them, but only at 1.5, 2, 3, 5 and 7
        # times a power of ten, at least 0.13 decades apart: the default 2..9 put 800k, 900k and 1M
        # on top of each other. Across decades minor labels would crowd: none.
        ax.xaxis.set_minor_locator(LogLocator(subs=(1.5, 2, 3, 5, 7)))
        ax.xaxis.set_minor_formatter(EngFormatter(sep="") if max(xs) < 10 * min(xs) else NullFormatter())
    if not points:
        ax.text(0.5, 0.5, "no runs with these metrics", ha="center", transform=ax.transAxes)
    ax.margins(x=0.25, y=0.15)  # room for the labels
    ax.set(xlabel=xlabel, ylabel="test accuracy (mean, 95% CI)")
    return _png(fig)


def _curves_plot(curves: dict[str, list[list[tuple[int, float]]]], colors: dict) -> bytes:
    """Per configuration, the mean validation accuracy of its seeds by epoch, and a band from the
    lowest to the highest seed (epochs some seeds lack, after early stopping, average the others)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure("Validation accuracy by epoch")
    drawn = False
    for label, runs in curves.items():
        by_epoch: dict[int, list[float]] = defaultdict(list)
        for points in runs:
            for epoch, acc in points:
                by_epoch[epoch].append(acc)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        mean = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        ax.plot(epochs, mean, marker="o", color=colors[label], label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs],
                            color=colors[label], alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, "no validation history", ha="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation accuracy")
    return _png(fig)


# --- command line --------------------------------------------------------------------------------

@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnlab compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help="MLflow experiment(s), comma-separated (default: %(default)s)")
    parser.add_argument("--sweep", metavar="PARENT_RUN_ID",
                        help="compare sweeps' runs: parent run ids, comma-separated, or 'latest' (each --experiment's)")
    parser.add_argument("--filter", metavar="MLFLOW_FILTER",
                        help="only runs that also match this MLflow search filter, e.g. \"params.data.name = 'mnist'\"")
    parser.add_argument("--baseline", help=f"configuration the others are tested against (default: {DEFAULT_BASELINE}, "
                                           "when there is one)")
    parser.add_argument("--task", help="compare the runs of this task (as printed: data/question@checksum, or "
                                       "its question, e.g. 10-class or 0,2,4,6,8-vs-rest; default: the task most "
                                       "configurations were trained for)")
    parser.add_argument("--alpha", type=float, default=stats.ALPHA,
                        help="adjusted p-value below which a difference is called real (default: %(default)s)")
    parser.add_argument("--tracking-uri",
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's mlflow.db)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="report folder (default: %(default)s)")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    if not 0 < args.alpha < 1:
        raise CnnlabError(f"--alpha {args.alpha}: expected a number between 0 and 1")
    try:
        result = compare(args.experiment, args.sweep, args.tracking_uri, args.output, baseline=args.baseline,
                         filter_string=args.filter, alpha=args.alpha, task=args.task)
    except MlflowException as exc:  # store unreachable, bad URI scheme, a filter MLflow cannot parse...
        raise CnnlabError(f"MLflow: {str(exc.message).strip().splitlines()[0]}") from None
    parents = result.parents
    print(" and ".join(f"sweep {p.info.run_id}" for p in parents) if parents else f"experiment {args.experiment}",
          f"(task {result.task}: {tasks.describe(tasks.split(result.task)[1])})")
    print(format_table(result))
    lines = verdicts(result, args.alpha)
    if lines:
        print(f"\nAgainst {result.baseline} (Welch's t-test, Benjamini-Hochberg adjusted):")
        print("\n".join(f"  {line}" for line in lines))
    elif result.baseline is None:  # the verdict columns are missing: say why here, not only in report.md
        print(f"\nNo verdicts: {result.no_baseline}.")
    if result.other_tasks:
        print(f"\n{OTHER_TASKS} ({len(result.other_tasks)} configurations):")
        print(format_other_tasks(result))
    if result.left_out:
        print(f"\n{LEFT_OUT} ({len(result.left_out)} runs):")
        print(format_left_out(result))
    logged = f"; logged to run {parents[0].info.run_id} under report/" if len(parents) == 1 else ""
    print(f"\nwrote {Path(args.output) / 'report.md'} (with groups.csv, runs.csv and {len(PLOTS)} plots){logged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
