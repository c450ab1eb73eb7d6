"""The store's one client (cnnlab.tracking.store.StoreClient): every method retried and classified as
`retry` does, and no module outside the store wrapping calls in `retry` by hand."""

from __future__ import annotations

import ast
import os
import sqlite3

import pytest
import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnlab.tracking import store
from cnnlab.tracking.store import (
    HTTP_RETRIES_VAR,
    StoreClient,
    failure_kind,
    failure_reason,
    retry,
    single_try,
    store_call,
)

from conftest import REPO

ATTEMPTS = 8  # retry's default


def locked() -> MlflowException:
    """What MLflow raises when SQLite's busy timeout runs out: its error, from SQLAlchemy's."""
    cause = sqlalchemy.exc.OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
    try:
        raise MlflowException(f"(sqlite3.OperationalError) {cause.orig}") from cause
    except MlflowException as exc:
        return exc


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(store.time, "sleep", lambda s: None)  # retry's backoff
    raw = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # the test's own SQLite store
    return raw, StoreClient.wrap(raw)


def failing(monkeypatch, raw: MlflowClient, name: str, times: int, error=locked) -> list:
    """Make raw.<name> raise `error()` `times` times, then do what it does; the list counts the calls."""
    real, calls = getattr(raw, name), []

    def method(*args, **kwargs):
        calls.append(os.environ.get(HTTP_RETRIES_VAR))
        if len(calls) <= times:
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(raw, name, method)
    return calls


@pytest.mark.parametrize("name", ["create_experiment", "create_run", "set_tag", "log_batch", "get_run",
                                  "search_runs"])
def test_every_method_is_retried_while_sqlite_is_locked_and_raises_as_retry_does(name, client, monkeypatch):
    raw, retried = client
    experiment_id = raw.create_experiment("e")
    run_id = raw.create_run(experiment_id).info.run_id
    args = {"create_experiment": ("f",), "create_run": (experiment_id,), "set_tag": (run_id, "k", "v"),
            "log_batch": (run_id,), "get_run": (run_id,), "search_runs": ([experiment_id],)}[name]

    calls = failing(monkeypatch, raw, name, ATTEMPTS - 1)
    result = getattr(retried, name)(*args)
    assert len(calls) == ATTEMPTS  # 7 locked, then the call itself, whose result comes back
    if name == "get_run":
        assert result.info.run_id == run_id

    # Locked on every attempt: the client raises what retry raises, classified alike.
    calls = failing(monkeypatch, raw, name, 2 * ATTEMPTS)
    with pytest.raises(MlflowException) as by_client:
        getattr(retried, name)(*args)
    assert len(calls) == ATTEMPTS
    with pytest.raises(MlflowException) as by_retry:
        retry(getattr(raw, name), *args)
    assert len(calls) == 2 * ATTEMPTS
    assert failure_kind(by_client.value) == failure_kind(by_retry.value) == "down"
    assert failure_reason(by_client.value) == failure_reason(by_retry.value) == "database is locked"

    # An error SQLite's lock did not cause: asked once, raised as it came ("refused": the store said no).
    calls = failing(monkeypatch, raw, name, 1, error=lambda: MlflowException("no such run"))
    with pytest.raises(MlflowException, match="no such run") as refused:
        getattr(retried, name)(*args)
    assert len(calls) == 1 and failure_kind(refused.value) == "refused"


def test_a_real_refusal_passes_through_once_and_attributes_pass_through(client):
    raw, retried = client
    with pytest.raises(MlflowException) as exc:
        retried.get_run("0" * 32)  # no such run in the store
    assert failure_kind(exc.value) == "refused"
    assert retried.tracking_uri == raw.tracking_uri and retried.mlflow is raw
    assert StoreClient.wrap(retried) is retried


def test_single_try_and_store_call_keep_their_meaning(client, monkeypatch):
    raw, retried = client
    run_id = raw.create_run(raw.create_experiment("e")).info.run_id
    calls = failing(monkeypatch, raw, "set_tag", ATTEMPTS - 1)
    with single_try():  # MLflow's HTTP retries off, the lock's retries kept (as with retry)
        retried.set_tag(run_id, "k", "v")
    assert calls == ["0"] * ATTEMPTS

    # A write of several calls, retried as a whole: the calls inside are tried once each (no 8 x 8).
    calls = failing(monkeypatch, raw, "log_batch", 3 * ATTEMPTS)
    with pytest.raises(MlflowException):
        store_call(lambda: retried.log_batch(run_id))
    assert len(calls) == ATTEMPTS
    assert raw.get_run(run_id).data.tags["k"] == "v"


ALLOWED = {
    "tracking/store.py",  # where retry is
}


def test_no_module_outside_the_store_wraps_calls_in_retry():
    package = REPO / "src" / "cnnlab"
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).as_posix() in ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
                if name == "retry":
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, f"call the store through StoreClient (or store_call), not retry(...): {found}"
