"""MLflow plumbing: where runs go, what every run carries, and sweep parent runs.

One training run = one MLflow run. A Hydra multirun opens one parent run (SweepParentRunCallback)
and every job nests under it. The default store is sqlite:///<project>/mlflow.db with artifacts in
<project>/mlartifacts, so runs from DVC's temporary experiment copies land in the project's store.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from cnnlab import write_atomic
from cnnlab.config import flatten, project_root

log = logging.getLogger(__name__)
PARENT_RUN_FILE = "mlflow_parent_run.json"


def tracking_uri(cfg_uri: str | None = None) -> str:
    """Config key, else $MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """Call an MLflow store function, retrying while SQLite reports a concurrent writer.

    SQLite serialises writers; with several sweep jobs logging at once a write can exceed the
    driver's busy timeout. MLflow has no retry for this, so back off and try again.
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MlflowException wraps sqlalchemy.exc.OperationalError
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)


def setup(tracking_cfg: dict) -> tuple[str, str]:
    """Point MLflow at the store and make sure the experiment exists; return (uri, experiment_id)."""
    uri = tracking_uri(tracking_cfg.get("uri"))
    default_store = uri == f"sqlite:///{project_root() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # note: also exports MLFLOW_TRACKING_URI to child processes
    name = tracking_cfg["experiment_name"]
    # The first use of a new SQLite store creates its tables; two processes doing that at once
    # collide, so creation is serialised with a lock file beside the database.
    sqlite = uri.startswith("sqlite:///")
    with FileLock(uri.removeprefix("sqlite:///") + ".lock") if sqlite else nullcontext():
        client = MlflowClient(uri)
        experiment = _retry(client.get_experiment_by_name, name)
    if experiment is None:
        # Artifacts next to the SQLite file, not in ./mlruns of whatever folder a run starts in.
        location = (project_root() / "mlartifacts").as_uri() if default_store else None
        try:
            _retry(client.create_experiment, name, artifact_location=location)
        except Exception:  # another process created it first
            pass
        experiment = _retry(client.get_experiment_by_name, name)
        if experiment is None:
            raise RuntimeError(f"could not create MLflow experiment {name!r} in {uri}")
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return uri, experiment.experiment_id


def ui_path(experiment_id: str, run_id: str | None = None) -> str:
    """MLflow UI link path; `workflowType=machine_learning` skips MLflow 3's default GenAI view."""
    return f"#/experiments/{experiment_id}/runs{'/' + run_id if run_id else ''}?workflowType=machine_learning"


def git_info(root: Path | None = None) -> dict[str, str]:
    root = root or project_root()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def hydra_overrides() -> list[str]:
    """The task overrides of the current Hydra job, or [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def run_tags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    tags = {**git_info(), "hydra.overrides": " ".join(hydra_overrides()) or "(none)"}
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"), ("DVC_STAGE", "dvc.stage")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    return tags


def log_params(cfg: dict) -> None:
    """Log the resolved config, flattened to dotted keys, as run params."""
    params = {k: ("null" if v is None else v) for k, v in flatten(cfg).items()}
    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow's log_batch takes at most 100 params per call
        _retry(mlflow.log_params, dict(items[i:i + 100]))


def log_dict_artifact(data: dict, name: str) -> None:
    _retry(mlflow.log_dict, data, name)


def write_run_pointer(path: Path, run: mlflow.entities.Run, uri: str) -> None:
    """Record which MLflow run trained a model, so evaluation logs into that same run."""
    write_atomic(path, json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                   "tracking_uri": uri}, indent=2) + "\n")


def sweep_parent_run_id() -> str | None:
    """Parent run of the current multirun job, written by SweepParentRunCallback."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode is None or hc.mode.name != "MULTIRUN":
        return None
    pointer = Path(hc.sweep.dir) / PARENT_RUN_FILE
    return json.loads(pointer.read_text())["run_id"] if pointer.is_file() else None


def record_failed_run(cfg: DictConfig, error: BaseException) -> str:
    """An MLflow run marked FAILED for a sweep job that died before its run was opened
    (a bad value in the sweep, data that would not fetch), so the sweep shows every job."""
    name = cfg.tracking.get("experiment_name") or "cnnlab"
    uri, experiment_id = setup({"uri": cfg.tracking.get("uri"), "experiment_name": name})
    tags = run_tags({"cnnlab.role": "train", "error": f"{type(error).__name__}: {error}"[:5000],
                     "model.name": cfg.model.get("name")})
    parent = sweep_parent_run_id()
    if parent:
        tags["mlflow.parentRunId"] = parent
    client = MlflowClient(uri)
    run = _retry(client.create_run, experiment_id, run_name=str(cfg.model.get("name") or "failed"), tags=tags)
    _retry(client.set_terminated, run.info.run_id, "FAILED")
    return run.info.run_id


class SweepParentRunCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun, recording the sweep's overrides.

    Jobs may run in other processes (joblib launcher), so the parent's id is handed over through a
    file in the sweep folder rather than through MLflow's in-process active-run stack.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        from cnnlab.config import to_container

        cfg = to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
        uri, experiment_id = setup(cfg["tracking"])
        overrides = list(config.hydra.overrides.task)
        client = MlflowClient(uri)
        # Name the sweep by what varies: sweeper params from config (experiment files, Optuna's
        # search space) and comma/range overrides from the command line.
        named = [o for o in overrides if o.startswith(("experiment=", "hparams_search="))]
        swept = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        swept += [o for o in overrides if "," in o or "(" in o]
        name = " ".join(["sweep", *named, *swept])[:250]
        parent = _retry(client.create_run, experiment_id, run_name=name, tags={
            **run_tags(), "cnnlab.role": "sweep", "hydra.overrides": " ".join(overrides) or "(none)",
            "hydra.sweeper": config.hydra.sweeper._target_, "hydra.launcher": config.hydra.launcher._target_,
        })
        sweep_dir = Path(config.hydra.sweep.dir)
        write_run_pointer(sweep_dir / PARENT_RUN_FILE, parent, uri)
        log.info("MLflow sweep parent run %s (%s)", parent.info.run_id, uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        pointer = Path(config.hydra.sweep.dir) / PARENT_RUN_FILE
        if not pointer.is_file():
            return
        info = json.loads(pointer.read_text())
        client = MlflowClient(info["tracking_uri"])
        children = client.search_runs([info["experiment_id"]], f"tags.mlflow.parentRunId = '{info['run_id']}'")
        failed = [r for r in children if r.info.status == "FAILED"]
        _retry(client.set_tag, info["run_id"], "cnnlab.children", str(len(children)))
        _retry(client.set_tag, info["run_id"], "cnnlab.failed_children", str(len(failed)))
        _retry(client.set_terminated, info["run_id"], "FAILED" if children and len(failed) == len(children) else "FINISHED")
