"""A tracking store that cannot be used fails fast, before any work, in one line naming it; one
that goes away mid-training costs no training. Network faults use 127.0.0.1 only: a closed port,
a listener that accepts and never answers, a real `mlflow server` killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cnnlab import keys

from conftest import free_port, mlflow_server, tiny_overrides

pytestmark = pytest.mark.slow


def train_cli(workdir: Path, dataset: Path, *overrides: str, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    tiny = [o for o in tiny_overrides(dataset, workdir) if not o.startswith("paths.output_dir=")]
    return subprocess.Popen([sys.executable, "-m", "cnnlab.train", *tiny, "hydra.run.dir=run", *overrides],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture
def silent_listener():
    """A port on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("store", ["closed port", "never answers", "unwritable sqlite"])
def test_a_store_that_cannot_be_used_fails_before_any_work_in_one_line(tiny_dataset, tmp_path, store, request):
    if store == "closed port":
        uri = f"http://127.0.0.1:{free_port()}"
    elif store == "never answers":
        uri = f"http://127.0.0.1:{request.getfixturevalue('silent_listener')}"
    else:
        uri = "sqlite:////proc/cnnlab-nowhere/mlflow.db"
    started = time.monotonic()
    proc = train_cli(tmp_path, tiny_dataset, f"tracking.uri={uri}", "tracking.timeout_s=5")
    _, err = proc.communicate(timeout=300)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: tracking store {uri} cannot be used") and "logger=none" in line, line
    assert not (tmp_path / "data").exists()  # no data work started
    assert elapsed < 90, f"took {elapsed:.0f} s"  # imports take most of it on a loaded machine; the check ~5 s


def test_without_tracking_the_run_says_so(tiny_dataset, tmp_path):
    proc = train_cli(tmp_path, tiny_dataset, "logger=none")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "logger=none: this run is not tracked" in out + err
    assert (tmp_path / "run" / keys.TRAIN_METRICS).is_file()


def test_a_server_that_dies_mid_training_costs_no_training(tiny_dataset, tmp_path):
    epochs = 6
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    with mlflow_server(backend, tmp_path) as (url, server):
        proc = train_cli(tmp_path, tiny_dataset, f"tracking.uri={url}", "tracking.timeout_s=2",
                         "tracking.max_retries=1", f"trainer.max_epochs={epochs}")
        curves = tmp_path / "run" / keys.CURVES_CSV
        deadline = time.monotonic() + 300
        while not (curves.is_file() and len(curves.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, gone without a word
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    run = tmp_path / "run"
    assert [int(r.split(",")[0]) for r in (run / keys.CURVES_CSV).read_text().splitlines()[1:]] == \
        list(range(1, epochs + 1))
    record = json.loads((run / keys.TRAIN_METRICS).read_text())
    assert (run / keys.CHECKPOINT).is_file() and record[keys.TEST_ACC] is not None
    backlog = json.loads((run / "models" / "mlflow_backlog.json").read_text())
    assert backlog["run_id"] == record["mlflow_run_id"] and backlog["tracking_uri"] == url
    waiting = [p for w in backlog["not_logged"] if w["kind"] == "metrics" for p in w["points"]]
    assert {key for key, *_ in waiting} >= {keys.VAL_ACC, keys.TEST_ACC}  # kept, with their steps, to replay
    assert "not logged" in err + out and "mlflow_backlog.json" in err + out
    # What the server received before it died is in its store.
    client = MlflowClient(backend)
    logged = client.get_metric_history(record["mlflow_run_id"], keys.VAL_ACC)
    assert len(logged) >= 1 and len(logged) + sum(k == keys.VAL_ACC for k, *_ in waiting) == epochs
