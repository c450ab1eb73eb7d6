"""`cnnlab sync`: send the writes a tracking store never took to it once it is back.

A training whose store went away goes on (cnnlab.tracking.backlog.Backlog) and writes what waits to
models/mlflow_backlog.json beside its run pointer: metric points with their step and time, params,
tags, datasets, the run's end status and end time, and (in models/mlflow_backlog/<run id>/) the
files of the artifacts and the model. An index, <project>/outputs/.unfinished/backlogs/, lists the
backlog of every training of the project, wherever its output folder is. `cnnlab sync` sends them,
in order, the status last; `cnnlab train` and `cnnlab compare` try it first (once, quietly), and no
run whose backlog waits is ever marked KILLED (close_orphaned_runs, below).

Each point arrives once: the backlog file is rewritten after every write the store took (a sync
cut short goes on where it stopped), and a point whose key, step and time the store already has
is not sent again. MLflow is imported where it is used: `cnnlab sync --help` starts fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.core import keys
from cnnlab.core.config import project_root
from cnnlab.core.errors import CnnlabError, command, one_line, show
from cnnlab.core.files import write_atomic

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from cnnlab.tracking.store import StoreClient

log = logging.getLogger(__name__)
BACKLOG_FILE = "mlflow_backlog.json"  # beside the run pointer: what a vanished store never received
SPOOL_DIR = "mlflow_backlog"          # beside it, <run id>/<n>/: the files of the artifacts that wait
ARTIFACT_KINDS = ("artifact", "model")


def index_dir() -> Path:
    """Where every training of the project lists its backlog (beside resume's index of unfinished trainings)."""
    return project_root() / "outputs" / ".unfinished" / "backlogs"


def register(path: Path, run_id: str) -> None:
    write_atomic(index_dir() / f"{run_id}.json", json.dumps({"backlog": str(Path(path).resolve())}) + "\n")


def unregister(run_id: str | None) -> None:
    if run_id:
        (index_dir() / f"{run_id}.json").unlink(missing_ok=True)


def counts(entries: list[dict]) -> tuple[int, int, int]:
    """(metric points, artifacts, other writes: params, tags, datasets, the run's status)."""
    points = sum(len(w.get("points", ())) for w in entries)
    artifacts = sum(w["kind"] in ARTIFACT_KINDS for w in entries)
    return points, artifacts, len(entries) - artifacts - sum(w["kind"] == "metrics" for w in entries)


def describe(entries: list[dict]) -> str:
    points, artifacts, other = counts(entries)
    return f"{points} metric points, {artifacts} artifacts, {other} other writes"


def load(path: Path) -> dict | None:
    """A backlog file's record, or None if it is gone or not one (a half-written file cannot be:
    it is written atomically)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "not_logged" in record else None


def backlog_files(paths: list[Path] | None = None) -> list[Path]:
    """The backlog files named (a folder: every mlflow_backlog.json under it), else the project's
    models/ one and every one the index lists (an entry whose file is gone is dropped)."""
    found: list[Path] = []
    if paths:
        for path in paths:
            if path.is_dir():
                found += sorted(path.rglob(f"{Path(BACKLOG_FILE).stem}*.json"))  # mlflow_backlog-<run id>.json too
            elif path.is_file():
                found.append(path)
            else:
                raise CnnlabError(f"no MLflow backlog at {path}")
    else:
        found.append(project_root() / "models" / BACKLOG_FILE)
        index = index_dir()
        for entry in sorted(index.glob("*.json")) if index.is_dir() else ():
            try:
                path = Path(json.loads(entry.read_text())["backlog"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if path.is_file():
                found.append(path)
            else:  # the training's folder was removed: nothing left to send
                entry.unlink(missing_ok=True)
    unique = {p.resolve(): p for p in found if p.is_file()}
    return list(unique.values())


def pending_run_ids() -> set[str]:
    """The runs whose writes wait in one of the project's backlogs: their process is gone, but they
    are not KILLED (close_orphaned_runs leaves them alone)."""
    records = (load(path) for path in backlog_files())
    return {r["run_id"] for r in records if r and r.get("run_id") and r["not_logged"]}


class StoreAway(Exception):
    """The store of a backlog did not answer: what has not been sent stays in the file."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri, self.reason = uri, reason


def send(path: Path, wait: bool = True) -> dict | None:
    """Send one backlog file to its store, in order, the run's status last; remove it and its spooled
    files once sent (a file still lists the writes the store refused, if any). Returns what was sent,
    or None when nothing waits there (or, with wait=False, another process is sending it). Raises
    StoreAway, with the file holding whatever was not sent."""
    from filelock import FileLock, Timeout

    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=300 if wait else 0)  # a concurrent sync would send the same points
    except Timeout:
        if wait:
            raise CnnlabError(f"{path} is being sent by another process (its lock {path}.lock is held)") from None
        return None
    try:
        record = load(path)
        if not record or not record["not_logged"] or not record.get("run_id"):
            return None
        return _send(path, record)
    finally:
        lock.release()
        if not path.exists():
            Path(f"{path}.lock").unlink(missing_ok=True)


