"""`cnnlab compare`: the table, report and errors.

The slow tests compare a real sweep (two architectures with three seeds each, tiny training runs on
a folder of colour images made by `python -m cnnlab.train -m ... seeds=3`). The fast tests build
SYNTHETIC runs directly with MlflowClient (no training, made-up metrics of known means and spreads)
to cover the statistics and verdicts, grouping, failed and running runs, comparisons across sweeps
and experiments, and the error paths.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cnnlab import cli
from cnnlab.analysis.compare import CSV_FIELDS, GROUP_FIELDS, PLOTS, Group, compare, format_table, val_curve
from cnnlab.core.errors import CnnlabError

from conftest import tiny_colour_overrides

REPORT_FILES = {"report.md", "runs.csv", "groups.csv", *PLOTS}


# --- a real sweep (slow) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep_store(tiny_colour_folder, tmp_path_factory):
    """A store holding one real sweep on colour images (data=folder), model=cnn,cnn_strided with
    seeds=3, 2 epochs each:
    (uri, parent run id). Module-scoped so training happens once; it has its own SQLite file (the
    autouse fixture's store is per test), so tests pass its URI explicitly.
    """
    workdir = tmp_path_factory.mktemp("compare-sweep")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    overrides = tiny_colour_overrides(tiny_colour_folder, workdir, profile=True)
    result = subprocess.run([sys.executable, "-m", "cnnlab.train", "-m", "model=cnn,cnn_strided", "seeds=3",
                             *overrides, "trainer.max_epochs=2"], cwd=workdir, capture_output=True, text=True,
                            timeout=900, check=False, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cnnlab")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`cnnlab.role` = 'sweep'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 6, result.stderr[-3000:]
    return uri, parent.info.run_id


@pytest.fixture(scope="module")
def sweep_report(sweep_store, tmp_path_factory):
    """compare() of the real sweep, by parent run id: (Comparison, report folder)."""
    uri, parent_id = sweep_store
    out = tmp_path_factory.mktemp("compare-report")
    return compare(sweep=parent_id, uri=uri, output=out), out


@pytest.mark.e2e
def test_sweep_repeats_each_configuration_with_three_seeds(sweep_store):
    uri, parent_id = sweep_store
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    # What varies first (the UI cuts names short), then what the sweep fixed, the seeds and the time.
    name = parent.info.run_name
    # where the data and outputs are is not what the sweep compares (the data's name and checksum are)
    assert name.startswith("model=cnn,cnn_strided data=folder data.val_size=40 ") and "path" not in name
    assert re.search(r" trainer.max_epochs=2 seeds=3 \(sweep \d\d-\d\d \d\d:\d\d:\d\d\)$", name), name
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_model = {}
    for run in children:
        by_model.setdefault(run.info.run_name, []).append(run)
    assert sorted(by_model) == ["cnn", "cnn_strided"]
    for name, runs in by_model.items():
        assert sorted(r.data.params["seed"] for r in runs) == ["42", "43", "44"]
        assert len({r.data.tags["cnnlab.configuration"] for r in runs}) == 1  # the same configuration...
        [repeats] = {r.data.tags["cnnlab.repeats"] for r in runs}              # ...named without its seed
        assert repeats.startswith(f"model={name} ") and "seed" not in repeats
    assert by_model["cnn"][0].data.tags["cnnlab.configuration"] != by_model["cnn_strided"][0].data.tags[
        "cnnlab.configuration"]


@pytest.mark.e2e
def test_sweep_groups_equal_the_runs_metrics(sweep_store, sweep_report):
    uri, parent_id = sweep_store
    result, _ = sweep_report
    client = MlflowClient(uri)
    assert sorted(g["label"] for g in result.groups) == ["cnn", "cnn_strided"] and result.baseline == "cnn"
    for group in result.groups:
        runs = [client.get_run(run_id) for run_id in group["run_ids"]]
        acc = np.array([r.data.metrics["test/acc"] for r in runs])
        assert group["seeds"] == 3 and group["seed_list"] == (42, 43, 44)
        assert group["acc"].mean == pytest.approx(acc.mean()) and group["acc"].std == pytest.approx(acc.std(ddof=1))
        assert group["epoch_time_s"] == pytest.approx(np.mean([r.data.metrics["perf/median_epoch_time_s"]
                                                               for r in runs]))
        assert group["params"] == int(runs[0].data.metrics["model/params"])
    by_label = {g["label"]: g for g in result.groups}
    # 3x32x32 in, 5 classes out: conv 896 + 18,496, dense 2,304 x 128 + 128, output 128 x 5 + 5
    assert by_label["cnn"]["params"] == 315077 and by_label["cnn"]["macs"] == 4188160
    assert by_label["cnn"]["verdict"] == "baseline"
    assert by_label["cnn_strided"]["verdict"] in ("better", "worse", "within noise")
    assert "macs" in by_label["cnn_strided"]["frontier"]  # half the MACs of cnn
    for row in result.runs:
        assert row["status"] == "finished" and row["parent_run_id"] == parent_id and row["data"] == "shapes"
        assert row["best_val_epoch"] in (1, 2)

    table = format_table(result).splitlines()
    assert [line.split()[0] for line in table[2:]] == [g["label"] for g in result.groups]
    assert "315,077" in table[2 + [g["label"] for g in result.groups].index("cnn")]


@pytest.mark.e2e
def test_sweep_report_files(sweep_report):
    result, out = sweep_report
    assert {p.name for p in out.iterdir()} >= REPORT_FILES
    report = (out / "report.md").read_text()
    assert result.runs[0]["parent_run_id"] in report and "(model=cnn,cnn_strided data=folder" in report
    assert "Dataset: shapes" in report and "| cnn | 3 | " in report and "| cnn_strided | 3 | " in report
    assert "## Against the baseline `cnn`" in report and "Welch" in report
    for name in PLOTS:
        assert f"]({name})" in report
        assert (out / name).stat().st_size > 10_000
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500 and image[..., :3].std() > 0.05  # not blank
    with (out / "runs.csv").open() as fh:
        saved = list(csv.DictReader(fh))
    assert tuple(saved[0]) == CSV_FIELDS
    assert [(s["run_id"], s["label"], int(s["seed"]), float(s["test_acc"])) for s in saved] == \
           [(r["run_id"], r["label"], r["seed"], r["test_acc"]) for r in result.runs]
    with (out / "groups.csv").open() as fh:
        groups = list(csv.DictReader(fh))
    assert tuple(groups[0]) == GROUP_FIELDS
    assert [(g["label"], int(g["seeds"]), float(g["test_acc_mean"])) for g in groups] == \
           [(g["label"], g["seeds"], g["acc"].mean) for g in result.groups]


@pytest.mark.e2e
def test_sweep_curves_come_from_each_runs_curves_csv(sweep_store, sweep_report):
    uri, _ = sweep_store
    result, _ = sweep_report
    client = MlflowClient(uri)
    for row in result.runs:
        curve = val_curve(client, row["run_id"])
        assert [epoch for epoch, _ in curve] == [1, 2]
        assert max(acc for _, acc in curve) == pytest.approx(row["best_val_acc"])


@pytest.mark.e2e
def test_sweep_report_and_aggregates_are_logged_on_the_parent_run(sweep_store, sweep_report):
    uri, parent_id = sweep_store
    result, _ = sweep_report
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert logged == {f"report/{name}" for name in REPORT_FILES}
    parent = client.get_run(parent_id)
    for group in result.groups:
        assert parent.data.metrics[f"seeds/{group['label']}/test_acc_mean"] == pytest.approx(group["acc"].mean)
        assert parent.data.metrics[f"seeds/{group['label']}/seeds"] == 3
    assert parent.data.tags["cnnlab.compare.baseline"] == "cnn"


@pytest.mark.e2e
def test_cli_sweep_latest_resolves_to_the_sweep(sweep_store, sweep_report, tmp_path, capsys):
    uri, parent_id = sweep_store
    result, _ = sweep_report
    assert cli.main(["compare", "--sweep", "latest", "--tracking-uri", uri, "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep {parent_id} (task shapes/5-class@{result.task[-8:]}: 5 classes)"
    assert [line.split()[0] for line in out[3:5]] == [g["label"] for g in result.groups]
    assert any(line.startswith("  cnn_strided: ") and "points vs cnn" in line for line in out)
    assert (tmp_path / "r" / "report.md").is_file()


# --- synthetic runs (fast) -----------------------------------------------------------------------

def synthetic_run(client: MlflowClient, experiment_id: str, name: str, status: str = "FINISHED",
                  metrics: dict | None = None, tags: dict | None = None, start_time: int | None = None,
                  params: dict | None = None) -> str:
    """A SYNTHETIC run made directly through MlflowClient: no training, made-up metrics."""
    run = client.create_run(experiment_id, run_name=name, start_time=start_time,
                            tags={"cnnlab.role": "train", "data.name": "mnist", **(tags or {})})
    for key, value in (metrics or {}).items():
        client.log_metric(run.info.run_id, key, value)
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, value)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def finished_metrics(test_acc: float, params: int = 1000, epoch_time_s: float = 1.5) -> dict:
    return {"test/acc": test_acc, "val/best_acc": test_acc, "val/best_epoch": 1, "model/params": params,
            "model/macs": 10 * params, "perf/median_epoch_time_s": epoch_time_s}


def seeded_runs(client, experiment_id, name, accuracies, params=1000, epoch_time_s=1.5, tags=None, config=None,
                first_seed=1):
    """One SYNTHETIC configuration: a run per accuracy, seeds 1, 2, ..., params `config` + seed."""
    return [synthetic_run(client, experiment_id, name, metrics=finished_metrics(acc, params, epoch_time_s),
                          tags=tags, params={"model.name": name, **(config or {}), "seed": str(seed)})
            for seed, acc in enumerate(accuracies, start=first_seed)]


@pytest.fixture
def client(tmp_path, monkeypatch) -> MlflowClient:
    """Client of this test's own store (set by the autouse fixture in conftest), working in tmp_path
    so experiments created here keep their artifacts (./mlruns) out of the repository."""
    monkeypatch.chdir(tmp_path)
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


# Accuracies over seeds with known means and spreads: 'wider' is 2 points above the baseline with
# the baseline's spread (t = 12 on 4 df), 'noisy' 0.1 point above with 5 times its spread, 'deep'
# 1 point below, 'once' has one seed.
KNOWN = {"cnn": [0.900, 0.902, 0.898], "wider": [0.920, 0.922, 0.918], "noisy": [0.911, 0.891, 0.901],
         "deep": [0.890, 0.889, 0.891], "once": [0.950]}
COST = {"cnn": 1_000, "wider": 4_000, "noisy": 2_000, "deep": 3_000, "once": 8_000}


def test_synthetic_groups_have_the_right_statistics_and_verdicts(client, tmp_path):
    exp = client.create_experiment("cnnlab")
    for name, accuracies in KNOWN.items():
        seeded_runs(client, exp, name, accuracies, params=COST[name])
    result = compare(output=tmp_path / "out")
    groups = {g["label"]: g for g in result.groups}
    assert [g["label"] for g in result.groups] == ["once", "wider", "noisy", "cnn", "deep"]  # by mean
    for name, accuracies in KNOWN.items():
        x, g = np.array(accuracies), groups[name]
        assert g["seeds"] == len(x) and g["seed_list"] == tuple(range(1, len(x) + 1))
        assert g["acc"].mean == pytest.approx(x.mean())
        if len(x) > 1:
            half = 4.302652729911275 * x.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
            assert g["acc"].std == pytest.approx(x.std(ddof=1))
            assert (g["acc"].ci_low, g["acc"].ci_high) == pytest.approx((x.mean() - half, x.mean() + half))
    assert groups["once"]["acc"].std is None and groups["once"]["acc"].ci_low is None
    assert result.baseline == "cnn"
    assert {name: g["verdict"] for name, g in groups.items()} == {
        "cnn": "baseline", "wider": "better", "noisy": "within noise", "deep": "worse", "once": "1 seed: no test"}
    assert groups["wider"]["diff"] == pytest.approx(0.02) and groups["wider"]["p_value"] < 0.001
    assert groups["noisy"]["p_adjusted"] >= groups["noisy"]["p_value"] > 0.5
    assert groups["wider"]["diff_ci_low"] > 0 > groups["deep"]["diff_ci_high"]
    # Frontier by parameters: cnn (cheapest), noisy (more accurate at 2k), wider, once; deep loses to noisy.
    assert {name for name, g in groups.items() if "params" in g["frontier"]} == {"cnn", "noisy", "wider", "once"}
    table = format_table(result)
    assert "0.9200 ± 0.0020" in table and "+2.00" in table and "better" in table
    report = (tmp_path / "out" / "report.md").read_text()
    assert "- wider: +2.00 points vs cnn" in report and "better beyond seed noise" in report
    assert "- once: +5.00 points vs cnn; 1 seed, so no test" in report
    assert {p.name for p in (tmp_path / "out").iterdir()} >= REPORT_FILES


def test_synthetic_failed_and_running_runs_are_listed_apart_never_averaged(client, tmp_path, capsys):
    exp = client.create_experiment("cnnlab")
    seeded_runs(client, exp, "cnn", KNOWN["cnn"])
    # A failed seed of the same configuration that logged a (bad) accuracy before dying, and one still running.
    failed = synthetic_run(client, exp, "cnn", "FAILED", metrics=finished_metrics(0.10),
                           tags={"error": "RuntimeError: " + "x" * 200 + "\nmore"},
                           params={"model.name": "cnn", "seed": "4"})
    running = synthetic_run(client, exp, "cnn", "RUNNING", params={"model.name": "cnn", "seed": "5"})
    # A finished run whose test accuracy is NaN (diverged): no measurement, not averaged either.
    synthetic_run(client, exp, "cnn", metrics={**finished_metrics(0.0), "test/acc": float("nan")},
                  params={"model.name": "cnn", "seed": "6"})
    result = compare(output=tmp_path / "out")
    [group] = result.groups
    assert group["seeds"] == 3 and group["acc"].mean == pytest.approx(0.900) and len(group["run_ids"]) == 4
    assert [(r["run_id"], r["status"]) for r in result.left_out] == [(running, "running"), (failed, "failed")]
    assert result.left_out[1]["error"].startswith("RuntimeError: xxx") and len(result.left_out[1]["error"]) <= 80
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Not included: failed, killed, still running, or a seed repeated" in report
    assert "failed: RuntimeError" in report and "4 finished in 1 configurations; 2 left out" in report
    assert cli.main(["compare", "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "or a seed repeated by a newer run (2 runs):" in out and "running" in out


def test_synthetic_configurations_of_one_architecture_are_told_apart(client, tmp_path):
    exp = client.create_experiment("cnnlab")
    seeded_runs(client, exp, "cnn", [0.90, 0.91], config={"optimizer.lr": "0.001", "paths.output_dir": "/a"})
    seeded_runs(client, exp, "cnn", [0.92, 0.93], config={"optimizer.lr": "0.0003", "paths.output_dir": "/b"})
    result = compare(output=tmp_path / "out")
    assert [(g["label"], g["seeds"]) for g in result.groups] == [("cnn (optimizer.lr=0.0003)", 2),
                                                                 ("cnn (optimizer.lr=0.001)", 2)]
    assert result.baseline is None  # two configurations are cnn: the default baseline is not guessed
    report = (tmp_path / "out" / "report.md").read_text()
    assert "2 configurations are `cnn`: no tests until --baseline names one" in report
    result = compare(output=tmp_path / "out", baseline="cnn (optimizer.lr=0.001)")
    assert result.groups[0]["verdict"] in ("better", "within noise") and result.groups[1]["verdict"] == "baseline"
    with pytest.raises(CnnlabError, match=r"--baseline cnn: 2 configurations are cnn; name one: cnn \(optimizer"):
        compare(output=tmp_path / "out", baseline="cnn")
    with pytest.raises(CnnlabError, match=r"--baseline resnet: no such configuration; there are: cnn \("):
        compare(output=tmp_path / "out", baseline="resnet")


def test_synthetic_a_seed_trained_twice_counts_once_the_newest(client, tmp_path):
    """A sweep run twice gives each configuration its seeds twice: one measurement each, not two."""
    exp = client.create_experiment("cnnlab")
    old = seeded_runs(client, exp, "cnn", [0.80, 0.81, 0.82])
    new = seeded_runs(client, exp, "cnn", [0.90, 0.91, 0.92])
    [group] = compare(output=tmp_path / "out").groups
    assert group["seeds"] == 3 and group["acc"].mean == pytest.approx(0.91) and sorted(group["run_ids"]) == sorted(new)
    left_out = compare(output=tmp_path / "out").left_out
    assert sorted(r["run_id"] for r in left_out) == sorted(old) and {r["status"] for r in left_out} == {"superseded"}
    assert left_out[0]["error"].startswith("seed ") and "again in newer run" in left_out[0]["error"]


def test_synthetic_labels_name_what_tells_configurations_apart(client, tmp_path):
    exp = client.create_experiment("cnnlab")
    parent = client.create_run(exp, run_name="sweep", tags={"cnnlab.role": "sweep"}).info.run_id
    for scheduler in ("step", "cosine"):
        for lr in ("0.001", "0.0003"):
            config = {"scheduler.name": scheduler, "scheduler._target_": f"torch.optim.{scheduler}",
                      "scheduler.t_max": "10" if scheduler == "cosine" else "null", "optimizer.lr": lr}
            seeded_runs(client, exp, "cnn", [0.9, 0.91], config=config, tags={
                "mlflow.parentRunId": parent, "cnnlab.repeats": f"scheduler={scheduler} optimizer.lr={lr}"})
    result = compare(sweep=parent, output=tmp_path / "out")
    # The key the sweep overrode comes first, then a name; scheduler._target_ and t_max are not needed.
    assert sorted(g["label"] for g in result.groups) == sorted(f"cnn (optimizer.lr={lr}, scheduler.name={sched})"
                                                               for sched in ("step", "cosine")
                                                               for lr in ("0.001", "0.0003"))
    # Labels become metric names on the parent run: only characters MLflow allows, one name each.
    names = {k.rsplit("/", 1)[0] for k in client.get_run(parent).data.metrics}
    assert len(names) == 4 and all(n.startswith("seeds/cnn _optimizer.lr_0.0") for n in names)


def test_synthetic_every_label_says_how_long_it_trained_and_the_terminal_says_why_no_verdicts(client, tmp_path,
                                                                                             capsys):
    """Probe row 15: a ten-epoch cnn, one-epoch 200-batch cnns, and cnn_wide / cnn_strided trained the
    same short way: every label names the budget, and the terminal says why there are no verdicts."""
    exp = client.create_experiment("cnnlab")
    full = {"trainer.max_epochs": "10", "trainer.limit_train_batches": "null"}
    short = {"trainer.max_epochs": "1", "trainer.limit_train_batches": "200"}
    seeded_runs(client, exp, "cnn", [0.91], config=full)
    seeded_runs(client, exp, "cnn", [0.85, 0.86], config=short,
                tags={"cnnlab.repeats": "trainer.max_epochs=1 trainer.limit_train_batches=200"})
    for name in ("cnn_wide", "cnn_strided"):
        seeded_runs(client, exp, name, [0.87], config={**short, "model.width": "2" if name == "cnn_wide" else "1"})
    result = compare(output=tmp_path / "out")
    budget = "(trainer.limit_train_batches={}, trainer.max_epochs={})"
    assert sorted(g["label"] for g in result.groups) == sorted([
        f"cnn {budget.format('null', 10)}", f"cnn {budget.format(200, 1)}", f"cnn_wide {budget.format(200, 1)}",
        f"cnn_strided {budget.format(200, 1)}"])
    assert cli.main(["compare", "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "cnn_wide (trainer.limit_train_batches=200, trainer.max_epochs=1)" in out
    assert "\nNo verdicts: 2 configurations are `cnn`: no tests until --baseline names one" in out


def test_synthetic_comparison_across_sweeps_experiments_and_a_filter(client, tmp_path):
    sweeps = {}
    for name, accuracies in (("zoo", [0.95, 0.96]), ("heads", [0.80, 0.81])):
        exp = client.create_experiment(name)
        parent = client.create_run(exp, run_name=f"sweep {name}", tags={"cnnlab.role": "sweep"}).info.run_id
        tags = {"mlflow.parentRunId": parent}
        seeded_runs(client, exp, "cnn", [0.90, 0.91], tags=tags, first_seed=1 if name == "zoo" else 3)
        seeded_runs(client, exp, name, accuracies, tags=tags)
        sweeps[name] = parent
    # The same configuration (cnn) in two experiments: one group of four seeds.
    result = compare(experiment="zoo,heads", output=tmp_path / "out")
    assert [(g["label"], g["seeds"]) for g in result.groups] == [("zoo", 2), ("cnn", 4), ("heads", 2)]
    assert result.parents == []
    # Two sweeps by id, comma-separated: compared together, logged to neither (the report spans both).
    result = compare(sweep=f"{sweeps['zoo']},{sweeps['heads']}", output=tmp_path / "two")
    assert {g["label"]: g["seeds"] for g in result.groups} == {"zoo": 2, "cnn": 4, "heads": 2}
    assert [p.info.run_id for p in result.parents] == [sweeps["zoo"], sweeps["heads"]]
    assert client.list_artifacts(sweeps["zoo"]) == [] and client.list_artifacts(sweeps["heads"]) == []
    assert "Compared: sweep " in (tmp_path / "two" / "report.md").read_text()
    # Each experiment's latest sweep, narrowed by a search filter.
    result = compare(experiment=["zoo", "heads"], sweep="latest", filter_string="attributes.run_name = 'cnn'",
                     output=tmp_path / "three")
    assert [(g["label"], g["seeds"]) for g in result.groups] == [("cnn", 4)]
    with pytest.raises(CnnlabError, match="have no finished training runs matching the filter"):
        compare(experiment="zoo,heads", filter_string="attributes.run_name = 'none'", output=tmp_path / "four")


def test_synthetic_val_curve_from_metric_history(client):
    """Without curves.csv, val/acc steps map to epochs through the `epoch` metric (0-based)."""
    exp = client.create_experiment("cnnlab")
    run_id = synthetic_run(client, exp, "cnn")
    for step, epoch in ((9, 0), (9, 0), (19, 1), (19, 1), (20, 2)):  # as Lightning logs it
        client.log_metric(run_id, "epoch", epoch, step=step)
    for step, acc in ((9, 0.5), (19, 0.7)):
        client.log_metric(run_id, "val/acc", acc, step=step)
    assert val_curve(client, run_id) == [(1, 0.5), (2, 0.7)]


def test_synthetic_sweep_latest_is_the_newest_sweep(client, tmp_path):
    exp = client.create_experiment("cnnlab")
    old, new = (client.create_run(exp, run_name=f"sweep {n}", start_time=t, tags={"cnnlab.role": "sweep"}).info.run_id
                for n, t in (("old", 1000), ("new", 2000)))
    synthetic_run(client, exp, "a", metrics=finished_metrics(0.8), tags={"mlflow.parentRunId": old})
    synthetic_run(client, exp, "b", metrics=finished_metrics(0.9), tags={"mlflow.parentRunId": new})
    result = compare(sweep="latest", output=tmp_path / "out")
    assert [(r["architecture"], r["parent_run_id"]) for r in result.runs] == [("b", new)]
    assert {a.path for a in client.list_artifacts(new, "report")} == {f"report/{n}" for n in REPORT_FILES}
    assert client.list_artifacts(old) == []


def test_unknown_experiment_lists_the_existing_ones(client, tmp_path):
    client.create_experiment("cnnlab")
    client.create_experiment("zoo")
    with pytest.raises(CnnlabError, match=r"unknown experiment 'nope' .*experiments there: Default, cnnlab, zoo"):
        compare(experiment="nope", output=tmp_path)


def test_missing_store_is_an_error_and_creates_nothing(tmp_path):
    with pytest.raises(CnnlabError, match="no MLflow store at"):
        compare(uri=f"sqlite:///{tmp_path / 'absent.db'}", output=tmp_path / "out")
    assert not (tmp_path / "absent.db").exists() and not (tmp_path / "out").exists()


def test_unknown_run_id(client, tmp_path):
    client.create_experiment("cnnlab")
    with pytest.raises(CnnlabError, match="no MLflow run with id '0123456789abcdef'"):
        compare(sweep="0123456789abcdef", output=tmp_path)


def test_a_training_run_is_not_a_sweep_parent(client, tmp_path):
    exp = client.create_experiment("cnnlab")
    parent = client.create_run(exp, run_name="sweep x", tags={"cnnlab.role": "sweep"}).info.run_id
    child = synthetic_run(client, exp, "cnn", metrics=finished_metrics(0.9), tags={"mlflow.parentRunId": parent})
    with pytest.raises(CnnlabError, match=rf"run {child} \(cnn\) is not a sweep parent run "
                                          rf"\(cnnlab.role=train\); its parent is {parent}"):
        compare(sweep=child, output=tmp_path)


def test_no_finished_training_runs(client, tmp_path):
    exp = client.create_experiment("cnnlab")
    with pytest.raises(CnnlabError, match="experiment 'cnnlab' has no finished training runs$"):
        compare(output=tmp_path)
    with pytest.raises(CnnlabError, match="experiment 'cnnlab' has no sweep runs"):
        compare(sweep="latest", output=tmp_path)
    parent = client.create_run(exp, run_name="sweep x", tags={"cnnlab.role": "sweep"}).info.run_id
    synthetic_run(client, exp, "cnn", "FAILED", tags={"mlflow.parentRunId": parent, "error": "boom"})
    with pytest.raises(CnnlabError, match=rf"sweep {parent} \(sweep x\) has no finished training runs \(1 failed\)"):
        compare(sweep="latest", output=tmp_path)


def test_cli_error_is_one_line_on_stderr_with_exit_status_1(client, tmp_path, capsys):
    client.create_experiment("cnnlab")
    assert cli.main(["compare", "--experiment", "nope", "--output", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: unknown experiment 'nope'") and captured.err.count("\n") == 1
    assert captured.out == ""


def test_cli_prints_the_table_and_the_verdicts(client, tmp_path, capsys):
    exp = client.create_experiment("cnnlab")
    seeded_runs(client, exp, "cnn", KNOWN["cnn"], params=1000)
    seeded_runs(client, exp, "wide", KNOWN["wider"], params=50_000)
    assert cli.main(["compare", "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "experiment cnnlab (task mnist/?-class@unknown: classes (their number not recorded))"
    assert out[1].split()[:4] == ["configuration", "seeds", "test", "acc"]
    assert out[3].split()[:5] == ["wide", "3", "0.9200", "±", "0.0020"] and "50,000" in out[3] and "better" in out[3]
    assert out[4].split()[:2] == ["cnn", "3"] and "baseline" in out[4]
    assert out[6] == "Against cnn (Welch's t-test, Benjamini-Hochberg adjusted):"
    assert out[7].startswith("  wide: +2.00 points vs cnn (95% CI +1.") and out[7].endswith("better beyond seed noise")
    assert (tmp_path / "r" / "report.md").is_file()


def test_cli_alpha_out_of_range_is_one_line(client, tmp_path, capsys):
    assert cli.main(["compare", "--alpha", "2", "--output", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err == "error: --alpha 2.0: expected a number between 0 and 1\n"


def test_parameter_ticks_never_overlap(monkeypatch):
    """Probe row 24: costs of 225k to 1M gave minor tick labels '800k900k 1M' on top of each other."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cnnlab.analysis.compare import charts
    from cnnlab.analysis.stats import summarize

    figures = []
    monkeypatch.setattr(charts, "_png", lambda fig: figures.append(fig) or b"")
    for costs in ((225_034, 800_000, 890_000, 1_000_000), (800_000, 890_000, 1_000_000), (9_000, 225_034, 1_000_000)):
        groups = [Group(f"m{c}", "m", "mnist", "t", False, f"id{c}", 2, (1, 2), summarize([0.9, 0.91]), (0.9, 0.91),
                        None, None, ("r",), ("cpu",), params=c) for c in costs]
        charts._scatter(groups, {g["label"]: "C0" for g in groups}, "params", "parameters", log_x=True)
        fig = figures[-1]
        renderer = FigureCanvasAgg(fig).get_renderer()  # as savefig draws the PNG
        fig.draw(renderer)
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
                 if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi]
        boxes = sorted((t.label1.get_window_extent(renderer) for t in ticks), key=lambda b: b.x0)
        assert len(boxes) >= 2, [t.label1.get_text() for t in ticks]
        assert all(a.x1 + 4 <= b.x0 for a, b in zip(boxes, boxes[1:])), [t.label1.get_text() for t in ticks]


