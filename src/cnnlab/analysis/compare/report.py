"""The comparison's tables, its markdown report, and the report logged to a sweep's parent run."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.analysis import stats
from cnnlab.analysis.compare.charts import MAX_CURVES, PLOTS
from cnnlab.analysis.compare.groups import COSTS, VIEW, Group
from cnnlab.analysis.compare.runs import METRICS, RunRow, _describe
from cnnlab.core import keys
from cnnlab.tracking import tasks
from cnnlab.tracking.store import ui_path

if TYPE_CHECKING:
    from mlflow.entities import Run

    from cnnlab.tracking.store import StoreClient

OTHER_TASKS = "Other tasks: not on this accuracy scale, so not tested, ranked or on any frontier"
LEFT_OUT = "Not included: failed, killed, still running, or a seed repeated by a newer run"
CSV_FIELDS = ("label", "architecture", "seed", "run_id", "status", "task", "data", *METRICS, "binary_acc", "device",
              "configuration", "parent_run_id", "experiment_id", "error")
GROUP_FIELDS = ("label", "architecture", "task", "data", "seeds", "seed_list", "test_acc_mean", "test_acc_std",
                "test_acc_ci_low", "test_acc_ci_high", "best_val_acc_mean", "best_val_acc_std", *COSTS,
                "diff", "diff_ci_low", "diff_ci_high", "p_value", "p_adjusted", "verdict", "frontier",
                "configuration", "run_ids")
# What the sweep's parent run gets per configuration, as metrics seeds/<label>/<field>.
PARENT_METRICS = ("seeds", "test_acc_mean", "test_acc_std", "test_acc_ci_low", "test_acc_ci_high", "diff", "p_value",
                  "p_adjusted")


@dataclass
class Comparison:
    """What `compare` found: configurations (best mean test accuracy first), every run (finished
    first), the baseline's label (None when there is none) and the sweep parent runs compared."""

    groups: list[Group]
    runs: list[RunRow]
    baseline: str | None
    parents: list[Run] = field(default_factory=list)
    no_baseline: str = ""  # why there is no baseline, when there is none
    task: str = ""         # the task of `groups` (cnnlab.tracking.tasks): what their accuracies measure
    other_tasks: list[Group] = field(default_factory=list)  # groups of other tasks, each with its reason

    @property
    def left_out(self) -> list[RunRow]:
        """Runs not in the statistics: failed, killed, running, or a seed a newer run repeated."""
        return [r for r in self.runs if r.status != "finished"]


def _csv_group(group: Group) -> dict:
    acc = group.acc
    return {**group.as_dict(), "seed_list": " ".join(map(str, group.seed_list)), "run_ids": " ".join(group.run_ids),
            "frontier": " ".join(group.frontier), "test_acc_mean": acc.mean if acc else None,
            "test_acc_std": acc.std if acc else None, "test_acc_ci_low": acc.ci_low if acc else None,
            "test_acc_ci_high": acc.ci_high if acc else None}


def _log_to_parent(client: StoreClient, parent_id: str, result: Comparison, files: list[Path]) -> None:
    from mlflow.entities import Metric, RunTag

    """The report as artifacts, and per configuration its aggregates as metrics
    (`seeds/<label>/test_acc_mean`...) and the verdicts as tags, so the MLflow UI shows them."""
    metrics, names = [], set()
    stamp = int(datetime.now(timezone.utc).timestamp() * 1000)
    for group in result.groups:
        # MLflow keys allow letters, digits and _-. /; a slash inside a label would start a new level.
        name = re.sub(r"[^A-Za-z0-9_\-. ]+", "_", group.label)[:180]
        if name in names:  # two labels alike once cleaned: the configuration id tells them apart
            name = f"{name} {group.configuration[:8]}"
        names.add(name)
        row = _csv_group(group)
        metrics += [Metric(f"seeds/{name}/{key}", float(row[key]), stamp, 0)
                    for key in PARENT_METRICS if row[key] is not None]
    better = [g.label for g in result.groups if g.verdict == "better"]
    client.log_batch(parent_id, tags=[
        RunTag("cnnlab.compare.task", result.task),
        RunTag("cnnlab.compare.other_tasks", ", ".join(g.label for g in result.other_tasks)[:5000] or "(none)"),
        RunTag("cnnlab.compare.baseline", result.baseline or "(none)"),
        RunTag("cnnlab.compare.better_than_baseline", ", ".join(better)[:5000] or "(none)")])
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(parent_id, metrics=metrics[i:i + 1000])
    for path in files:
        client.log_artifact(parent_id, str(path), "report")


# --- formatting ----------------------------------------------------------------------------------

def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _points(value) -> str:
    """An accuracy difference in percentage points."""
    return "-" if value is None else f"{100 * value:+.2f}"


def _interval(low, high) -> str:
    # Bracketed: "0.7012-0.8123" read as a subtraction once a bound was negative (2 seeds, a wide t)
    return "-" if low is None else f"[{low:.4f},{high:.4f}]"