def _send(path: Path, record: dict) -> dict:
    from cnnlab.tracking.store import StoreClient, default_http_settings, failure_kind, failure_reason, single_try

    uri, run_id = record["tracking_uri"], record["run_id"]
    default_http_settings()  # MLflow's own would wait minutes on a dead server
    client = StoreClient(uri)
    statuses = [w for w in record["not_logged"] if w["kind"] == "status"]
    # The run shows its end only once everything else has arrived (the last status is the run's end).
    writes = [w for w in record["not_logged"] if w["kind"] != "status"] + statuses[-1:]
    sent, refused = [], record.setdefault("refused", [])
    try:
        with single_try():  # the first contact: a store still away costs one timeout
            run = client.get_run(run_id)
            seen = _points_in_store(client, run_id, writes)
    except Exception as exc:
        if failure_kind(exc) in ("down", "failed"):
            raise StoreAway(uri, failure_reason(exc)) from None
        if failure_kind(exc) == "refused":  # e.g. the run was deleted, or the backlog names another store
            raise CnnlabError(f"{path}: run {run_id} cannot be read from {uri} ({one_line(exc)[:300]})") from None
        raise
    while writes:
        what = writes[0]
        try:
            sent.append(_write(client, run, what, path.parent, seen) or what)
        except Exception as exc:
            failure = failure_kind(exc)
            if failure in ("down", "failed"):
                raise StoreAway(uri, failure_reason(exc)) from None
            if failure is None and not isinstance(exc, (CnnlabError, OSError)):
                raise
            refused.append({**what, "error": one_line(exc)[:500]})
            log.warning("tracking store %s refused a write to run %s (%s): it is not tried again", uri, run_id,
                        one_line(exc)[:300])
        writes.pop(0)
        record["not_logged"] = writes
        if writes or refused:  # what is left, so that a sync cut short sends nothing twice
            write_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
    if not refused:
        path.unlink(missing_ok=True)
    shutil.rmtree(path.parent / SPOOL_DIR / run_id, ignore_errors=True)
    if (path.parent / SPOOL_DIR).is_dir() and not any((path.parent / SPOOL_DIR).iterdir()):
        (path.parent / SPOOL_DIR).rmdir()
    unregister(run_id)
    return {"uri": uri, "run_id": run_id, "sent": sent, "refused": refused,
            "status": statuses[-1]["status"] if statuses else None}


def _points_in_store(client: StoreClient, run_id: str, writes: list[dict]) -> set[tuple]:
    """(key, step, timestamp) of the backlog's metric keys the store has: points a write had taken
    though its answer never came, or that a sync cut short had sent."""
    metric_keys = {p["key"] for w in writes if w["kind"] == "metrics" for p in w["points"]}
    return {(m.key, m.step, m.timestamp) for key in sorted(metric_keys)
            for m in client.get_metric_history(run_id, key)}


def _write(client: StoreClient, run, what: dict, base: Path, seen: set[tuple]) -> dict | None:
    """One write of a backlog, as the training would have made it; for metrics, what was sent."""
    from mlflow.entities import Metric, Param, RunTag

    run_id, kind = run.info.run_id, what["kind"]
    if kind == "metrics":
        points = [Metric(p["key"], math.nan if p["value"] is None else float(p["value"]), p["timestamp"], p["step"])
                  for p in what["points"] if (p["key"], p["step"], p["timestamp"]) not in seen]
        for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=points[i:i + 1000])
        sent = {(m.key, m.step, m.timestamp) for m in points}
        seen.update(sent)
        return {**what, "points": [p for p in what["points"] if (p["key"], p["step"], p["timestamp"]) in sent]}
    elif kind == "params":
        params = [Param(k, str(v)) for k, v in what["params"].items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in what["tags"].items()])
    elif kind == "datasets":
        client.log_inputs(run_id, datasets=_dataset_inputs(what))
    elif kind in ARTIFACT_KINDS:
        folder = base / what["spooled"] if what.get("spooled") else None
        if folder is None or not folder.is_dir():
            raise CnnlabError(f"the files of {what.get('path') or what.get('name')} were not kept "
                              f"({folder or 'not spooled'})")
        if kind == "model":
            _log_model(client, run, folder / what["name"], what["name"])
        else:
            artifact_dir = what.get("folder") or Path(what["path"]).parent.as_posix()
            client.log_artifacts(run_id, str(folder), None if artifact_dir in ("", ".") else artifact_dir)
    elif kind == "status":
        if what["status"] == "FINISHED" and run.data.tags.get(keys.ERROR, "").startswith("its training process"):
            client.delete_tag(run_id, keys.ERROR)  # an older cnnlab closed it as orphaned meanwhile
        client.set_terminated(run_id, what["status"], what.get("end_time"))
    else:
        raise CnnlabError(f"unknown kind of write {kind!r}")


def _dataset_inputs(what: dict) -> list:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if "inputs" not in what:
        raise CnnlabError(f"datasets {', '.join(what.get('datasets', []))} were listed without their records")
    return [DatasetInput(Dataset.from_dictionary(i["dataset"]), [InputTag(MLFLOW_DATASET_CONTEXT, i["context"])])
            for i in what["inputs"]]


