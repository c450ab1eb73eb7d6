"""`cnnlab compare`: the table, report and errors.

The slow tests compare a real sweep (two tiny training runs made by `python -m cnnlab.train -m`).
The fast tests build SYNTHETIC runs directly with MlflowClient (no training, made-up metrics) to
cover ordering, failed runs and the error paths.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import matplotlib.image
import pytest
from mlflow.tracking import MlflowClient

from cnnlab import cli
from cnnlab.compare import CSV_FIELDS, PLOTS, compare, format_table, val_curve
from cnnlab.errors import CnnlabError

from conftest import tiny_overrides

REPORT_FILES = {"report.md", "runs.csv", *PLOTS}


# --- a real sweep (slow) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep_store(tiny_dataset, tmp_path_factory):
    """A store holding one real sweep, model=cnn,cnn_sigmoid, 2 epochs each: (uri, parent run id).

    Module-scoped so training happens once; it has its own SQLite file (the autouse fixture's store
    is per test), so tests pass its URI explicitly.
    """
    workdir = tmp_path_factory.mktemp("compare-sweep")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    overrides = [o for o in tiny_overrides(tiny_dataset, workdir) if not o.startswith("trainer.max_epochs=")]
    result = subprocess.run([sys.executable, "-m", "cnnlab.train", "-m", "model=cnn,cnn_sigmoid", *overrides,
                             "trainer.max_epochs=2"], cwd=workdir, capture_output=True, text=True, timeout=600,
                            check=False, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cnnlab")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`cnnlab.role` = 'sweep'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"], result.stderr[-3000:]
    return uri, parent.info.run_id


@pytest.fixture(scope="module")
def sweep_report(sweep_store, tmp_path_factory):
    """compare() of the real sweep, by parent run id: (rows, report folder)."""
    uri, parent_id = sweep_store
    out = tmp_path_factory.mktemp("compare-report")
    return compare(sweep=parent_id, uri=uri, output=out), out


@pytest.mark.slow
def test_sweep_rows_are_sorted_and_equal_the_runs_metrics(sweep_store, sweep_report):
    uri, parent_id = sweep_store
    rows, _ = sweep_report
    client = MlflowClient(uri)
    assert sorted(r["architecture"] for r in rows) == ["cnn", "cnn_sigmoid"]
    assert [r["test_acc"] for r in rows] == sorted((r["test_acc"] for r in rows), reverse=True)
    for row in rows:
        run = client.get_run(row["run_id"])
        m = run.data.metrics
        assert row["status"] == "finished" and row["parent_run_id"] == parent_id and row["data"] == "custom"
        assert row["architecture"] == run.info.run_name
        assert row["test_acc"] == m["test/acc"] and row["best_val_acc"] == m["val/best_acc"]
        assert row["best_val_epoch"] == int(m["val/best_epoch"]) and row["best_val_epoch"] in (1, 2)
        assert row["epoch_time_s"] == m["perf/median_epoch_time_s"] > 0
        assert (row["params"], row["macs"]) == (int(m["model/params"]), int(m["model/macs"]))
    by_name = {r["architecture"]: r for r in rows}
    assert by_name["cnn"]["params"] == 225034 and by_name["cnn"]["macs"] == 2631040
    assert by_name["cnn_sigmoid"]["params"] == 223873

    table = format_table(rows).splitlines()
    assert [line.split()[0] for line in table[2:]] == [r["architecture"] for r in rows]
    assert "225,034" in table[2 + [r["architecture"] for r in rows].index("cnn")]


@pytest.mark.slow
def test_sweep_report_files(sweep_report):
    rows, out = sweep_report
    assert {p.name for p in out.iterdir()} >= REPORT_FILES
    report = (out / "report.md").read_text()
    assert rows[0]["parent_run_id"] in report and "sweep model=cnn,cnn_sigmoid" in report
    assert "Dataset: custom" in report and "| cnn | " in report and "| cnn_sigmoid | " in report
    for name in PLOTS:
        assert f"]({name})" in report
        assert (out / name).stat().st_size > 10_000
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500 and image[..., :3].std() > 0.05  # not blank
    with (out / "runs.csv").open() as fh:
        saved = list(csv.DictReader(fh))
    assert tuple(saved[0]) == CSV_FIELDS
    assert [(s["run_id"], int(s["params"]), float(s["test_acc"])) for s in saved] == \
           [(r["run_id"], r["params"], r["test_acc"]) for r in rows]


@pytest.mark.slow
def test_sweep_curves_come_from_each_runs_curves_csv(sweep_store, sweep_report):
    uri, _ = sweep_store
    rows, _ = sweep_report
    client = MlflowClient(uri)
    for row in rows:
        curve = val_curve(client, row["run_id"])
        assert [epoch for epoch, _ in curve] == [1, 2]
        assert max(acc for _, acc in curve) == pytest.approx(row["best_val_acc"])


@pytest.mark.slow
def test_sweep_report_is_logged_on_the_parent_run(sweep_store, sweep_report):
    uri, parent_id = sweep_store
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent_id, "report")}
    assert logged == {f"report/{name}" for name in REPORT_FILES}


@pytest.mark.slow
def test_cli_sweep_latest_resolves_to_the_sweep(sweep_store, sweep_report, tmp_path, capsys):
    uri, parent_id = sweep_store
    rows, _ = sweep_report
    assert cli.main(["compare", "--sweep", "latest", "--tracking-uri", uri, "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep {parent_id}"
    assert [line.split()[0] for line in out[3:5]] == [r["architecture"] for r in rows]
    assert (tmp_path / "r" / "report.md").is_file()


# --- synthetic runs (fast) -----------------------------------------------------------------------

def synthetic_run(client: MlflowClient, experiment_id: str, name: str, status: str = "FINISHED",
                  metrics: dict | None = None, tags: dict | None = None, start_time: int | None = None) -> str:
    """A SYNTHETIC run made directly through MlflowClient: no training, made-up metrics."""
    run = client.create_run(experiment_id, run_name=name, start_time=start_time,
                            tags={"cnnlab.role": "train", "data.name": "mnist", **(tags or {})})
    for key, value in (metrics or {}).items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def finished_metrics(test_acc: float, params: int = 1000) -> dict:
    return {"test/acc": test_acc, "val/best_acc": test_acc, "val/best_epoch": 1, "model/params": params,
            "model/macs": 10 * params, "perf/median_epoch_time_s": 1.5}


@pytest.fixture
def client(tmp_path, monkeypatch) -> MlflowClient:
    """Client of this test's own store (set by the autouse fixture in conftest), working in tmp_path
    so experiments created here keep their artifacts (./mlruns) out of the repository."""
    monkeypatch.chdir(tmp_path)
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_synthetic_runs_sorted_by_test_acc_failed_last(client, tmp_path):
    exp = client.create_experiment("cnnlab")
    synthetic_run(client, exp, "small", metrics=finished_metrics(0.90, params=1000))
    synthetic_run(client, exp, "wide", metrics=finished_metrics(0.95, params=50_000))
    failed = synthetic_run(client, exp, "deep", "FAILED", tags={"error": "RuntimeError: " + "x" * 200 + "\nmore"})
    rows = compare(output=tmp_path / "out")
    assert [(r["architecture"], r["status"]) for r in rows] == [("wide", "finished"), ("small", "finished"),
                                                               ("deep", "failed")]
    assert rows[0]["params"] == 50_000 and rows[0]["macs"] == 500_000 and rows[0]["test_acc"] == 0.95
    assert rows[2]["run_id"] == failed and rows[2]["test_acc"] is None
    assert rows[2]["error"].startswith("RuntimeError: xxx") and len(rows[2]["error"]) <= 80
    table = format_table(rows).splitlines()
    assert table[-1].startswith("deep") and "failed: RuntimeError" in table[-1]
    assert {p.name for p in (tmp_path / "out").iterdir()} >= REPORT_FILES
    assert "failed: RuntimeError" in (tmp_path / "out" / "report.md").read_text()


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
    rows = compare(sweep="latest", output=tmp_path / "out")
    assert [(r["architecture"], r["parent_run_id"]) for r in rows] == [("b", new)]
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


def test_cli_prints_the_table(client, tmp_path, capsys):
    exp = client.create_experiment("cnnlab")
    synthetic_run(client, exp, "small", metrics=finished_metrics(0.90, params=1000))
    synthetic_run(client, exp, "wide", metrics=finished_metrics(0.95, params=50_000))
    assert cli.main(["compare", "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "experiment cnnlab"
    assert out[1].split()[:3] == ["architecture", "run", "params"]
    assert out[3].split()[0] == "wide" and "50,000" in out[3] and "0.9500" in out[3]
    assert out[4].split()[0] == "small"
    assert (tmp_path / "r" / "report.md").is_file()
