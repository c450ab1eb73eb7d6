"""Pure comparison logic over rows: runs grouped by configuration into frozen `Group`s, their
labels, Welch's test against a baseline with Benjamini-Hochberg adjusted p-values and a verdict,
and the Pareto frontier (cnnlab.analysis.stats). No MLflow: tests feed `RunRow`s in directly."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, replace

from cnnlab.analysis import stats
from cnnlab.analysis.compare.runs import COUNTS, Record, RunRow
from cnnlab.core.errors import CnnlabError
from cnnlab.tracking import tasks
from cnnlab.tracking.repeats import override_key

DEFAULT_BASELINE = "cnn"  # the documented CNN of the design notes
MAX_LABEL_KEYS = 3  # config keys named in a label that must tell apart configurations of one architecture
# How long and on how much a model trained: named first in labels, where they differ (a short run
# beside full ones must say so).
BUDGET_KEYS = ("trainer.max_epochs", "trainer.limit_train_batches", "trainer.max_steps", "trainer.max_time")
VIEW = " [softmax summed]"  # a ten-class model's answer to a binary task (cnnlab.tracking.tasks.binary_view)
# The costs accuracy is weighed against: row key -> how the report names it.
COSTS = {"params": "parameters", "macs": "MACs", "epoch_time_s": "time per epoch", "latency_ms": "latency"}


@dataclass(frozen=True)
class Group(Record):  # as_dict is shallow: `acc` stays a Summary
    """One configuration: its seeds' runs and what they say. `acc` summarizes the test accuracies
    (None when no run has one); the cost figures are the mean over its runs. Filled in by
    `test_against`: the difference to the baseline, its interval, p-values and the verdict."""

    label: str
    architecture: str
    data: str
    task: str
    view: bool               # a ten-class configuration seen in a binary task (label ends in VIEW)
    configuration: str       # the configuration id its runs share
    seeds: int               # runs with a test accuracy
    seed_list: tuple[int, ...]
    acc: stats.Summary | None
    test_values: tuple[float, ...]
    best_val_acc_mean: float | None
    best_val_acc_std: float | None
    run_ids: tuple[str, ...]  # best test accuracy first
    devices: tuple[str, ...]
    params: int | None = None
    macs: int | None = None
    epoch_time_s: float | None = None
    latency_ms: float | None = None
    diff: float | None = None
    diff_ci_low: float | None = None
    diff_ci_high: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    verdict: str = ""        # "baseline", "better", "worse", "within noise", "<n> seed(s)...: no test" or ""
    frontier: tuple[str, ...] = ()  # the COSTS on whose Pareto frontier it lies
    reason: str = ""         # for a group of another task: why it is apart (cnnlab.tracking.tasks.difference)


def _sorted(rows: list[RunRow]) -> list[RunRow]:
    """Finished runs by test accuracy (best first), then the others (newest first)."""
    finished = sorted((r for r in rows if r.status == "finished"),
                      key=lambda r: (r.test_acc is None, -(r.test_acc or 0.0), r.architecture))
    return finished + [r for r in rows if r.status != "finished"]


def _one_run_per_seed(rows: list[RunRow]) -> list[RunRow]:
    """`rows` with each older finished run of a (task, configuration, seed) marked `superseded` (a
    sweep run twice, a seed retrained): the same seed twice is one measurement, not two. The newest
    counts. A run on other data (an image folder whose files changed) measures another task and is
    never superseded by it."""
    newest: dict[tuple[str, str, int], RunRow] = {}
    replaced: dict[str, RunRow] = {}
    for row in sorted((r for r in rows if r.status == "finished"), key=lambda r: -r.start_time):
        if row.seed is None:
            continue
        kept = newest.setdefault((row.task, row.configuration, row.seed), row)
        if kept is not row:
            replaced[row.run_id] = replace(row, status="superseded",
                                           error=f"seed {row.seed} again in newer run {kept.run_id[:8]}")
    return [replaced.get(r.run_id, r) for r in rows]


def _binary_views(rows: list[RunRow]) -> list[RunRow]:
    """Each ten-class run again, in the binary task of its model.positive_classes, scored by its
    summed softmax probabilities (keys.TEST_BINARY_ACC, measured on the test set by the run), when
    the runs compared include one trained for that binary task: "does a dedicated sigmoid head
    beat the ten-class model on the binary question" then has an answer on one scale. Its
    validation accuracy is the ten-class one, so it is left out (no val columns, no curve)."""
    binary_tasks = {r.task for r in rows}
    return [replace(r, task=r.binary_view, test_acc=r.binary_acc, best_val_acc=None, best_val_epoch=None,
                    configuration=f"{r.configuration}+summed", view=True)
            for r in rows if r.binary_view in binary_tasks and r.binary_acc is not None]


def _main_task(grouped: dict[str, list[Group]], baseline: str | None, wanted: str | None) -> str:
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
    holding = [t for t, gs in grouped.items() if any(name in (g.label, g.architecture) for g in gs)]
    return max(holding or grouped, key=lambda t: (sum(not g.view for g in grouped[t]), len(grouped[t]),
                                                  sum(g.seeds for g in grouped[t]), t))


def labelled(rows: list[RunRow], groups: list[Group]) -> list[RunRow]:
    """The finished rows with their configuration's label (from the groups of their task)."""
    label = {(g.task, g.configuration): g.label for g in groups}
    return [replace(r, label=label[r.task, r.configuration])
            if r.status == "finished" and (r.task, r.configuration) in label else r for r in rows]


