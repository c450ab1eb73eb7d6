"""`cnnlab register`: put the best run of a comparison (or a given run) into the MLflow Model
Registry, under an alias such as `champion`.

"Best" is by a validation metric (`--metric`, default val/best_acc, the sweeps' optimized_metric):
the test set never selects a model. The new model version carries the run's metrics as tags and a
description saying how it was chosen, so the registry page answers "why this one". Then
`cnnlab predict --model models:/<name>@champion`, `mlflow.pytorch.load_model(...)` or
`mlflow models serve -m models:/<name>@champion` use it; moving the alias to another version
changes what they get, with no change on their side.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

from cnnlab.analysis.compare.runs import DEFAULT_EXPERIMENT, training_runs
from cnnlab.core import keys
from cnnlab.core.errors import CnnlabError, command, one_line
from cnnlab.tracking import tasks
from cnnlab.tracking.store import StoreClient, existing_store, global_store, store_client

if TYPE_CHECKING:  # MLflow itself is imported where it is used: `cnnlab register --help` does not wait for it
    from mlflow.entities import Run

DEFAULT_METRIC = keys.BEST_VAL_ACC
# What a model version records of its run (as tags, and in its description).
RECORDED_METRICS = (keys.BEST_VAL_ACC, keys.TEST_ACC, keys.TEST_LOSS, keys.PARAMS, keys.MACS, keys.MEDIAN_EPOCH_TIME,
                    keys.EVAL_MACRO_F1)
RECORDED_TAGS = (keys.MODEL_NAME, keys.DATA_NAME, keys.DATA_CHECKSUM, keys.TASK, keys.GIT_COMMIT, keys.PARENT_RUN)


def best_run(runs: list[Run], metric: str) -> Run:
    """The finished run with the highest `metric` (ties: the newest, which `runs` lists first)."""
    scored = [r for r in runs if r.info.status == "FINISHED" and math.isfinite(r.data.metrics.get(metric, math.nan))]
    if not scored:
        raise CnnlabError(f"no finished run has the metric {metric!r} (--metric)")
    return max(scored, key=lambda r: r.data.metrics[metric])


def one_task(runs: list[Run], wanted: str | None) -> tuple[list[Run], str]:
    """The finished runs of one task (cnnlab.tracking.tasks), and that task.

    With runs of several tasks and no --task, this refuses rather than choosing: a champion alias
    is used by predict and by servers with nobody looking, and the best validation accuracy of a
    binary task (about half is free) is no reason to swap a ten-class classifier for a yes/no one.
    The line lists the tasks, so narrowing takes one flag."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    by_task: dict[str, list[Run]] = {}
    for run in finished:
        by_task.setdefault(tasks.run_task(run.data.params, run.data.tags), []).append(run)
    if wanted:
        found = [t for t in by_task if tasks.matches(t, wanted)]
        if len(found) != 1:
            raise CnnlabError(f"--task {wanted}: {'matches ' + str(len(found)) if found else 'matches none'} of the "
                              f"tasks of these runs: {', '.join(sorted(by_task)) or '(no finished runs)'}")
        return by_task[found[0]], found[0]
    if len(by_task) > 1:
        listed = "; ".join(f"{t} ({tasks.describe(tasks.split(t)[1])}: {len(rs)} runs)"
                           for t, rs in sorted(by_task.items(), key=lambda item: -len(item[1])))
        raise CnnlabError(f"the candidate runs solve {len(by_task)} different tasks, whose accuracies are not "
                          f"comparable: {listed}; choose one with --task (or a run with --run)")
    [(task, chosen)] = by_task.items() or [("", [])]
    return chosen, task