def _log_model(client: StoreClient, run, folder: Path, name: str) -> None:
    """The model saved at the end of training (mlflow.pytorch.save_model), logged as MLflow 3's
    log_model does: a LoggedModel of the run, named `name`, its MLmodel naming the model and run."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run_id = run.info.run_id
    found = [m for m in client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{name}'",
                                                    max_results=1000) if m.source_run_id == run_id]
    if any(m.status == LoggedModelStatus.READY for m in found):
        return  # a sync cut short had logged it
    model = found[0] if found else client.create_logged_model(run.info.experiment_id, name=name,
                                                              source_run_id=run_id, params=dict(run.data.params))
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    mlmodel = Model.load(str(folder))
    mlmodel.model_id = mlmodel.model_uuid = model.model_id
    mlmodel.run_id, mlmodel.artifact_path = run_id, model.artifact_location
    mlmodel.save(str(folder / "MLmodel"))
    client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    except ValueError:
        return str(path)


def send_all(paths: list[Path], wait: bool = True) -> tuple[list[dict], list[str]]:
    """Send every backlog in `paths`: (what each sent, one line per store still away)."""
    done, away = [], {}
    for path in paths:
        try:
            result = send(path, wait=wait)
        except StoreAway as exc:
            away.setdefault((exc.uri, exc.reason), []).append(path)
            continue
        if result:
            done.append(result)
    lines = []
    for (uri, reason), files in away.items():
        entries = [w for f in files for w in (load(f) or {"not_logged": []})["not_logged"]]
        runs = "1 run's backlog" if len(files) == 1 else f"{len(files)} runs' backlogs"
        lines.append(f"tracking store {uri} is still not answering ({reason}): {runs} ({describe(entries)}) kept in "
                     f"{', '.join(_shown(f) for f in files)}; run `cnnlab sync` when it is back")
    return done, lines


def _sent_line(result: dict) -> str:
    status = f"; the run is {result['status']}" if result["status"] else ""
    refused = f" ({len(result['refused'])} refused, still listed)" if result["refused"] else ""
    return f"run {result['run_id']}: sent {describe(result['sent'])} to {result['uri']}{refused}{status}"


def send_pending() -> None:
    """What `cnnlab train` and `cnnlab compare` do first: send the project's waiting backlogs, once;
    a store still away is one warning, and the command goes on."""
    paths = backlog_files()
    if not paths:
        return
    try:
        done, away = send_all(paths, wait=False)
    except Exception as exc:  # never the reason a training or a comparison does not run
        log.warning("the MLflow backlogs were not sent (%s): run `cnnlab sync`", one_line(exc))
        return
    for result in done:
        log.info("%s", _sent_line(result))
    for line in away:
        log.warning("%s", line)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cnnlab sync", description="Send what a tracking store that went away mid-training never received "
        "(models/mlflow_backlog.json: metric points, params, tags, datasets, artifacts, the model, the run's "
        "status) to it, now that it is back. `cnnlab train` and `cnnlab compare` try this first too.")
    parser.add_argument("backlogs", nargs="*", type=Path, metavar="BACKLOG",
                        help="backlog files, or folders to search for mlflow_backlog.json (default: the project's "
                             "models/ and every training's backlog listed in outputs/.unfinished/backlogs/)")
    args = parser.parse_args(argv)
    paths = backlog_files(args.backlogs)
    done, away = send_all(paths)
    for result in done:
        print(_sent_line(result))
    if not (done or away):
        print("nothing to send: no MLflow backlog waits" + (f" in {', '.join(map(str, args.backlogs))}"
                                                             if args.backlogs else ""))
    for line in away:
        show(line)
    return 1 if away else 0


def close_orphaned_runs(client: MlflowClient | StoreClient, experiment_ids: list[str]) -> list[str]:
    """Mark KILLED the RUNNING runs whose training process on this machine is gone (a SIGKILL, a
    power cut leaves them RUNNING forever); return their ids. Runs from other machines cannot be
    checked from here and are left alone, and so are runs whose end waits in a backlog of the
    project (cnnlab.tracking.sync: their process ended, but the store was away). A rerun of the same command
    resumes such a run anyway. (Here, beside the backlogs it reads, rather than in
    cnnlab.tracking.store, so that store never imports sync.)"""
    import socket

    from cnnlab.tracking.lineage import process_start
    from cnnlab.tracking.store import StoreClient

    client = StoreClient.wrap(client)  # every call retried, the search too
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`{keys.HOST}` = '{host}'"
    closed, pending = [], None
    for run in client.search_runs(experiment_ids, query, max_results=1000):
        pid, _, start = run.data.tags.get(keys.PROCESS, "").partition(":")
        if not pid.isdigit() or process_start(int(pid)) == start:
            continue  # alive (or not written by cnnlab)
        pending = pending_run_ids() if pending is None else pending
        if run.info.run_id in pending:
            continue  # it ended as its backlog says, once sent (`cnnlab sync`)
        client.set_tag(run.info.run_id, keys.ERROR,
                       f"its training process ({pid} on {host}) ended without closing the run (killed?)")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed

