"""The comparison's pure part (cnnlab.analysis.compare.groups), fed `RunRow`s built here: no MLflow
store, no run. The same statistics, verdicts and labels as tests/test_compare.py's synthetic store
tests prove through a store, from rows alone."""

from __future__ import annotations

import numpy as np
import pytest

from cnnlab.analysis.compare import Group, RunRow, format_table
from cnnlab.analysis.compare.groups import _baseline, _groups, _one_run_per_seed, _test_against, labelled
from cnnlab.analysis.compare.report import Comparison

# As in tests/test_compare.py: 'wider' 2 points above the baseline with its spread, 'noisy' 0.1 point
# above with 5 times its spread, 'deep' 1 point below, 'once' one seed.
KNOWN = {"cnn": [0.900, 0.902, 0.898], "wider": [0.920, 0.922, 0.918], "noisy": [0.911, 0.891, 0.901],
         "deep": [0.890, 0.889, 0.891], "once": [0.950]}
COST = {"cnn": 1_000, "wider": 4_000, "noisy": 2_000, "deep": 3_000, "once": 8_000}


def row(name: str, seed: int, test_acc: float, params: int = 1000, config: dict | None = None,
        overrides: tuple[str, ...] = (), start_time: int = 0) -> RunRow:
    """A finished run of `name`, its configuration named by its config (seed aside)."""
    config = {"model.name": name, **(config or {})}
    return RunRow(label=name, architecture=name, seed=seed, run_id=f"{name}-{seed}-{start_time}-{sorted(config)}",
                  status="finished", data="mnist", configuration=repr(sorted(config.items())), parent_run_id="",
                  experiment_id="1", config=config, overrides=overrides, task="mnist/10-class@x", params=params,
                  macs=10 * params, epoch_time_s=1.5, best_val_acc=test_acc, best_val_epoch=1, test_acc=test_acc,
                  start_time=start_time)


def seeded(name: str, accuracies: list[float], **kwargs) -> list[RunRow]:
    return [row(name, seed, acc, **kwargs) for seed, acc in enumerate(accuracies, start=1)]


def judged(rows: list[RunRow], baseline: str | None = None) -> tuple[list[Group], Group | None, str]:
    groups = _groups(rows)
    base, why_none = _baseline(groups, baseline)
    return _test_against(groups, base, 0.05), base, why_none


def test_rows_group_by_configuration_with_the_right_statistics():
    rows = [r for name, accuracies in KNOWN.items() for r in seeded(name, accuracies, params=COST[name])]
    groups, base, _ = judged(rows)
    assert [g.label for g in groups] == ["once", "wider", "noisy", "cnn", "deep"]  # by mean
    by_label = {g.label: g for g in groups}
    for name, accuracies in KNOWN.items():
        x, g = np.array(accuracies), by_label[name]
        assert g.seeds == len(x) and g.seed_list == tuple(range(1, len(x) + 1)) and len(g.run_ids) == len(x)
        assert g.acc.mean == pytest.approx(x.mean()) and g.params == COST[name]
        if len(x) > 1:
            half = 4.302652729911275 * x.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
            assert (g.acc.ci_low, g.acc.ci_high) == pytest.approx((x.mean() - half, x.mean() + half))
    assert by_label["once"].acc.std is None and base.label == "cnn"
    assert {name for name, g in by_label.items() if "params" in g.frontier} == {"cnn", "noisy", "wider", "once"}


def test_verdicts_between_configurations_with_seeds():
    rows = [r for name, accuracies in KNOWN.items() for r in seeded(name, accuracies, params=COST[name])]
    groups, _, _ = judged(rows)
    by_label = {g.label: g for g in groups}
    assert {name: g.verdict for name, g in by_label.items()} == {
        "cnn": "baseline", "wider": "better", "noisy": "within noise", "deep": "worse", "once": "1 seed: no test"}
    assert by_label["wider"].diff == pytest.approx(0.02) and by_label["wider"].p_value < 0.001
    assert by_label["noisy"].p_adjusted >= by_label["noisy"].p_value > 0.5
    assert by_label["wider"].diff_ci_low > 0 > by_label["deep"].diff_ci_high
    assert by_label["once"].diff == pytest.approx(0.05) and by_label["once"].p_value is None
    # The same table a store-fed comparison prints.
    table = format_table(Comparison(groups, rows, "cnn"))
    assert "0.9200 ± 0.0020" in table and "+2.00" in table and "better" in table
    # Two configurations only: the wider one is better than cnn beyond seed noise.
    groups, _, _ = judged(seeded("cnn", KNOWN["cnn"]) + seeded("wide", KNOWN["wider"], params=50_000))
    assert [(g.label, g.verdict) for g in groups] == [("wide", "better"), ("cnn", "baseline")]


def test_labels_name_what_tells_configurations_of_one_architecture_apart():
    rows = (seeded("cnn", [0.90, 0.91], config={"optimizer.lr": "0.001", "paths.output_dir": "/a"})
            + seeded("cnn", [0.92, 0.93], config={"optimizer.lr": "0.0003", "paths.output_dir": "/b"}))
    groups, base, why_none = judged(rows)
    assert [(g.label, g.seeds) for g in groups] == [("cnn (optimizer.lr=0.0003)", 2), ("cnn (optimizer.lr=0.001)", 2)]
    assert base is None and why_none.startswith("2 configurations are `cnn`: no tests until --baseline names one")
    assert {r.label for r in labelled(rows, groups)} == {g.label for g in groups}  # each row takes its group's label
    groups, _, _ = judged(rows, baseline="cnn (optimizer.lr=0.001)")
    assert groups[1].verdict == "baseline"
    # The key a sweep overrode comes first: with a name, it tells the four apart.
    rows = [r for sched in ("step", "cosine") for lr in ("0.001", "0.0003")
            for r in seeded("cnn", [0.9, 0.91], overrides=(f"scheduler={sched}", f"optimizer.lr={lr}"),
                            config={"scheduler.name": sched, "scheduler._target_": f"torch.optim.{sched}",
                                    "scheduler.t_max": "10" if sched == "cosine" else "null", "optimizer.lr": lr})]
    assert sorted(g.label for g in _groups(rows)) == sorted(f"cnn (optimizer.lr={lr}, scheduler.name={sched})"
                                                           for sched in ("step", "cosine")
                                                           for lr in ("0.001", "0.0003"))


def test_a_seed_trained_twice_counts_once_the_newest():
    old = seeded("cnn", [0.80, 0.81, 0.82], start_time=1)
    new = seeded("cnn", [0.90, 0.91, 0.92], start_time=2)
    rows = _one_run_per_seed(old + new)
    assert [r.status for r in rows] == ["superseded"] * 3 + ["finished"] * 3
    assert rows[0].error == f"seed 1 again in newer run {new[0].run_id[:8]}"
    [group] = _groups([r for r in rows if r.status == "finished"])
    assert group.seeds == 3 and group.acc.mean == pytest.approx(0.91) and set(group.run_ids) == {r.run_id for r in new}


def test_rows_and_groups_are_frozen():
    r = row("cnn", 1, 0.9)
    with pytest.raises(AttributeError):
        r.label = "other"
    [group] = _groups([r])
    with pytest.raises(AttributeError):
        group.verdict = "better"
    assert r["test_acc"] == r.test_acc == 0.9 and group["label"] == group.label == "cnn"