def test_sweep_parent_names_start_with_what_varies_and_say_what_was_fixed():
    """Probe row 22: two sweeps were both `sweep seeds=2 model=...`, cut by the MLflow UI to the same
    `sweep seeds=2 mo…`, without their data= or trainer.* overrides."""
    from cnnlab.training.sweep_parent import sweep_run_name

    first = sweep_run_name(["model=cnn,cnn_wide", "data=fashion_mnist", "trainer.max_epochs=1", "seeds=2",
                            "paths.output_dir=/tmp/x", "tracking.timeout_s=5"], {}, 2, now=0)
    second = sweep_run_name(["experiment=heads", "trainer.limit_train_batches=200"], {"model": "cnn,cnn_sigmoid"}, 2,
                            now=60)
    assert first.startswith("model=cnn,cnn_wide data=fashion_mnist trainer.max_epochs=1 seeds=2 (sweep ")
    assert second.startswith("model=cnn,cnn_sigmoid experiment=heads trainer.limit_train_batches=200 seeds=2 (sweep ")
    assert "paths." not in first and "tracking." not in first  # where results go is no part of what was swept
    assert first[:20] != second[:20]
    # The same command twice: told apart by the time it started.
    assert sweep_run_name(["model=a,b"], {}, 1, now=0) != sweep_run_name(["model=a,b"], {}, 1, now=1)
    # A list or a dict holds commas but is one value, not a sweep: it goes with what was fixed.
    third = sweep_run_name(["model=cnn,cnn_wide", "model.conv_blocks=[{filters:8},{filters:16}]",
                            "optimizer.lr=range(1,3)"], {}, 1, now=0)
    assert third.startswith("model=cnn,cnn_wide optimizer.lr=range(1,3) model.conv_blocks=[{filters:8},{filters:16}]")
