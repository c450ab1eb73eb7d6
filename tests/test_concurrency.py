"""Several processes logging to one SQLite store at once lose nothing and never hit "database is locked"."""

from __future__ import annotations

import subprocess
import sys

from mlflow.tracking import MlflowClient

JOBS, STEPS = 6, 60

WORKER = """
import sys
from cnnlab.tracking import MLflowLogger
job, steps = int(sys.argv[1]), int(sys.argv[2])
logger = MLflowLogger("concurrency", f"job{job}")  # tracking URI from $MLFLOW_TRACKING_URI
logger.log_hyperparams({"job": job, "model.name": f"m{job}", "model.width": 1.0})
for step in range(steps):
    logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    logger.log_metrics({"acc": step / 100, "job": job}, step=step)
logger.finalize("success")
"""


def test_concurrent_writers_to_a_fresh_sqlite_store_lose_nothing(tmp_path):
    """Writers start together on a store that does not exist yet (so table creation races too)."""
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
