"""Continuing an interrupted training: which folder, checkpoint and MLflow run a rerun picks up.

A training is known by its resolved config, all but paths.output_dir. Run the same command again
after a kill (SIGKILL, SIGTERM, Ctrl-C, a crash) and it continues the interrupted attempt from
models/last.ckpt (callbacks.resume_checkpoint), in the same folder and the same MLflow run:
- in place, when the output folder itself holds that attempt (`dvc repro`, a fixed hydra.run.dir);
- in the old folder, when Hydra gave this run a new one (`cnnlab train ...`, a sweep job re-run):
  an index of unfinished trainings, <project>/outputs/.unfinished/<key>.json, points there.
A lock held for the whole training (models/.lock; the kernel releases it when the process dies,
however it dies) tells an interrupted attempt from one still running. A run that finishes removes
its resume checkpoint and its index entry, so the same command later trains afresh.

A sweep (`-m`) is known by its command: the composed config it starts from, its overrides and its
sweeper's settings (sweep_key). Run the same sweep command again after a kill or Ctrl-C and it
continues that sweep: an index of unfinished sweeps, <project>/outputs/.unfinished/sweeps/<key>/,
names its MLflow parent run (continued, cnnlab.training.sweep_parent.SweepParentRunCallback) and the jobs that
finished, whose result is read from their metrics/train.json instead of training them again
(finished_in_sweep); interrupted jobs resume as above, unstarted ones run. A sweep whose every job
ran removes its index, so the same command later is a new sweep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from cnnlab.core import keys
from cnnlab.core.config import project_root
from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import write_atomic

log = logging.getLogger(__name__)
STATE, LOCK, CHECKPOINT = keys.RESUME_STATE, keys.RESUME_LOCK, keys.RESUME_CHECKPOINT


def config_key(resolved: dict, output_dir: str) -> str:
    """What makes two runs the same training: the resolved config, with the output folder (which
    also appears inside other values, e.g. the checkpoint's dirpath) taken out."""
    text = json.dumps(resolved, sort_keys=True, default=str).replace(str(output_dir), "<output_dir>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _index(key: str) -> Path:
    return project_root() / "outputs" / ".unfinished" / f"{key}.json"


def _is_locked(folder: Path) -> bool:
    lock = folder / LOCK
    if not lock.is_file():
        return False
    try:
        with FileLock(lock, timeout=0):
            return False
    except Timeout:
        return True
    except OSError:  # a read-only folder cannot hold a running training's lock either
        return False


def _holds_attempt(folder: Path, key: str) -> bool:
    """Does `folder` hold a resume checkpoint of this training?"""
    state = folder / STATE
    if not (folder / CHECKPOINT).is_file() or not state.is_file():
        return False
    try:
        return json.loads(state.read_text()).get("config_key") == key
    except (OSError, ValueError):
        return False


def _resumable(folder: Path, key: str) -> bool:
    """An interrupted attempt at this training, not one still running?"""
    return _holds_attempt(folder, key) and not _is_locked(folder)


def find(key: str, output_dir: str | Path) -> Path | None:
    """The folder of an interrupted attempt at this training, or None to start afresh."""
    here = Path(output_dir)
    if _resumable(here, key):
        return here
    # Only a run in its own new folder looks elsewhere: a run in the project root is `dvc repro`,
    # whose outputs must stay where dvc.yaml says.
    if here.resolve() == project_root():
        return None
    entry = _index(key)
    if not entry.is_file():
        return None
    try:
        folder = Path(json.loads(entry.read_text())["output_dir"])
    except (OSError, ValueError, KeyError):
        return None
    return folder if folder.resolve() != here.resolve() and _resumable(folder, key) else None


@dataclass
class Attempt:
    """One attempt at a training, holding its folder's lock until `close`."""
    output_dir: Path
    key: str
    checkpoint: str | None     # the resume checkpoint this attempt starts from
    run: dict | None           # the MLflow run it continues (models/mlflow_run.json: run_id, tracking_uri)
    lock: FileLock | None      # None: another process of a distributed training (see follow)

    def finish(self) -> None:
        """The training completed: nothing is left to resume."""
        for name in (CHECKPOINT, STATE):
            (self.output_dir / name).unlink(missing_ok=True)
        _index(self.key).unlink(missing_ok=True)
        record_finished_job(self.key, self.output_dir)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def begin(key: str, output_dir: str | Path) -> Attempt:
    """Claim `output_dir` for this training and say what it resumes from (if anything)."""
    folder = Path(output_dir)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise CnnlabError(f"another training is running in {folder} (it holds {folder / LOCK}); "
                          f"wait for it, or give this one another paths.output_dir") from None
    checkpoint = run = None
    if _holds_attempt(folder, key):
        checkpoint = str(folder / CHECKPOINT)
        try:
            run = json.loads((folder / keys.RUN_POINTER).read_text())
        except (OSError, ValueError):  # killed before its MLflow run opened
            run = None
    else:  # another config's checkpoint (params changed since): never resume from it
        (folder / CHECKPOINT).unlink(missing_ok=True)
    state = {"config_key": key, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    write_atomic(folder / STATE, json.dumps(state, indent=2) + "\n")
    if folder.resolve() != project_root():
        write_atomic(_index(key), json.dumps({"output_dir": str(folder.resolve())}) + "\n")
    return Attempt(folder, key, checkpoint, run, lock)


def follow(key: str, output_dir: str | Path) -> Attempt:
    """A process of a distributed training other than global rank 0: the training rank 0 claims
    in the same folder; it resumes from the same checkpoint, and neither locks nor writes."""
    folder = Path(output_dir)
    checkpoint = str(folder / CHECKPOINT) if _holds_attempt(folder, key) else None
    return Attempt(folder, key, checkpoint, None, None)


def moved(cfg, old: str, new: str):
    """`cfg` with its output folder moved from `old` to `new` (a composed DictConfig resolves its
    interpolations again; an already resolved dict has the folder replaced in its values)."""
    if isinstance(cfg, dict):
        return json.loads(json.dumps(cfg).replace(json.dumps(str(old))[1:-1], json.dumps(str(new))[1:-1]))
    cfg.paths.output_dir = str(new)
    return cfg


# --- sweeps: which interrupted sweep a re-run sweep command continues ------------------------------

SWEEP_FILE = "cnnlab_sweep.json"   # in a sweep folder: the unfinished-sweep index its jobs record into
_sweep_locks: dict[str, FileLock] = {}  # held by the sweep's own process; kept out of the Hydra callback,
                                         # which launchers pickle to send to their job processes


def sweep_key(config) -> str:
    """What makes two sweep commands the same sweep: the composed config they start from, as written
    (conf/ and the command's overrides, unresolved), every override (swept values are not in that
    config) and the sweeper with its settings (an Optuna search space, its number of trials). Not the
    sweep folder, new each time, nor the launcher: the same jobs one by one or side by side are one
    sweep."""
    from omegaconf import OmegaConf

    whole = OmegaConf.to_container(config, resolve=False)
    text = json.dumps({"config": {k: v for k, v in whole.items() if k != "hydra"},
                       "overrides": whole["hydra"]["overrides"]["task"], "sweeper": whole["hydra"]["sweeper"]},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sweep_index(key: str) -> Path:
    return project_root() / "outputs" / ".unfinished" / "sweeps" / key


def begin_sweep(key: str, sweep_dir: str | Path) -> dict:
    """Start an attempt at the sweep `key` in `sweep_dir`: what an interrupted attempt at it left
    ({"parent": its MLflow parent run pointer or None, "folders": its sweep folders}; empty for a new
    sweep). Its jobs record into the same index (SWEEP_FILE). While another process runs the same
    sweep (it holds the index's lock), this one is a sweep of its own and continues nothing."""
    index, folder = _sweep_index(key), Path(sweep_dir).resolve()
    index.mkdir(parents=True, exist_ok=True)
    lock = FileLock(index / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        log.warning("the same sweep is running in another process (it holds %s): this one is a new sweep",
                    index / ".lock")
        return {}
    _sweep_locks[key] = lock
    try:
        previous = json.loads((index / "sweep.json").read_text())
    except (OSError, ValueError):  # none yet (a new sweep), or cut short by a kill: nothing to continue
        previous = {}
    record = {"parent": previous.get("parent"), "folders": [*previous.get("folders", []), str(folder)]}
    write_atomic(index / "sweep.json", json.dumps(record, indent=2) + "\n")
    # The attempt's own id: a fixed hydra.sweep.dir gives every attempt the same folder.
    pointer = {"key": key, "index": str(index), "attempt": uuid.uuid4().hex}
    write_atomic(folder / SWEEP_FILE, json.dumps(pointer, indent=2) + "\n")
    return previous


def set_sweep_parent(key: str, pointer: dict) -> None:
    """Record the sweep's MLflow parent run (its run pointer), for an attempt that continues it."""
    index = _sweep_index(key)
    if key not in _sweep_locks:  # not this process's sweep to record (see begin_sweep)
        return
    record = json.loads((index / "sweep.json").read_text())
    write_atomic(index / "sweep.json", json.dumps({**record, "parent": pointer}, indent=2) + "\n")


def end_sweep(key: str) -> None:
    """Every job of the sweep ran: nothing is left to continue, and the same command is a new sweep."""
    lock = _sweep_locks.pop(key, None)
    if lock is None:
        return
    shutil.rmtree(_sweep_index(key), ignore_errors=True)
    lock.release()


def _job_sweep(sweep_dir: str | Path | None = None) -> dict | None:
    """The current Hydra sweep job's sweep (its SWEEP_FILE: key, index, attempt), or None outside one."""
    if sweep_dir is None:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get() if HydraConfig.initialized() else None
        if hydra is None or hydra.mode is None or hydra.mode.name != "MULTIRUN":
            return None
        sweep_dir = hydra.sweep.dir
    try:
        sweep = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())
        return {**sweep, "index": Path(sweep["index"])}
    except (OSError, ValueError, KeyError):  # a sweep started without cnnlab's callback
        return None


def record_finished_job(key: str, output_dir: str | Path, sweep_dir: str | Path | None = None) -> None:
    """A sweep job's training finished: a later attempt at this sweep takes its result (one file per
    job, so jobs finishing side by side never write the same file)."""
    sweep = _job_sweep(sweep_dir)
    if sweep is None or not sweep["index"].is_dir():
        return
    entry = {"output_dir": str(Path(output_dir).resolve()), "attempt": sweep.get("attempt")}
    write_atomic(sweep["index"] / "jobs" / f"{key}.json", json.dumps(entry, indent=2) + "\n")


def finished_in_sweep(key: str, sweep_dir: str | Path | None = None) -> dict | None:
    """This training's record (its metrics/train.json, metrics not a number as NaN again) when it
    finished in an earlier attempt at the current sweep, or None: it trains. A job that finished in
    this same attempt is not taken: a sweep that lists one configuration twice trains it twice, as
    it always did."""
    sweep = _job_sweep(sweep_dir)
    if sweep is None:
        return None
    try:
        entry = json.loads((sweep["index"] / "jobs" / f"{key}.json").read_text())
        if entry["attempt"] == sweep.get("attempt"):
            return None
        folder = Path(entry["output_dir"])
        record = json.loads((folder / keys.TRAIN_METRICS).read_text())
    except (OSError, ValueError, KeyError):  # not finished, or its folder is gone: train it
        return None
    log.info("this job finished in an earlier attempt at this sweep (%s, MLflow run %s): not trained again",
             folder, record.get("mlflow_run_id"))
    return {k: math.nan if v is None and k not in ("device", "mlflow_run_id") else v for k, v in record.items()}
