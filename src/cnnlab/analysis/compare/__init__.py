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
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from cnnlab.analysis import stats
from cnnlab.analysis.compare.charts import MAX_CURVES, PLOTS, _plots
from cnnlab.analysis.compare.groups import (
    DEFAULT_BASELINE,
    VIEW,
    Group,
    _baseline,
    _binary_views,
    _groups,
    _main_task,
    _one_run_per_seed,
    _sorted,
    _test_against,
    labelled,
)
from cnnlab.analysis.compare.report import (
    CSV_FIELDS,
    GROUP_FIELDS,
    LEFT_OUT,
    OTHER_TASKS,
    Comparison,
    _csv_group,
    _log_to_parent,
    _report,
    format_left_out,
    format_other_tasks,
    format_table,
    verdicts,
)
from cnnlab.analysis.compare.runs import (
    DEFAULT_EXPERIMENT,
    RunRow,
    _describe,
    _names,
    _row,
    _runs_in,
    _scopes,
    training_runs,
    val_curve,
)
from cnnlab.core.errors import CnnlabError, command
from cnnlab.core.files import csv_text, write_atomic
from cnnlab.tracking import tasks
from cnnlab.tracking.store import existing_store, store_client

__all__ = ["CSV_FIELDS", "DEFAULT_BASELINE", "DEFAULT_EXPERIMENT", "DEFAULT_OUTPUT", "GROUP_FIELDS", "PLOTS", "VIEW",
           "Comparison", "Group", "RunRow", "compare", "format_left_out", "format_other_tasks", "format_table", "main",
           "training_runs", "val_curve", "verdicts"]
DEFAULT_OUTPUT = "reports/compare"


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
    if not any(r.status == "finished" for r in rows):
        others = Counter(r.status for r in rows)
        detail = f" ({', '.join(f'{n} {status}' for status, n in others.items())})" if others else ""
        raise CnnlabError(f"{_describe(scopes)} {'has' if len(scopes) == 1 else 'have'} no finished training "
                          f"runs{detail}{' matching the filter' if filter_string else ''}")

    rows = _one_run_per_seed(rows)
    counted = [r for r in rows if r.status == "finished"]
    by_task: dict[str, list[RunRow]] = defaultdict(list)
    for row in counted + _binary_views(counted):
        by_task[row.task].append(row)
    grouped = {t: _groups(members) for t, members in by_task.items()}
    rows = labelled(rows, [g for gs in grouped.values() for g in gs if not g.view])
    chosen = _main_task(grouped, baseline, task)
    groups = grouped.pop(chosen)
    # Another task's frontier is on another scale: none is claimed for them.
    others = [replace(g, frontier=(), reason=tasks.difference(chosen, t)) for t, gs in grouped.items() for g in gs]
    base, why_none = _baseline(groups, baseline)
    groups = _test_against(groups, base, alpha)
    parents = [parent for _, parent in scopes if parent]
    result = Comparison(groups, rows, base.label if base else None, parents, why_none, chosen, others)

    out = Path(output)
    # A view's validation curve is the ten-class one: not on this task's scale, so not drawn.
    curves = {g.label: [val_curve(client, run_id) for run_id in g.run_ids]
              for g in [g for g in groups if not g.view][:MAX_CURVES]}
    files = [write_atomic(out / name, data) for name, data in _plots(groups, curves).items()]
    files.append(write_atomic(out / "groups.csv", csv_text(GROUP_FIELDS, [_csv_group(g) for g in groups + others])))
    files.append(write_atomic(out / "runs.csv", csv_text(CSV_FIELDS, [r.as_dict() for r in rows])))
    files.append(write_atomic(out / "report.md", _report(result, scopes, uri, filter_string, alpha)))
    # A filtered subset is not the sweep's result: it would overwrite the sweep's aggregates.
    if len(parents) == 1 and log_to_parent and not filter_string:
        _log_to_parent(client, parents[0].info.run_id, result, files)
    return result


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