def _groups(finished: list[RunRow]) -> list[Group]:
    """One group per configuration: its runs' seeds and statistics, best mean test accuracy first,
    with the costs on whose frontier it is. (`labelled` gives the rows their group's label.)"""
    members: dict[str, list[RunRow]] = defaultdict(list)
    for row in finished:
        members[row.configuration].append(row)
    labels = _labels(members)
    groups = []
    for config_id, rows in members.items():
        first = rows[0]
        scored = [r for r in rows if r.test_acc is not None]
        acc = stats.summarize([r.test_acc for r in scored]) if scored else None
        val = [r.best_val_acc for r in rows if r.best_val_acc is not None]
        val_summary = stats.summarize(val) if val else None
        costs = {}
        for cost in COSTS:  # the same for every seed, or nearly (times): their mean
            values = [getattr(r, cost) for r in rows if getattr(r, cost) is not None]
            costs[cost] = None if not values else (round(sum(values) / len(values)) if cost in COUNTS
                                                   else sum(values) / len(values))
        groups.append(Group(
            label=labels[config_id] + (VIEW if first.view else ""), architecture=first.architecture,
            data=first.data, task=first.task, view=first.view, configuration=config_id,
            seeds=acc.n if acc else 0, seed_list=tuple(sorted(r.seed for r in scored if r.seed is not None)),
            acc=acc, test_values=tuple(r.test_acc for r in scored),
            best_val_acc_mean=val_summary.mean if val_summary else None,
            best_val_acc_std=val_summary.std if val_summary else None,
            run_ids=tuple(r.run_id for r in sorted(rows, key=lambda r: -(r.test_acc or 0.0))),
            devices=tuple(sorted({r.device for r in rows})), **costs))
    groups.sort(key=lambda g: (g.acc is None, -(g.acc.mean if g.acc else 0.0), g.label))
    scored = [g for g in groups if g.acc]
    frontier: dict[str, list[str]] = defaultdict(list)
    for cost in COSTS:
        for group, on_frontier in zip(scored, stats.pareto([(getattr(g, cost), g.acc.mean) for g in scored])):
            if on_frontier:
                frontier[group.configuration].append(cost)
    return [replace(g, frontier=tuple(frontier[g.configuration])) if g.configuration in frontier else g
            for g in groups]


