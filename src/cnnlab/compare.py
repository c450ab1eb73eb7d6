"""`cnnlab compare`: MLflow training runs side by side, as a table and a Markdown report.

MLflow's UI shows runs one metric at a time, but the question cnnlab asks is "which architecture
is best for its cost": accuracy next to size, compute and speed, plus the learning curves, in one
place that can be kept with the results. This reads an experiment's training runs (or one sweep's
jobs), prints that table, writes report.md, runs.csv and plots to a folder and, for a sweep, logs
the report onto the sweep's parent run so it travels with the runs it describes.

`compare(...)` is a plain function returning the table's rows; `main(argv)` is the CLI wrapper.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from mlflow.entities import Experiment, Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnlab import keys
from cnnlab.errors import CnnlabError, command
from cnnlab.files import csv_text, write_atomic
from cnnlab.tracking import close_orphaned_runs, default_http_settings, mlflow_env, retry, tracking_uri, ui_path

log = logging.getLogger(__name__)
DEFAULT_EXPERIMENT = "cnnlab"
DEFAULT_OUTPUT = "reports/compare"
MAX_CURVES = 10  # learning curves drawn, best runs first; more make the plot unreadable
ERROR_CHARS = 70  # errors are cut to one short line in the table (the run keeps the whole one)
PROGRESS_BAR_VAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # one bar per downloaded run would bury the table

# Row key -> the MLflow metric (final value) it is read from.
METRICS = {
    "params": keys.PARAMS,
    "macs": keys.MACS,
    "epoch_time_s": keys.MEDIAN_EPOCH_TIME,
    "best_val_acc": keys.BEST_VAL_ACC,
    "best_val_epoch": keys.BEST_VAL_EPOCH,
    "test_acc": keys.TEST_ACC,
}
COUNTS = {"params", "macs", "best_val_epoch"}  # stored as floats by MLflow, shown as integers
CSV_FIELDS = ("architecture", "run_id", "status", "data", *METRICS, "device", "parent_run_id", "error")
PLOTS = {
    "test_acc_vs_params.png": "Test accuracy vs parameters",
    "test_acc_vs_epoch_time.png": "Test accuracy vs time per epoch",
    "val_acc_curves.png": "Validation accuracy by epoch",
}


def compare(experiment: str = DEFAULT_EXPERIMENT, sweep: str | None = None, uri: str | None = None,
            output: str | Path = DEFAULT_OUTPUT, log_to_parent: bool = True) -> list[dict]:
    """Compare an experiment's training runs, or a sweep's (`sweep` = parent run id or "latest").

    Writes report.md, runs.csv and the plots to `output`; for a sweep also logs them to the parent
    run under report/ (unless log_to_parent is false). Returns the table's rows, best test accuracy
    first and unfinished runs last: dicts with the keys of CSV_FIELDS (None where a metric is missing).
    """
    uri = tracking_uri(uri)
    client = store_client(uri)
    exp, parent, runs = training_runs(client, uri, experiment, sweep)
    rows = _sorted([_row(run) for run in runs])
    finished = [r for r in rows if r["status"] == "finished"]
    if not finished:
        others = Counter(r["status"] for r in rows)
        detail = f" ({', '.join(f'{n} {status}' for status, n in others.items())})" if others else ""
        what = f"sweep {parent.info.run_id} ({parent.info.run_name})" if parent else f"experiment {exp.name!r}"
        raise CnnlabError(f"{what} has no finished training runs{detail}")

    out = Path(output)
    curves = {r["run_id"]: val_curve(client, r["run_id"]) for r in finished[:MAX_CURVES]}
    files = [write_atomic(out / name, data) for name, data in _plots(finished, curves).items()]
    files.append(write_atomic(out / "runs.csv", csv_text(CSV_FIELDS, rows)))
    files.append(write_atomic(out / "report.md", _report(rows, exp, parent, uri, len(curves))))
    if parent and log_to_parent:
        for path in files:
            retry(client.log_artifact, parent.info.run_id, str(path), "report")
    return rows


# --- reading MLflow ------------------------------------------------------------------------------

def training_runs(client: MlflowClient, uri: str, experiment: str,
                  sweep: str | None) -> tuple[Experiment, Run | None, list[Run]]:
    """The experiment, the sweep's parent run (when `sweep` names one, or is "latest") and its
    training runs, newest first; runs left RUNNING by a dead process are marked KILLED first."""
    exp, parent = _resolve(client, uri, experiment, sweep)
    for run_id in close_orphaned_runs(client, [exp.experiment_id]):  # listed as killed, not as running
        log.info("run %s was RUNNING but its process is gone: marked KILLED", run_id)
    query = f"tags.`{keys.ROLE}` = '{keys.ROLE_TRAIN}'"
    if parent:
        query += f" and tags.`{keys.PARENT_RUN}` = '{parent.info.run_id}'"
    return exp, parent, _search_all(client, exp.experiment_id, query)


def store_client(uri: str) -> MlflowClient:
    """A client of the store at `uri`, for reading: a missing SQLite file is an error, not a new store."""
    # MLflow would create an empty database at a mistyped path; a comparison only reads.
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        path = Path(uri.removeprefix("sqlite:///").split("?")[0])
        if not path.is_file():
            raise CnnlabError(f"no MLflow store at {path} (set --tracking-uri or MLFLOW_TRACKING_URI)")
    default_http_settings()  # MLflow's own would wait minutes on a dead server
    return MlflowClient(uri)


def _resolve(client: MlflowClient, uri: str, name: str, sweep: str | None) -> tuple[Experiment, Run | None]:
    """The experiment and, when comparing a sweep, its parent run."""
    if sweep and sweep != "latest":  # an explicit run id names its own experiment
        parent = _sweep_parent(client, uri, sweep)
        return retry(client.get_experiment, parent.info.experiment_id), parent
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
    runs, token = [], None
    while True:
        page = retry(client.search_runs, [experiment_id], filter_string, ViewType.ACTIVE_ONLY,
                      order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(run: Run) -> dict:
    tags, metrics = run.data.tags, run.data.metrics
    row = {"architecture": run.info.run_name or tags.get(keys.MODEL_NAME) or run.info.run_id[:8],
           "run_id": run.info.run_id, "status": run.info.status.lower(), "data": tags.get(keys.DATA_NAME, ""),
           "parent_run_id": tags.get(keys.PARENT_RUN, "")}
    for key, metric in METRICS.items():
        value = metrics.get(metric)
        row[key] = None if value is None else int(value) if key in COUNTS else float(value)
    row["device"] = tags.get(keys.DEVICE, "")
    error = (tags.get(keys.ERROR) or "").strip().split("\n")[0]
    row["error"] = error if len(error) <= ERROR_CHARS else error[:ERROR_CHARS - 3] + "..."
    return row


def _sorted(rows: list[dict]) -> list[dict]:
    """Finished runs by test accuracy (best first), then the others (newest first)."""
    finished = sorted((r for r in rows if r["status"] == "finished"),
                      key=lambda r: (r["test_acc"] is None, -(r["test_acc"] or 0.0), r["architecture"]))
    return finished + [r for r in rows if r["status"] != "finished"]


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


# --- formatting ----------------------------------------------------------------------------------

def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _columns(rows: list[dict]) -> list[tuple[str, object, bool]]:
    """(header, row -> cell text, left-aligned) for each table column."""
    columns = [
        ("architecture", lambda r: r["architecture"], True),
        ("run", lambda r: r["run_id"][:8], True),
        ("params", lambda r: _num(r["params"], ","), False),
        ("MACs", lambda r: _num(r["macs"], ","), False),
        ("s/epoch", lambda r: _num(r["epoch_time_s"], ".3f"), False),
        ("best val acc (epoch)", lambda r: "-" if r["best_val_acc"] is None
         else f"{r['best_val_acc']:.4f} ({_num(r['best_val_epoch'], 'd')})", False),
        ("test acc", lambda r: _num(r["test_acc"], ".4f"), False),
    ]
    if any(r["status"] != "finished" for r in rows):
        columns.append(("status", lambda r: "" if r["status"] == "finished"
                        else ": ".join(filter(None, (r["status"], r["error"]))), True))
    if len({r["data"] for r in rows}) > 1:  # accuracies on different datasets: say which is which
        columns.insert(2, ("data", lambda r: r["data"], True))
    return columns


def format_table(rows: list[dict]) -> str:
    """The rows as a plain-text table with aligned columns."""
    columns = _columns(rows)
    cells = [[header for header, _, _ in columns]] + [[cell(r) for _, cell, _ in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def line(texts):
        padded = (t.ljust(w) if left else t.rjust(w) for t, w, (_, _, left) in zip(texts, widths, columns))
        return "  ".join(padded).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def _markdown_table(rows: list[dict]) -> str:
    columns = _columns(rows)
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join(" --- " if left else " ---: " for _, _, left in columns) + "|"]
    lines += ["| " + " | ".join(cell(r).replace("|", "\\|") for _, cell, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def _tally(values) -> str:
    counts = Counter(v or "unknown" for v in values)
    return ", ".join(f"{v} ({n} runs)" if len(counts) > 1 else v for v, n in counts.items())


def _report(rows: list[dict], exp: Experiment, parent: Run | None, uri: str, n_curves: int) -> str:
    finished = [r for r in rows if r["status"] == "finished"]
    unfinished = len(rows) - len(finished)
    header = [f"- Experiment: `{exp.name}` (id {exp.experiment_id})"]
    if parent:
        title = parent.info.run_name  # "sweep model=cnn,cnn_sigmoid"
        overrides = parent.data.tags.get(keys.OVERRIDES, "(unknown)")
        header.append(f"- Sweep parent run: `{parent.info.run_id}` ({parent.info.run_name}), overrides `{overrides}`")
    else:
        title = f"experiment {exp.name}"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header += [f"- Store: `{uri}`; browse it with `mlflow ui --backend-store-uri {uri}` and open "
               f"`http://127.0.0.1:5000/{ui_path(exp.experiment_id)}` (the Model training view)",
               f"- Runs: {len(finished)} finished, {unfinished} not finished",
               f"- Generated: {generated} by `cnnlab compare`"]

    notes = [f"- Dataset: {_tally(r['data'] for r in finished)}.",
             f"- Device: {_tally(r['device'] for r in finished)}. Time per epoch: median wall-clock epoch on it.",
             "- params: all parameters of the network; MACs: multiply-accumulates per image (Conv2d and Linear).",
             "- Best val acc is the best epoch's validation accuracy; that epoch's checkpoint gives the test accuracy."]
    if len({r["data"] for r in finished}) > 1:
        notes.append("- The runs use different datasets: their accuracies are not comparable.")
    if unfinished:
        notes.append(f"- {unfinished} run(s) did not finish; they are listed last, with their error.")
    if len(finished) > n_curves:
        notes.append(f"- Learning curves show the {n_curves} runs with the best test accuracy.")

    return "\n".join([
        f"# cnnlab comparison: {title}", "", *header, "",
        "## Runs, best test accuracy first", "", _markdown_table(rows), "",
        "## Notes", "", *notes, "",
        "## Plots", "", *[f"![{caption}]({name})\n" for name, caption in PLOTS.items()],
    ])


# --- plots ---------------------------------------------------------------------------------------

def _plots(finished: list[dict], curves: dict[str, list[tuple[int, float]]]) -> dict[str, bytes]:
    """PNG bytes of each plot in PLOTS. Each run keeps one colour and label across the plots."""
    names = Counter(r["architecture"] for r in finished)
    style = {}
    for i, r in enumerate(finished):
        label = r["architecture"] if names[r["architecture"]] == 1 else f"{r['architecture']} ({r['run_id'][:8]})"
        style[r["run_id"]] = (label, f"C{i % 10}")
    return {
        "test_acc_vs_params.png": _scatter(finished, style, "params", "parameters (log scale)", log_x=True),
        "test_acc_vs_epoch_time.png": _scatter(finished, style, "epoch_time_s", "time per epoch (s)", log_x=False),
        "val_acc_curves.png": _curves_plot(curves, style),
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


def _scatter(rows: list[dict], style: dict, x_key: str, xlabel: str, log_x: bool) -> bytes:
    fig, ax = _figure(f"Test accuracy vs {xlabel.split(' (')[0]}")
    points = [r for r in rows if r[x_key] is not None and r["test_acc"] is not None]
    for r in points:
        label, color = style[r["run_id"]]
        ax.scatter(r[x_key], r["test_acc"], color=color, s=50, zorder=3)
        ax.annotate(label, (r[x_key], r["test_acc"]), xytext=(6, 4), textcoords="offset points", fontsize=9)
    if log_x and points:
        from matplotlib.ticker import EngFormatter, NullFormatter

        xs = [r[x_key] for r in points]
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # "224k", not 2.24 x 10^5
        # Within one decade only minor ticks fall in range: label them; across decades they crowd.
        ax.xaxis.set_minor_formatter(EngFormatter(sep="") if max(xs) < 10 * min(xs) else NullFormatter())
    if not points:
        ax.text(0.5, 0.5, "no runs with these metrics", ha="center", transform=ax.transAxes)
    ax.margins(x=0.25, y=0.15)  # room for the labels
    ax.set(xlabel=xlabel, ylabel="test accuracy")
    return _png(fig)


def _curves_plot(curves: dict[str, list[tuple[int, float]]], style: dict) -> bytes:
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure("Validation accuracy by epoch")
    for run_id, points in curves.items():
        if points:
            label, color = style[run_id]
            ax.plot([e for e, _ in points], [a for _, a in points], marker="o", color=color, label=label)
    if any(curves.values()):
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
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--sweep", metavar="PARENT_RUN_ID",
                        help="compare one sweep's runs: its parent run id, or 'latest' (in --experiment)")
    parser.add_argument("--tracking-uri",
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's mlflow.db)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="report folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        rows = compare(args.experiment, args.sweep, args.tracking_uri, args.output)
    except MlflowException as exc:  # store unreachable, bad URI scheme...
        raise CnnlabError(f"MLflow: {str(exc.message).strip().splitlines()[0]}") from None
    parent = rows[0]["parent_run_id"] if args.sweep else ""
    print(f"sweep {parent}" if parent else f"experiment {args.experiment}")
    print(format_table(rows))
    print(f"\nwrote {Path(args.output) / 'report.md'} (with runs.csv and {len(PLOTS)} plots)"
          + (f"; logged to run {parent} under report/" if parent else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
