"""Several processes writing at once lose nothing: loggers on one SQLite store (never "database is
locked"), and whole trainings started in the same second, as plain processes and as a parallel
sweep, against SQLite and a real `mlflow server`: each keeps its own folder, run and artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cnnlab.core import keys

from conftest import mlflow_server, tiny_overrides

JOBS, STEPS = 4, 30  # twice as many writers as this machine has cores

WORKER = """
import sys
from cnnlab.tracking.logger import MLflowLogger
job, steps = int(sys.argv[1]), int(sys.argv[2])
logger = MLflowLogger("concurrency", f"job{job}")  # tracking URI from $MLFLOW_TRACKING_URI
logger.log_hyperparams({"job": job, "model.name": f"m{job}", "model.width": 1.0})
for step in range(steps):
    logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    logger.log_metrics({"acc": step / 100, "job": job}, step=step)
logger.finalize("success")
"""


@pytest.mark.e2e
def test_concurrent_writers_to_a_fresh_sqlite_store_lose_nothing(tmp_path):
    """Writers start together on a store that does not exist yet (so table creation races too)."""
    (tmp_path / "mlflow.db").unlink()  # the test's own store (conftest), made by the writers instead
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(job), str(STEPS)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for job in range(JOBS)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-2000:]
        assert "database is locked" not in out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrency").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"job{j}" for j in range(JOBS)]
    for run in runs:
        assert run.info.status == "FINISHED"
        job = int(run.data.params["job"])
        assert run.info.run_name == f"job{job}"
        assert run.data.params["model.name"] == f"m{job}" and float(run.data.params["model.width"]) == 1.0
        for key in ("loss", "acc", "job"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(STEPS)), key
        assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "job"), key=lambda m: m.step)] \
            == [float(job)] * STEPS


TRAININGS = 4  # started together: twice as many as the cores of the machines it runs on


def _train_overrides(dataset: Path, workdir: Path) -> list[str]:
    """Short real trainings, as users type them: Hydra picks each output folder."""
    return [o for o in tiny_overrides(dataset, workdir) if not o.startswith("paths.output_dir=")]


def _check_every_run_is_whole_and_its_own(uri: str, folders: list[Path], seeds: list[int]) -> None:
    """One FINISHED run per training, with its own params, metric points and artifacts: the
    curves.csv it logged is the one in its own output folder, which names it in train.json."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id], "tags.`cnnlab.role` = 'train'")
    assert len(runs) == len(seeds) and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(int(r.data.params["seed"]) for r in runs) == sorted(seeds)
    by_id = {r.info.run_id: r for r in runs}
    assert len(folders) == len(seeds)
    for folder in folders:
        record = json.loads((folder / keys.TRAIN_METRICS).read_text())
        run = by_id.pop(record["mlflow_run_id"])  # each folder names a different run
        assert run.data.params["paths.output_dir"] == str(folder)
        logged = Path(client.download_artifacts(run.info.run_id, keys.CURVES_ARTIFACT, str(folder / "downloaded")))
        assert logged.read_text() == (folder / keys.CURVES_CSV).read_text()
        for key in ("train/loss", keys.VAL_ACC, keys.TEST_ACC):
            assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
        assert run.data.metrics[keys.TEST_ACC] == pytest.approx(record[keys.TEST_ACC])
    assert not by_id


def _start_together(workdir: Path, uri: str, commands: list[list[str]]) -> list[tuple[int, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")} | {
        "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "cnnlab.train", *cmd], cwd=workdir, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in commands]
    return [(p.wait(timeout=900), p.stdout.read()) for p in procs]


@pytest.mark.e2e
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_trainings_started_in_the_same_second_keep_their_own_runs_and_outputs(tiny_dataset, tmp_path, store):
    """Four `cnnlab train seed=$i &` at once, against SQLite and against a real `mlflow server`."""
    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = mlflow_server(sqlite, tmp_path) if store == "server" else contextlib.nullcontext((sqlite, None))
    seeds = list(range(TRAININGS))
    with server as (uri, _):
        results = _start_together(tmp_path, uri, [[*_train_overrides(tiny_dataset, tmp_path), f"seed={s}"]
                                                  for s in seeds])
        for code, out in results:
            assert code == 0, out[-3000:]
            assert "database is locked" not in out
        folders = sorted((tmp_path / "outputs" / "runs").glob("*/*"))
        _check_every_run_is_whole_and_its_own(uri, folders, seeds)


@pytest.mark.e2e
def test_a_parallel_sweep_against_a_real_server_loses_nothing(tiny_dataset, tmp_path):
    seeds = list(range(TRAININGS))
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) as (uri, _):
        sweep = ["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", f"seed={','.join(map(str, seeds))}"]
        ((code, out),) = _start_together(tmp_path, uri, [[*sweep, *_train_overrides(tiny_dataset, tmp_path)]])
        assert code == 0, out[-3000:]
        folders = sorted(p.parent.parent for p in (tmp_path / "outputs" / "sweeps").glob(f"*/*/*/{keys.TRAIN_METRICS}"))
        _check_every_run_is_whole_and_its_own(uri, folders, seeds)
        client = MlflowClient(uri)
        (parent,) = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id],
                                       "tags.`cnnlab.role` = 'sweep'")
        assert parent.info.status == "FINISHED" and parent.data.tags[keys.CHILDREN] == str(TRAININGS)
