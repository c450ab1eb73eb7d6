"""The shared tracking server of docs/shared-tracking-server.md, as a team runs it: a real
PostgreSQL cluster, `mlflow server` started by deploy/tracking-server.sh with proxied artifacts,
and a parallel Hydra sweep logging to it over HTTP. Everything listens on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from cnnlab.core import keys
from cnnlab.tracking.store import StoreUnavailable, ensure_experiment, mlflow_env

from conftest import REPO, free_port, http_server, stop_group, tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.needs("postgresql", "server")]

SCRIPT = REPO / "deploy" / "tracking-server.sh"
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: (len(p.parent.name), p.parent.name))
DB_USER, DB_PASSWORD = "mlflow", "pg-secret-7f3a"  # the password must never reach a command line
STARTUP_S = 90  # a loaded 2-core machine: importing mlflow in each server worker is slow
MODELS, SEEDS, EPOCHS = ("cnn", "cnn_strided"), (1,), 2


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL cluster (Debian's binaries) on 127.0.0.1 with password login; yields
    a function that creates a database and returns its password-free URI."""
    if not PG_BINS or not (PG_BINS[-1] / "initdb").exists():
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql); .ci/run installs it")
    import psycopg2

    bin_dir = PG_BINS[-1]
    # initdb and postgres refuse to run as root: as root, run them as the `postgres` system user in
    # a folder it owns (pytest's own tmp folders are root-only).
    as_user = {}
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        home = Path(tempfile.mkdtemp(prefix="cnnlab-pg-"))
        os.chown(home, owner.pw_uid, owner.pw_gid)
    else:
        home = tmp_path_factory.mktemp("pg")
    port = free_port()
    log_path = tmp_path_factory.getbasetemp() / f"postgres-{port}.log"
    try:
        (home / "pw").write_text(DB_PASSWORD + "\n")
        if as_user:
            os.chown(home / "pw", as_user["user"], as_user["group"])
        subprocess.run([bin_dir / "initdb", "-D", home / "data", "-U", DB_USER, "--pwfile", home / "pw",
                        "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync"],
                       check=True, capture_output=True, **as_user)
        with open(log_path, "wb") as log:
            # TCP on 127.0.0.1 only, no Unix socket; fsync off: a test cluster, thrown away after.
            server = subprocess.Popen([bin_dir / "postgres", "-D", home / "data", "-p", str(port),
                                       "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                                       "-c", "fsync=off"],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_user)
        try:
            deadline = time.monotonic() + STARTUP_S
            while True:
                try:
                    psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=DB_PASSWORD,
                                     dbname="postgres", connect_timeout=2).close()
                    break
                except psycopg2.OperationalError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"PostgreSQL did not start:\n{log_path.read_text()[-3000:]}") from None
                    time.sleep(0.5)

            def create_database(name: str) -> str:
                admin = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=DB_PASSWORD,
                                         dbname="postgres")
                admin.autocommit = True
                try:
                    admin.cursor().execute(f'CREATE DATABASE "{name}"')  # not in a transaction: no `with`
                finally:
                    admin.close()
                return f"postgresql://{DB_USER}@127.0.0.1:{port}/{name}"

            yield create_database
        finally:
            stop_group(server, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def tracking_server(db_uri: str, workdir: Path, **settings: str):
    """deploy/tracking-server.sh on 127.0.0.1, as documented: the database password in PGPASSWORD,
    artifacts in `workdir/artifacts`. Yields (base URL, artifacts folder, process)."""
    port, artifacts = free_port(), workdir / "artifacts"
    (workdir / "cwd").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "MLFLOW_BACKEND_STORE_URI": db_uri, "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts), "PGPASSWORD": DB_PASSWORD,
        "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "2",
        "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow"),
        # MLflow 3's job runner (GenAI jobs; cnnlab sends none): six more processes importing MLflow
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **settings}
    url = f"http://127.0.0.1:{port}"
    with http_server(["bash", SCRIPT], url, workdir / "server.log", cwd=workdir / "cwd", env=env, startup_s=STARTUP_S,
                     name="tracking server") as server:
        yield url, artifacts, server


def _client_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PG"))}
    return env | {"MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1", **extra}