def _labels(members: dict[str, list[RunRow]]) -> dict[str, str]:
    """A readable name per configuration: the architecture, then the config values that tell
    configurations apart (`cnn (optimizer.lr=0.0003)`), first keys the sweeps overrode, then how
    long they trained (BUDGET_KEYS), then the device and precision used, then names (`data.name`), then any.

    Every label names the training budget wherever it differs between configurations, so a
    one-epoch cnn_wide beside a ten-epoch cnn says it is one, and then other keys outside model.*
    (the architecture names those) until the labels differ; where one architecture still appears in
    several configurations, more of the keys that differ among them are named until every label differs."""
    configs = {i: rows[0].config for i, rows in members.items()}
    overridden = {override_key(o) for rows in members.values() for r in rows for o in r.overrides}

    def differing(ids: list[str]) -> list[str]:
        found = [k for k in set().union(*(configs[i] for i in ids)) if len({configs[i].get(k) for i in ids}) > 1]
        # The device, then the precision, before the memory layout: they say what the machine chose
        # (cnnlab.tracking.repeats.USED_TAGS), and a CPU run beside a GPU run is named as one.
        return sorted(found, key=lambda k: (k not in overridden, k not in BUDGET_KEYS, k != "trainer.accelerator",
                                            k != "trainer.precision", not k.endswith(".name"), k))

    by_name: dict[str, list[str]] = defaultdict(list)
    for config_id, rows in members.items():
        by_name[rows[0].architecture].append(config_id)

    def distinct(ids: list[str], shown: list[str]) -> bool:
        return len({(members[i][0].architecture, *(configs[i].get(k) for k in shown)) for i in ids}) == len(ids)

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


def _baseline(groups: list[Group], wanted: str | None) -> tuple[Group | None, str]:
    """The group named `wanted` (a label, or an architecture only one group has), or None and why.
    The default baseline may be absent (a comparison without the documented CNN): no verdicts then."""
    name = wanted or DEFAULT_BASELINE
    for matches in ([g for g in groups if g.label == name], [g for g in groups if g.architecture == name]):
        if len(matches) == 1:
            if not matches[0].acc:
                return None, f"the baseline `{name}` has no test accuracy: no tests"
            return matches[0], ""
        if len(matches) > 1:
            if wanted:
                raise CnnlabError(f"--baseline {wanted}: {len(matches)} configurations are {name}; name one: "
                                  + "; ".join(g.label for g in matches))
            return None, (f"{len(matches)} configurations are `{name}`: no tests until --baseline names one "
                          f"(" + "; ".join(f"`{g['label']}`" for g in matches) + ")")
    if wanted:
        raise CnnlabError(f"--baseline {wanted}: no such configuration; there are: "
                          + "; ".join(g.label for g in groups))
    return None, f"no configuration is the baseline `{name}` here: no tests (choose one with --baseline)"


def _test_against(groups: list[Group], base: Group | None, alpha: float) -> list[Group]:
    """The groups with Welch's test of each against the baseline, adjusted for the number of tests,
    and their verdicts (the same groups when there is no baseline)."""
    if base is None:
        return groups
    done: dict[int, Group] = {id(base): replace(base, verdict="baseline")}
    tested = []
    for group in groups:
        if group is base or not group.acc:
            continue
        diff = group.acc.mean - base.acc.mean
        difference = stats.welch(group.test_values, base.test_values)
        if difference is None:
            few = group if group.seeds < 2 else base
            done[id(group)] = replace(group, diff=diff, verdict=f"{few.seeds} seed{'s' if few.seeds != 1 else ''}"
                                                                f"{' (baseline)' if few is base else ''}: no test")
            continue
        tested.append((group, diff, difference))
    for (group, diff, difference), p_adjusted in zip(tested, stats.adjust([d.p_value for _, _, d in tested])):
        real = p_adjusted < alpha
        done[id(group)] = replace(group, diff=diff, diff_ci_low=difference.ci_low, diff_ci_high=difference.ci_high,
                                  p_value=difference.p_value, p_adjusted=p_adjusted,
                                  verdict=("better" if diff > 0 else "worse") if real else "within noise")
    return [done.get(id(g), g) for g in groups]
