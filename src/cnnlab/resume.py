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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from cnnlab.config import project_root
from cnnlab.errors import CnnlabError
from cnnlab.files import write_atomic

log = logging.getLogger(__name__)
STATE, LOCK, CHECKPOINT = "models/resume.json", "models/.lock", "models/last.ckpt"
RUN_POINTER = "models/mlflow_run.json"


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
            run = json.loads((folder / RUN_POINTER).read_text())
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