def _overrides(dataset: Path, workdir: Path) -> list[str]:
    dropped = ("paths.output_dir=", "trainer.max_epochs=")  # Hydra picks each job's folder
    return [o for o in tiny_overrides(dataset, workdir, model=True) if not o.startswith(dropped)] + [
        f"trainer.max_epochs={EPOCHS}"]


def test_a_parallel_sweep_lands_whole_in_postgres_and_the_proxied_artifact_store(postgres, tiny_dataset, tmp_path):
    import psycopg2

    db_uri = postgres("mlflow")
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    with tracking_server(db_uri, tmp_path / "server") as (url, artifacts, server):
        # The database password is in the server's environment only, never on a command line.
        group = [p for p in psutil.process_iter(["cmdline"]) if _in_group(p, server.pid)]
        assert len(group) >= 2 and not any(DB_PASSWORD in " ".join(p.info["cmdline"] or []) for p in group)

        sweep = ["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", f"model={','.join(MODELS)}",
                 f"seed={','.join(map(str, SEEDS))}"]
        done = subprocess.run([sys.executable, "-m", "cnnlab.train", *sweep, *_overrides(tiny_dataset, client_dir)],
                              cwd=client_dir, env=_client_env(url), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("cnnlab")
        assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # proxied, not a path or bucket
        (parent,) = client.search_runs([experiment.experiment_id], "tags.`cnnlab.role` = 'sweep'")
        assert parent.info.status == "FINISHED" and parent.data.tags[keys.CHILDREN] == str(len(MODELS) * len(SEEDS))
        children = client.search_runs([experiment.experiment_id], "tags.`cnnlab.role` = 'train'")
        assert sorted((r.data.params[keys.MODEL_NAME], int(r.data.params["seed"])) for r in children) == \
            [(m, s) for m in MODELS for s in SEEDS]
        models = {m.source_run_id: m for m in client.search_logged_models([experiment.experiment_id])}
        folders = {str(p.parent.parent) for p in (client_dir / "outputs" / "sweeps").glob(f"*/*/*/{keys.CURVES_CSV}")}
        for run in children:
            run_id = run.info.run_id
            assert run.info.status == "FINISHED" and run.data.tags[keys.PARENT_RUN] == parent.info.run_id
            history = client.get_metric_history(run_id, keys.VAL_ACC)
            assert len({m.step for m in history}) == len(history) == EPOCHS, [(m.step, m.value) for m in history]
            assert 0 <= run.data.metrics[keys.TEST_ACC] <= 1
            # Curves: downloaded through the server, and physically in its artifacts folder.
            assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
            stored = artifacts / run.info.artifact_uri.removeprefix("mlflow-artifacts:/")
            downloaded = Path(client.download_artifacts(run_id, keys.CURVES_ARTIFACT, str(tmp_path / "dl" / run_id)))
            assert downloaded.read_bytes() == (stored / keys.CURVES_ARTIFACT).read_bytes()
            local = Path(run.data.params["paths.output_dir"])
            assert str(local) in folders and downloaded.read_bytes() == (local / keys.CURVES_CSV).read_bytes()
            assert len(downloaded.read_text().splitlines()) == 1 + EPOCHS  # header and one row per epoch
            # The model (MLflow 3 files it under the experiment, not the run) likewise.
            model = models[run_id]
            assert model.artifact_location.startswith("mlflow-artifacts:/")
            stored_model = artifacts / model.artifact_location.removeprefix("mlflow-artifacts:/")
            assert (stored_model / "MLmodel").is_file() and any(stored_model.rglob("*.pt2"))
        import mlflow.pytorch
        import torch

        mlflow.set_tracking_uri(url)  # the autouse fixture's SQLite store otherwise wins in-process
        net = mlflow.pytorch.load_model(f"runs:/{children[0].info.run_id}/{keys.MODEL_ARTIFACT}",
                                        dst_path=str(tmp_path / "dl" / "model"))
        probabilities = net(torch.rand(3, 1, 28, 28))
        assert probabilities.shape == (3, 10) and torch.allclose(probabilities.sum(1), torch.ones(3), atol=1e-4)

        # The rows are in PostgreSQL (asked directly, not through MLflow).
        with psycopg2.connect(db_uri, password=DB_PASSWORD) as db, db.cursor() as cur:
            cur.execute("SELECT run_uuid, status, artifact_uri FROM runs WHERE experiment_id = %s",
                        (int(experiment.experiment_id),))
            rows = {run_id: (status, uri) for run_id, status, uri in cur.fetchall()}
            cur.execute("SELECT run_uuid, count(*) FROM metrics WHERE key = %s GROUP BY run_uuid", (keys.VAL_ACC,))
            val_points = dict(cur.fetchall())
        db.close()
        assert set(rows) == {parent.info.run_id, *(r.info.run_id for r in children)}
        assert all(status == "FINISHED" and uri.startswith("mlflow-artifacts:/") for status, uri in rows.values())
        assert {r.info.run_id: val_points[r.info.run_id] for r in children} == {r.info.run_id: EPOCHS for r in children}

    # Nothing was written to a local store by the client, nor next to the server.
    for folder in (client_dir, tmp_path / "server" / "cwd"):
        strays = [p for name in ("mlruns", "mlartifacts", "mlflow.db") for p in folder.rglob(name)]
        assert not strays, strays


ADMIN_PASSWORD, ALICE_PASSWORD = "admin-pw-0c41d9e2", "alice-pw-5b7e11aa"


def test_with_basic_auth_a_client_without_credentials_is_refused_in_one_line(postgres, tiny_dataset, tmp_path):
    """MLFLOW_AUTH=basic: users in their own PostgreSQL database; no or wrong credentials give
    one `error:` line saying what to set, before any training; a user's credentials train."""
    import requests

    pytest.importorskip("flask_wtf", reason="mlflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'")
    db_uri, users_uri = postgres("mlflow_auth_runs"), postgres("mlflow_users")
    config = tmp_path / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\nadmin_username = admin\n"
                      f"database_uri = {users_uri.replace('postgresql://', 'postgresql+psycopg2://')}\n")
    settings = {"MLFLOW_AUTH": "basic", "MLFLOW_AUTH_CONFIG_PATH": str(config),
                "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-3c9d0b"}
    with tracking_server(db_uri, tmp_path / "server", **settings) as (url, _, _):
        created = requests.post(f"{url}/api/2.0/mlflow/users/create", auth=("admin", ADMIN_PASSWORD), timeout=30,
                                json={"username": "alice", "password": ALICE_PASSWORD})
        assert created.status_code == 200, created.text
        train = [sys.executable, "-m", "cnnlab.train", *_overrides(tiny_dataset, tmp_path / "job"),
                 "trainer.max_epochs=1", "~callbacks.mlflow_model"]
        refused = subprocess.run(train, cwd=tmp_path, env=_client_env(url), capture_output=True, text=True, timeout=300)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert refused.returncode == 1 and len(errors) == 1, refused.stderr[-3000:]
        assert errors[0] == f"error: tracking store {url} cannot be used (HTTP 401: set MLFLOW_TRACKING_USERNAME and " \
            "MLFLOW_TRACKING_PASSWORD): start the server or fix $MLFLOW_TRACKING_URI, or train without tracking with " \
            "logger=none", errors[0]
        assert "Traceback" not in refused.stderr and not list(tmp_path.rglob(keys.TRAIN_METRICS))
        with mlflow_env(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD="wrong-password-1"), \
                pytest.raises(StoreUnavailable, match="HTTP 401: set MLFLOW_TRACKING_USERNAME"):
            ensure_experiment(url, "cnnlab")  # a wrong password: the same line (the CLI path is shown above)

        alice = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": ALICE_PASSWORD}
        done = subprocess.run(train, cwd=tmp_path, env=_client_env(url, **alice), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        with mlflow_env(**alice):  # MlflowClient reads the credentials from the environment
            client = MlflowClient(url)
            (run,) = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
            assert run.info.status == "FINISHED" and keys.TEST_ACC in run.data.metrics
            curves = client.download_artifacts(run.info.run_id, keys.CURVES_ARTIFACT, str(tmp_path / "dl"))
            assert Path(curves).read_text() == (Path(run.data.params["paths.output_dir"]) / keys.CURVES_CSV).read_text()
        anonymous = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "cnnlab"},
                                 timeout=30)
        assert anonymous.status_code == 401


def _in_group(proc: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(proc.pid) == pgid
    except (ProcessLookupError, psutil.Error):
        return False
