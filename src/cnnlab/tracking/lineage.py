"""What every MLflow run carries to be traced and rerun: the git commit and whether the code
differs from it, the Hydra overrides, the DVC experiment, the sweep's parent run, and the process
writing it (so a run whose process died can be told from a live one); and the pointer file that
names a model's run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from cnnlab.core import keys
from cnnlab.core.config import project_root
from cnnlab.core.errors import one_line
from cnnlab.core.files import write_atomic
from cnnlab.tracking.store import StoreClient, StoreUnavailable, ensure_experiment, tracking_uri

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run.json"  # in a sweep's folder: its parent run (SweepParentRunCallback)


# Tracked files that are a run's config or the pipeline's results, not code: params.yaml is the
# composed config (`cnnlab params`, `make run DATA=...` write it; every run records its whole config
# as params anyway), and dvc.lock, metrics/, plots/ and models/ are what `dvc repro` writes and the
# README says to commit. Changed, they leave git.dirty false; any other changed tracked file counts.
NOT_CODE = ("params.yaml", "dvc.lock", "metrics/", "plots/", "models/")


def git_info(root: Path | None = None) -> dict[str, str]:
    """The commit, and whether the code differs from it: git.dirty, with the changed tracked files
    that make it so in git.dirty_paths (NOT_CODE does not count; untracked files neither)."""
    root = root or project_root()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        prefix = git("rev-parse", "--show-prefix").strip()  # the project's folder inside the repository
        # -z: paths exactly as stored (no quoting); --no-renames: a renamed file is its two paths
        entries = git("status", "--porcelain=v1", "-z", "--untracked-files=no", "--no-renames").split("\0")
    except (OSError, subprocess.CalledProcessError):
        return {keys.GIT_COMMIT: "unknown", keys.GIT_DIRTY: "unknown"}
    changed = [entry[3:] for entry in entries if entry]
    code = [path for path in changed
            if not any(path == prefix + p or (p.endswith("/") and path.startswith(prefix + p)) for p in NOT_CODE)]
    return {keys.GIT_COMMIT: commit, keys.GIT_DIRTY: str(bool(code)).lower(),
            keys.GIT_DIRTY_PATHS: ", ".join(code)[:5000] or "(none)"}


def _hydra():
    """The current Hydra job's config, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def job_overrides() -> list[str]:
    """The current Hydra run's or sweep job's overrides (none outside a Hydra app)."""
    hydra = _hydra()
    return list(hydra.overrides.task) if hydra else []


def run_tags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    """What every run records to be rerun: git commit and dirty flag, Hydra overrides, the DVC
    experiment it belongs to, and the parent run when it is a sweep job."""
    tags = {**git_info(), keys.OVERRIDES: " ".join(job_overrides()) or "(none)"}
    for env, tag in keys.DVC_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    parent = sweep_parent_run_id()
    if parent:
        tags[keys.PARENT_RUN] = parent
    tags.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    return tags


def write_run_pointer(path: str | Path, run_id: str, experiment_id: str, uri: str) -> None:
    """Record which MLflow run trained a model, so evaluation logs into that same run."""
    pointer = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}
    write_atomic(path, json.dumps(pointer, indent=2) + "\n")


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), or None if it
    is gone: with the pid, it names one process, never a later one that reuses the number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Which process is writing a run, so a run whose process died can be told from a live one."""
    return {keys.HOST: socket.gethostname(), keys.PROCESS: f"{os.getpid()}:{process_start(os.getpid())}"}


def sweep_parent_run_id() -> str | None:
    """Parent run of the current multirun job, written by SweepParentRunCallback."""
    hydra = _hydra()
    if hydra is None or hydra.mode is None or hydra.mode.name != "MULTIRUN":
        return None
    pointer = Path(hydra.sweep.dir) / PARENT_RUN_FILE
    return json.loads(pointer.read_text())["run_id"] if pointer.is_file() else None


def record_failed_run(tracking: dict, run_name: str, error: BaseException) -> str | None:
    """An MLflow run marked FAILED for a sweep job that died before its run was opened
    (a bad value in the sweep, data that would not fetch), so the sweep shows every job. None in
    a sweep without tracking (logger=none: no parent run), or when the store cannot be used: the
    job has failed already, and the sweep goes on."""
    if sweep_parent_run_id() is None:
        return None
    uri = tracking_uri(tracking.get("uri"))
    try:
        experiment_id = ensure_experiment(uri, tracking.get("experiment_name") or "cnnlab")
    except StoreUnavailable as exc:
        log.warning("the failed job is not recorded: %s", exc)
        return None
    tags = run_tags({keys.ROLE: keys.ROLE_TRAIN, keys.ERROR: one_line(error)[:5000], keys.MODEL_NAME: run_name})
    client = StoreClient(uri)
    run = client.create_run(experiment_id, run_name=run_name or "failed", tags=tags)
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id