def _chosen_run(client: StoreClient, uri: str, run_id: str | None, experiment: str, sweep: str | None,
                metric: str, task: str | None = None) -> tuple[Run, str]:
    """The run to register, and how it was chosen (for the version's description)."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise CnnlabError(f"--run {run_id}: no such run in {uri}") from None
        if run.info.status != "FINISHED":
            raise CnnlabError(f"--run {run_id}: the run is {run.info.status}, not FINISHED: it has no final model")
        return run, "chosen by hand (--run)"
    _, parent, runs = training_runs(client, uri, experiment, sweep)
    candidates, chosen_task = one_task(runs, task)
    run = best_run(candidates, metric)
    where = f"sweep {parent.info.run_id} ({parent.info.run_name})" if parent else f"experiment {experiment!r}"
    return run, f"the best of {len(candidates)} finished runs of {where} (task {chosen_task}) by {metric}"


def logged_model_id(client: StoreClient, run: Run) -> str:
    """The id of the model a run logged (MLflow 3 keeps it as a LoggedModel of the run, not as
    run artifacts, so `runs:/<id>/model` is not a registrable source on its own)."""
    found, token = [], None
    while True:
        page = client.search_logged_models([run.info.experiment_id],
                                           filter_string=f"name = '{keys.MODEL_ARTIFACT}'", page_token=token)
        found += [m for m in page if m.source_run_id == run.info.run_id]
        token = page.token
        if not token:
            break
    if not found:
        raise CnnlabError(f"run {run.info.run_id} ({run.info.run_name}) logged no model to register "
                          f"(was callbacks.mlflow_model off?)")
    return max(found, key=lambda m: m.creation_timestamp).model_id


def register(name: str, alias: str = "champion", run_id: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
             sweep: str | None = None, metric: str = DEFAULT_METRIC, uri: str | None = None,
             task: str | None = None) -> dict:
    """Register the chosen run's model as a new version of `name`, point `alias` at it, and
    return what was done (name, version, alias, run id, metrics)."""
    if metric.startswith("test/"):
        raise CnnlabError(f"--metric {metric}: the test set never selects a model; use a validation metric "
                          f"such as {DEFAULT_METRIC}")
    from mlflow.exceptions import MlflowException

    uri = existing_store(uri)
    client = store_client(uri)  # runs and the model registry in the same store
    run, how = _chosen_run(client, uri, run_id, experiment, sweep, metric, task)
    metrics = {k: run.data.metrics[k] for k in RECORDED_METRICS if k in run.data.metrics}
    tags = {**{k: run.data.tags[k] for k in RECORDED_TAGS if k in run.data.tags},
            **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()}, "cnnlab.selected_by": how}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="cnnlab classifiers: one version per registered run")
    model_id = logged_model_id(client, run)
    model = _model_card(uri, model_id)
    if model.get("class_names"):  # the registry page shows what the model answers
        tags["class_names"] = json.dumps(model["class_names"], ensure_ascii=False)  # a name may hold a comma
    description = f"{run.info.run_name} (run {run.info.run_id}), {how}. {summary}. {_input_and_output(model)}"
    with global_store(uri):
        version = client.create_model_version(name, f"models:/{model_id}", run_id=run.info.run_id, tags=tags,
                                              description=description, model_id=model_id)
    client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": int(version.version), "alias": alias, "run_id": run.info.run_id,
            "run_name": run.info.run_name, "selected_by": how, "metrics": metrics, "tracking_uri": uri}


def _model_card(uri: str, model_id: str) -> dict:
    """What the logged model says of its input and classes (its MLflow metadata,
    cnnlab.training.callbacks.model_metadata); empty when it cannot be read."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with global_store(uri):
            return dict(mlflow.models.get_model_info(f"models:/{model_id}").metadata or {})
    except (MlflowException, OSError):
        return {}


DESCRIBED_CLASSES = 20  # class names a version's description lists


def _input_and_output(model: dict) -> str:
    """The version's description of what goes in and what comes out."""
    shape = model.get("input_shape") or ["channels", "height", "width"]
    if model.get(keys.MODEL_PIXELS, keys.PIXELS_LIGHT_ON_DARK) == keys.PIXELS_LIGHT_ON_DARK:
        look = "grayscale, light on dark"
    else:
        look = f"{'RGB' if shape[0] == 3 else 'grayscale'}, padded to a square and resized as its training images were"
    classes = model.get("class_names")
    if classes:
        # MLflow keeps a description in a 5000-character column (enforced by Postgres and MySQL): name
        # the first few classes only; the version's class_names tag holds them all.
        listed = ", ".join(classes[:DESCRIBED_CLASSES])
        if len(classes) > DESCRIBED_CLASSES:
            listed += f", ... and {len(classes) - DESCRIBED_CLASSES} more"
        out = f"probabilities of {len(classes)} classes: {listed}"
    else:
        out = "class probabilities"
    return (f"Input: images as pixel values in [0, 1], {look}, shaped (N, {', '.join(map(str, shape))}); "
            f"output: {out}.")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnlab register", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="cnnlab", help="registered model name (default: %(default)s)")
    parser.add_argument("--alias", default="champion", help="alias pointed at the new version (default: %(default)s)")
    parser.add_argument("--run", default=None, help="register this run instead of choosing the best one")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--sweep", metavar="PARENT_RUN_ID",
                        help="choose among one sweep's runs: its parent run id, or 'latest' (in --experiment)")
    parser.add_argument("--task", help="choose among the runs of this task only (as `cnnlab compare` prints it, "
                                       "or its question: 10-class, 0,2,4,6,8-vs-rest); needed when they span several")
    parser.add_argument("--metric", default=DEFAULT_METRIC,
                        help="validation metric the best run has the highest of (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's "
                                               "mlflow.db)")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        done = register(args.name, args.alias, args.run, args.experiment, args.sweep, args.metric, args.tracking_uri,
                        args.task)
    except MlflowException as exc:  # store unreachable, registry not supported by this store...
        raise CnnlabError(f"MLflow: {one_line(exc)[:300]}") from None
    scores = ", ".join(f"{k} {v:.4f}" for k, v in done["metrics"].items() if k in (keys.BEST_VAL_ACC, keys.TEST_ACC))
    print(f"registered models:/{done['name']}/{done['version']} (@{done['alias']}) from run {done['run_id']} "
          f"({done['run_name']}; {scores}), {done['selected_by']}")
    print(f"use it: cnnlab predict --model models:/{done['name']}@{done['alias']} IMAGE...; "
          f"serve it: mlflow models serve -m models:/{done['name']}@{done['alias']} --env-manager local")
    return 0


if __name__ == "__main__":
    sys.exit(main())
