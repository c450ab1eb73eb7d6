"""A tracking store that cannot be used fails before any work, in one line naming it; one that
goes away mid-training costs no training. Real processes and sockets on 127.0.0.1 only: a closed
port, a listener that accepts and never answers, SQLite paths that cannot be opened, a real
`mlflow server` killed or frozen mid-training, and one that comes back."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import requests
import torch
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.tracking import MlflowClient

from cnnlab.core import keys
from cnnlab.tracking import sync
from cnnlab.tracking.logger import BACKLOG_FILE, MLflowLogger
from cnnlab.tracking.store import StoreUnavailable, global_store
from cnnlab.tracking.sync import close_orphaned_runs

import conftest
from conftest import free_port, mlflow_server, tiny_overrides


def cli(workdir: Path, dataset: Path, *overrides: str, sweep: bool = False, env: dict | None = None):
    """`python -m cnnlab.train` as a user runs it, output in <workdir>/run (a sweep: <workdir>/sweep);
    (exit status, stderr, stdout, seconds)."""
    where = f"hydra.sweep.dir={workdir / 'sweep'}" if sweep else f"hydra.run.dir={workdir / 'run'}"
    args = [o for o in tiny_overrides(dataset, workdir) if not o.startswith("paths.output_dir=")] + [where]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cnnlab.train", *(["-m"] if sweep else []), *args, *overrides],
                            cwd=workdir, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stderr, result.stdout, time.monotonic() - started


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
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


def unusable_uri(store: str, request, tmp_path: Path) -> str:
    if store == "closed port":
        return f"http://127.0.0.1:{free_port()}"  # bound, then closed: nothing listens
    if store == "never answers":
        return f"http://127.0.0.1:{request.getfixturevalue('silent_port')}"
    if store == "sqlite, no such folder":
        return "sqlite:////proc/cnnlab-nowhere/mlflow.db"  # /proc takes no new folders, even from root
    return f"sqlite:///{tmp_path}"  # a folder where the database file should be


STORES = ["closed port", "never answers", "sqlite, no such folder", "sqlite, a folder"]
REASONS = {"closed port": "connection refused", "never answers": "no answer within", "sqlite, no such folder":
           "No such file or directory", "sqlite, a folder": "unable to open the database file"}


@pytest.mark.parametrize("store", STORES)
def test_building_the_logger_on_an_unusable_store_fails_in_about_timeout_s(store, request, tmp_path):
    uri = unusable_uri(store, request, tmp_path)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as error:
        MLflowLogger("faults", "run", uri=uri, timeout_s=2, max_retries=3)
    elapsed = time.monotonic() - started
    message = str(error.value)
    assert message.startswith(f"tracking store {uri} cannot be used ({REASONS[store]}") and "\n" not in message
    assert "logger=none" in message and ("start the server" in message) == uri.startswith("http")
    # Asked once, without the 3 retries: one timeout (2 s) for the silent port, none for the others.
    assert elapsed < (6 if store == "never answers" else 3), f"{elapsed:.1f} s"


@pytest.fixture(scope="module")
def startup_s(tiny_dataset, tmp_path_factory) -> float:
    """What a training that stops at its config check takes here (imports, composing): the
    baseline the tracking check's own time is measured against on a loaded machine."""
    status, err, _, seconds = cli(tmp_path_factory.mktemp("baseline"), tiny_dataset, "trainer.max_epochs=0")
    assert status == 1 and "trainer.max_epochs" in err, err[-2000:]
    return seconds


@pytest.mark.e2e
@pytest.mark.parametrize("store", ["closed port", "never answers", "sqlite, no such folder"])
def test_a_training_on_an_unusable_store_stops_before_any_work_in_one_line(store, request, tiny_dataset, tmp_path,
                                                                          startup_s):
    uri = unusable_uri(store, request, tmp_path)
    status, err, out, seconds = cli(tmp_path, tiny_dataset, f"tracking.uri={uri}")  # the default 10 s timeout
    assert status == 1 and "Traceback" not in err + out, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: tracking store {uri} cannot be used ({REASONS[store]}"), line
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "models").exists()  # no data work, no run
    # Asked once (a retried store would wait minutes: MLflow's backoff, or 4 x 10 s for the silent port).
    # The allowance over the baseline is for the imports a training adds before it asks (the model,
    # the logger, MLflow) on a loaded 2-core machine, where they took up to 15 s more than alone.
    assert seconds - startup_s < (20 + 10 if store == "never answers" else 20), f"{seconds:.0f} s ({startup_s:.0f})"