FRONTIER_MARKS = {"params": "P", "macs": "M", "epoch_time_s": "T", "latency_ms": "L"}


def _group_columns(groups: list[Group], baseline: str | None) -> list[tuple[str, object, bool]]:
    """(header, group -> cell text, left-aligned) for each column of the configurations table."""
    columns = [
        ("configuration", lambda g: g.label, True),
        ("seeds", lambda g: str(g.seeds), False),
        ("test acc", lambda g: "-" if not g.acc else f"{g.acc.mean:.4f}"
         + (f" ± {g.acc.std:.4f}" if g.acc.std is not None else ""), False),
        ("95% CI", lambda g: _interval(g.acc.ci_low, g.acc.ci_high) if g.acc else "-", False),
    ]
    if baseline:
        columns += [
            (f"vs {baseline} (pts)", lambda g: _points(g.diff), False),
            ("p (adj.)", lambda g: "-" if g.p_value is None else f"{g.p_value:.3g} ({g.p_adjusted:.3g})",
             False),
            ("verdict", lambda g: g.verdict, True),
        ]
    columns += [
        ("params", lambda g: _num(g.params, ","), False),
        ("MACs", lambda g: _num(g.macs, ","), False),
        ("s/epoch", lambda g: _num(g.epoch_time_s, ".1f"), False),
        ("ms/img", lambda g: _num(g.latency_ms, ".3f"), False),
        ("frontier", lambda g: "".join(FRONTIER_MARKS[c] for c in g.frontier) or "-", True),
    ]
    if len({g.data for g in groups}) > 1:  # accuracies on different datasets: say which is which
        columns.insert(1, ("data", lambda g: g.data, True))
    return columns


def _run_columns(rows: list[RunRow]) -> list[tuple[str, object, bool]]:
    columns = [
        ("configuration", lambda r: r.label, True),
        ("seed", lambda r: _num(r.seed, "d"), False),
        ("run", lambda r: r.run_id[:8], True),
        ("best val acc (epoch)", lambda r: "-" if r.best_val_acc is None
         else f"{r.best_val_acc:.4f} ({_num(r.best_val_epoch, 'd')})", False),
        ("test acc", lambda r: _num(r.test_acc, ".4f"), False),
        ("s/epoch", lambda r: _num(r.epoch_time_s, ".1f"), False),
    ]
    if any(r.status != "finished" for r in rows):
        columns.append(("status", lambda r: ": ".join(filter(None, (r.status, r.error))), True))
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
    return [("configuration", lambda g: g.label, True), ("seeds", lambda g: str(g.seeds), False),
            ("test acc", lambda g: "-" if not g.acc else f"{g.acc.mean:.4f}", False),
            ("task", lambda g: g.task, True), ("why apart", lambda g: g.reason, True)]


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
        if g.verdict in ("better", "worse", "within noise"):
            beyond = {"better": "better beyond seed noise", "worse": "worse beyond seed noise",
                      "within noise": f"not distinguishable from seed noise at {alpha:g}"}[g.verdict]
            lines.append(f"{g.label}: {_points(g.diff)} points vs {result.baseline} (95% CI "
                         f"{_points(g.diff_ci_low)} to {_points(g.diff_ci_high)}), p = {g.p_value:.3g}, "
                         f"adjusted {g.p_adjusted:.3g}: {beyond}")
        elif g.verdict.endswith("no test"):
            lines.append(f"{g.label}: {_points(g.diff)} points vs {result.baseline}; "
                         f"{g.verdict.replace(': no test', '')}, so no test (repeat with seeds=3)")
    return lines


def _tally(values) -> str:
    counts = Counter(v or "unknown" for v in values)
    return ", ".join(f"{v} ({n} runs)" if len(counts) > 1 else v for v, n in counts.items())


def _report(result: Comparison, scopes, uri: str, filter_string: str | None, alpha: float) -> str:
    finished = [r for r in result.runs if r.status == "finished"]
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
    notes = [f"- Dataset: {_tally(r.data for r in finished)}.",
             f"- Device: {_tally(r.device for r in finished)}. s/epoch: median wall-clock epoch, mean over seeds; "
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
    if any(g.view for g in result.groups):
        notes.append(f"- `{VIEW.strip()}`: a ten-class model answering this binary task: the probabilities of its "
                     f"positive classes (model.positive_classes) summed, positive above 0.5, on the same test set "
                     f"(its run's `{keys.TEST_BINARY_ACC}`). Its parameters, MACs and times are the ten-class model's.")
    if result.other_tasks:
        notes.append("- A task is the data (name and files) and the question the head answers: accuracies of "
                     "different tasks are on different scales (a binary question scores about 0.5 by always "
                     "answering one side), so they are never compared (choose one with --task).")
    mixed = [g.label for g in result.groups if len(g.devices) > 1]
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