@pytest.mark.e2e
def test_a_sweep_on_an_unusable_store_stops_before_any_job(tiny_dataset, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    status, err, out, _ = cli(tmp_path, tiny_dataset, "seed=1,2", f"tracking.uri={uri}", sweep=True)
    assert status == 1 and "Traceback" not in err + out, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: tracking store {uri} cannot be used (connection refused)"), line
    assert "Launching" not in out + err and not (tmp_path / "data").exists()
    assert not [p for p in (tmp_path / "sweep").glob("*") if p.is_dir()]  # no job folder


@pytest.mark.e2e
def test_logger_none_needs_no_store_and_says_the_run_is_not_tracked(tiny_dataset, tmp_path):
    """A sweep too: with logger=none not even the sweep's parent run is opened, so a store that
    cannot be used does not matter."""
    dead = f"http://127.0.0.1:{free_port()}"
    status, err, out, _ = cli(tmp_path, tiny_dataset, "logger=none", "seed=1,2", sweep=True,
                              env={"MLFLOW_TRACKING_URI": dead})
    assert status == 0, err[-3000:]
    assert (out + err).count("this run is not tracked") == 2  # once per job
    assert "tracking store" not in out + err  # nothing asked the store
    jobs = sorted(p for p in (tmp_path / "sweep").glob("*") if p.is_dir())
    assert len(jobs) == 2 and all((job / keys.TRAIN_METRICS).is_file() for job in jobs)
    assert not list((tmp_path / "sweep").rglob("mlflow_*.json"))  # no run pointer, no parent run, no backlog


@pytest.mark.e2e
@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_server_that_goes_away_mid_training_costs_no_training(fault, tiny_dataset, tmp_path, monkeypatch):
    """Killed (SIGKILL: connections refused) or frozen (SIGSTOP: connections accepted, never
    answered) once the first epoch is done: the training finishes, exit 0, every output written;
    what the server never received is listed in models/mlflow_backlog.json, with steps. Killed: then
    `cnnlab sync` keeps it all while the server is away, and once it is back on the same port the
    next `cnnlab compare` sends it first: the run ends FINISHED, whole, each point once."""
    epochs, backend, port = 6, f"sqlite:///{tmp_path / 'server.db'}", free_port()
    monkeypatch.setattr(conftest, "free_port", lambda: port)  # a restarted server on the same address
    run = tmp_path / "run"
    with mlflow_server(backend, tmp_path) as (url, server):
        overrides = [f"tracking.uri={url}", "tracking.timeout_s=2", "tracking.max_retries=1",
                     f"trainer.max_epochs={epochs}", f"hydra.run.dir={run}"]
        args = [o for o in tiny_overrides(tiny_dataset, tmp_path, model=fault == "killed")
                if not o.startswith("paths.output_dir=")]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        proc = subprocess.Popen([sys.executable, "-m", "cnnlab.train", *args, *overrides], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        curves, deadline = run / keys.CURVES_CSV, time.monotonic() + 300
        while not (curves.is_file() and len(curves.read_text().splitlines()) >= 2):  # epoch 1 done
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        gone = time.monotonic()
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert proc.returncode == 0, err[-3000:]
    # Each try waits 2 s (frozen) or not at all (killed), and the store is asked at most every
    # 30 s: a few tries, not the 16 minutes MLflow's own retries took.
    assert time.monotonic() - gone < 90
    assert [int(r.split(",")[0]) for r in curves.read_text().splitlines()[1:]] == list(range(1, epochs + 1))
    record = json.loads((run / keys.TRAIN_METRICS).read_text())
    assert (run / keys.CHECKPOINT).is_file() and record[keys.TEST_ACC] is not None
    backlog = json.loads((run / "models" / BACKLOG_FILE).read_text())
    assert backlog["run_id"] == record["mlflow_run_id"] and backlog["tracking_uri"] == url
    waiting = [p for w in backlog["not_logged"] if w["kind"] == "metrics" for p in w["points"]]
    assert {keys.VAL_ACC, keys.TEST_ACC} <= {p["key"] for p in waiting}
    assert all(isinstance(p["step"], int) and p["timestamp"] > 0 for p in waiting)
    (end,) = [w for w in backlog["not_logged"] if w["kind"] == "status" and w["status"] == "FINISHED"][-1:]
    assert 0 < time.time() * 1000 - end["end_time"] < 300_000
    assert f"they are listed in {run / 'models' / BACKLOG_FILE}" in out + err and "Traceback" not in out + err
    # The store has what arrived before the fault (epoch 1 at least, and the run's params), and
    # with the backlog every epoch's point once.
    client = MlflowClient(backend)
    logged = client.get_metric_history(record["mlflow_run_id"], keys.VAL_ACC)
    steps = {m.step for m in logged} | {p["step"] for p in waiting if p["key"] == keys.VAL_ACC}
    assert len(logged) >= 1 and len(steps) == epochs
    assert client.get_run(record["mlflow_run_id"]).data.params["tracking.timeout_s"] == "2"
    if fault == "killed":
        store_comes_back(run, url, backend, record["mlflow_run_id"], backlog, env, epochs, tmp_path)


def store_comes_back(run: Path, url: str, backend: str, run_id: str, backlog: dict, env: dict, epochs: int,
                     workdir: Path) -> None:
    """The killed server's backlog: kept, byte for byte, by `cnnlab sync` while the server is away; sent
    by `cnnlab compare` once it is back on the same address."""
    file, cnnlab = run / "models" / BACKLOG_FILE, str(Path(sys.executable).parent / "cnnlab")
    before = file.read_bytes()
    away = subprocess.run([cnnlab, "sync"], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert away.returncode == 1 and file.read_bytes() == before, away.stderr[-3000:]
    (line,) = [line for line in away.stderr.splitlines() if "backlog" in line]
    assert line.startswith(f"error: tracking store {url} is still not answering (connection refused): 1 run's "
                           f"backlog (") and "run `cnnlab sync` when it is back" in line, away.stderr
    assert "Traceback" not in away.stderr and (run / "models" / "mlflow_backlog" / run_id).is_dir()
    with mlflow_server(backend, workdir) as (url_again, _):
        assert url_again == url
        compare = subprocess.run([cnnlab, "compare", "--tracking-uri", url, "--output", str(workdir / "report")],
                                 cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        assert compare.returncode == 0, compare.stderr[-3000:]
        assert f"run {run_id}: sent " in compare.stderr and "marked KILLED" not in compare.stderr, compare.stderr
        assert "refused" not in compare.stderr and "not kept" not in compare.stderr, compare.stderr
        with global_store(url):
            model = mlflow.pytorch.load_model(f"runs:/{run_id}/{keys.MODEL_ARTIFACT}")  # the LoggedModel of the run
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert not file.exists() and not (run / "models" / "mlflow_backlog").exists()
    assert not list((workdir / "outputs" / ".unfinished" / "backlogs").glob("*"))
    client, waiting = MlflowClient(backend), backlog["not_logged"]
    stored = client.get_run(run_id)
    (end,) = [w for w in waiting if w["kind"] == "status"][-1:]
    assert stored.info.status == "FINISHED" and stored.info.end_time == end["end_time"]
    # Every point once (Lightning logs `epoch` with both the training and the validation metrics of a step:
    # a point is its key, step and time).
    history = {key: [(m.step, m.timestamp) for m in client.get_metric_history(run_id, key)]
               for key in stored.data.metrics}
    assert all(len(points) == len(set(points)) for points in history.values()), history
    assert all(history[p["key"]].count((p["step"], p["timestamp"])) == 1
               for w in waiting if w["kind"] == "metrics" for p in w["points"])
    assert len(client.get_metric_history(run_id, keys.VAL_ACC)) == epochs and keys.TEST_ACC in stored.data.metrics
    for what in waiting:
        if what["kind"] == "params":
            assert what["params"].items() <= stored.data.params.items()
        if what["kind"] == "tags":
            assert what["tags"].items() <= stored.data.tags.items()
        if what["kind"] == "artifact":
            folder = what.get("folder") or str(Path(what["path"]).parent)
            names = {a.path for a in client.list_artifacts(run_id, folder)}
            assert f"{folder}/{Path(what['path']).name}" in names, (what, names)
    assert {"model"} <= {w["kind"] for w in waiting}
    (logged,) = [m for m in client.search_logged_models([stored.info.experiment_id]) if m.source_run_id == run_id]
    assert logged.name == keys.MODEL_ARTIFACT and str(logged.status) == "READY"


@pytest.mark.e2e
def test_what_waited_is_logged_when_the_server_comes_back(tmp_path, monkeypatch, caplog):
    port, backend = free_port(), f"sqlite:///{tmp_path / 'server.db'}"
    monkeypatch.setattr(conftest, "free_port", lambda: port)  # both servers on the same address
    pointer = tmp_path / keys.RUN_POINTER
    with mlflow_server(backend, tmp_path) as (url, _):
        logger = MLflowLogger("faults", "comeback", uri=url, run_pointer=str(pointer), timeout_s=2, max_retries=0)
        logger.log_metrics({"m": 1.0}, step=1)
    with caplog.at_level(logging.WARNING, logger="cnnlab.tracking.logger"):
        logger.log_metrics({"m": 2.0}, step=2)  # refused: waits
        started = time.monotonic()
        logger.log_metrics({"m": 3.0}, step=3)
        logger.set_tags({"cnnlab.test": "kept"})
        assert time.monotonic() - started < 1  # within 30 s of a failure the store is not asked again
        measured = int(time.time() * 1000)
        assert len(logger.backlog.waiting) == 3
        with mlflow_server(backend, tmp_path) as (url_again, _):
            assert url_again == url
            logger.finalize("success")  # the end of the run: one more try, which now succeeds
    assert not logger.backlog.waiting and not (pointer.parent / BACKLOG_FILE).exists()
    assert "stopped answering (connection refused)" in caplog.text and "answers again" in caplog.text
    client = MlflowClient(backend)
    history = sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(logger.run_id, "m"))
    assert [(s, v) for s, v, _ in history] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert all(t <= measured for *_, t in history)  # stamped when measured, not when sent
    run = client.get_run(logger.run_id)
    assert run.data.tags["cnnlab.test"] == "kept" and run.info.status == "FINISHED"


def test_a_backlog_is_sent_once_when_its_store_is_back_even_by_a_sync_cut_short(tmp_path, monkeypatch, capsys):
    """The Backlog of a run whose store went away (here: every write refused a connection) saved at
    its end, with the files of its artifacts; the run, whose process is gone, is not closed as
    KILLED while it waits; a sync cut short after two writes, a point the store took without
    answering: then `cnnlab sync` sends the rest, each point once, the status last."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    monkeypatch.chdir(tmp_path)  # the project whose index lists the backlog
    uri, pointer = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run" / keys.RUN_POINTER
    logger = MLflowLogger("faults", "backlog", uri=uri, run_pointer=str(pointer), system_metrics_interval_s=None)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"m": 1.0}, step=1)
    curves = tmp_path / "curves.csv"
    curves.write_text("epoch\n1\n")
    with monkeypatch.context() as away:
        def refused(*args, **kwargs):
            raise requests.ConnectionError("[Errno 111] Connection refused")
        for name in ("log_batch", "log_artifact", "log_text", "log_dict", "log_inputs", "get_run", "set_terminated"):
            away.setattr(logger.experiment, name, refused)
        logger.log_metrics({"m": 2.0, "n": float("nan")}, step=2)
        logger.log_hyperparams({"optimizer": {"lr": 0.1, "name": "adam"}})
        logger.set_tags({"cnnlab.test": "kept"})
        logger.log_text("hello", "notes/hello.txt")
        logger.log_dict({"a": 1}, keys.CONFIG_ARTIFACT)
        logger.log_artifact(curves, "metrics")
        logger.log_datasets([(MetaDataset(LocalArtifactDatasetSource(str(tmp_path)), name="d-train", digest="abc"),
                              "train")])
        logger.log_metrics({"m": 3.0}, step=3)
        logger.finalize("success")
    curves.write_text("epoch\n1\n2\n")  # the next training writes over it: the run keeps its own
    file, run_id, client = pointer.parent / BACKLOG_FILE, logger.run_id, MlflowClient(uri)
    record = json.loads(file.read_text())
    assert [w["kind"] for w in record["not_logged"]] == ["metrics", "params", "tags", "artifact", "artifact",
                                                        "artifact", "datasets", "metrics", "status"]
    assert (tmp_path / "outputs" / ".unfinished" / "backlogs" / f"{run_id}.json").is_file()
    client.set_tag(run_id, keys.PROCESS, "4194304:0")  # no such process: it is gone
    assert close_orphaned_runs(client, [logger.experiment_id]) == []
    assert client.get_run(run_id).info.status == "RUNNING"

    written, real_write = [], sync._write
    def cut_short(client, run, what, base, seen):
        if len(written) == 2:
            raise requests.ConnectionError("[Errno 111] Connection refused")
        real_write(client, run, what, base, seen)
        written.append(what)
    with monkeypatch.context() as cut:
        cut.setattr(sync, "_write", cut_short)
        assert sync.main([]) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"error: tracking store {uri} is still not answering (connection refused): 1 run's backlog (" in line
    left = json.loads(file.read_text())["not_logged"]
    assert left == record["not_logged"][2:] and [w["kind"] for w in written] == ["metrics", "params"]
    (last,) = [w for w in left if w["kind"] == "metrics"]
    client.log_metric(run_id, "m", 3.0, last["points"][0]["timestamp"], 3)  # taken, but its answer never came

    assert sync.main([]) == 0
    assert f"run {run_id}: sent 0 metric points, 3 artifacts, 3 other writes" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == record["not_logged"][-1]["end_time"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "m")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [m.step for m in client.get_metric_history(run_id, "n")] == [2]
    assert run.data.params["optimizer/name"] == "adam" and run.data.tags["cnnlab.test"] == "kept"
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["d-train"]
    artifacts = tmp_path / "artifacts"
    client.download_artifacts(run_id, "", str(artifacts.mkdir() or artifacts))
    assert (artifacts / "notes" / "hello.txt").read_text() == "hello"
    assert json.loads((artifacts / keys.CONFIG_ARTIFACT).read_text()) == {"a": 1}
    assert (artifacts / "metrics" / "curves.csv").read_text() == "epoch\n1\n"
    assert not file.exists() and not (file.parent / "mlflow_backlog").exists()
    assert not list((tmp_path / "outputs" / ".unfinished" / "backlogs").iterdir())
    assert sync.main([]) == 0 and "nothing to send" in capsys.readouterr().out


def test_a_backlog_whose_store_is_still_away_is_kept_whole(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    file = tmp_path / "models" / BACKLOG_FILE
    points = [{"key": "m", "value": 1.0, "step": s, "timestamp": 1000 + s} for s in range(3)]
    record = {"tracking_uri": uri, "run_id": "0123", "error": "connection refused", "refused": [],
              "not_logged": [{"kind": "metrics", "points": points}, {"kind": "params", "params": {"lr": "0.1"}},
                             {"kind": "status", "status": "FINISHED", "end_time": 5000}]}
    file.parent.mkdir()
    file.write_text(json.dumps(record))
    before = file.read_bytes()
    started = time.monotonic()
    assert sync.main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err == (f"error: tracking store {uri} is still not answering (connection refused): 1 run's backlog "
                   f"(3 metric points, 0 artifacts, 2 other writes) kept in {file}; run `cnnlab sync` when it is "
                   f"back\n") and out == ""
    assert file.read_bytes() == before and time.monotonic() - started < 5  # asked once


def test_a_write_the_store_refuses_is_listed_and_the_training_goes_on(tmp_path, caplog):
    uri, pointer = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / keys.RUN_POINTER
    logger = MLflowLogger("faults", "refused", uri=uri, run_pointer=str(pointer))
    logger.log_hyperparams({"lr": 0.1})
    with caplog.at_level(logging.WARNING, logger="cnnlab.tracking.logger"):
        logger.log_hyperparams({"lr": 0.2})  # MLflow never changes a logged param: it answers no
        logger.log_metrics({"m": 1.0}, step=1)
        logger.finalize("success")
    assert "refused a write" in caplog.text
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(logger.run_id, "m")] == [1.0]
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    backlog = json.loads((pointer.parent / BACKLOG_FILE).read_text())
    (refused,) = backlog["refused"]
    assert refused["params"] == {"lr": "0.2"} and "lr" in refused["error"] and backlog["not_logged"] == []


def test_the_config_sets_mlflows_http_client_over_the_environment(tmp_path, monkeypatch, caplog):
    """tracking.timeout_s and max_retries win over MLFLOW_HTTP_REQUEST_* exported in a shell
    (cnnlab.tracking.store.http_settings says why), and the warning names what was replaced."""
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_TIMEOUT.name, "300")
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "7")
    with caplog.at_level(logging.WARNING, logger="cnnlab.tracking.store"):
        MLflowLogger("faults", "env", uri=f"sqlite:///{tmp_path / 'mlflow.db'}", timeout_s=4, max_retries=2)
    timeout, retries = MLFLOW_HTTP_REQUEST_TIMEOUT.name, MLFLOW_HTTP_REQUEST_MAX_RETRIES.name
    assert (os.environ[timeout], os.environ[retries]) == ("4", "2")  # the start-up check's 0 retries undone
    assert f"{timeout}=300 in the environment is replaced by tracking.timeout_s=4" in caplog.text
    assert f"{retries}=7 in the environment is replaced by tracking.max_retries=2" in caplog.text
