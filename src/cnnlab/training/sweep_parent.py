"""One MLflow parent run per Hydra multirun (SweepParentRunCallback, conf/config.yaml), named by
what the sweep varies; the same sweep command after a kill continues it (cnnlab.training.resume)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow.entities import RunTag
from omegaconf import DictConfig

from cnnlab.core import keys
from cnnlab.core.config import Tracking, parse, to_container
from cnnlab.core.errors import CnnlabError, exit_with
from cnnlab.tracking.lineage import PARENT_RUN_FILE, git_info, process_tags, write_run_pointer
from cnnlab.tracking.repeats import is_configuration, override_key, sweep_problem
from cnnlab.tracking.store import StoreClient, ensure_experiment, http_settings, tracking_uri
from cnnlab.training import resume

log = logging.getLogger(__name__)


def sweep_run_name(overrides: list[str], sweeper_params: dict[str, Any], seeds: int, now: float | None = None) -> str:
    """A sweep parent run's name: what varies first (sweeper params from config, such as an
    experiment's or Optuna's search space, and comma/range overrides), then the experiment, what
    the sweep fixed (data=, trainer.* and any other override of the configuration: a 1-epoch sweep
    says so), the seeds, and the start time. The MLflow UI cuts names to a column's width, so the
    part that tells two sweeps apart comes first; the time tells apart two sweeps of one command."""
    swept = [f"{k}={v}" for k, v in sweeper_params.items()]
    swept += [o for o in overrides if _is_sweep(o)]
    named = [o for o in overrides if o.startswith(("experiment=", "hparams_search="))]
    fixed = [o for o in overrides if o not in swept and o not in named and override_key(o) not in ("seed", "seeds")
             and is_configuration(override_key(o))]  # not paths.*, tracking.*, progress bars...
    fixed += [f"seeds={seeds}"] if seeds != 1 else []  # from the command line or an experiment
    stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(now))
    return f"{' '.join([*swept, *named, *fixed])[:220] or 'sweep'} (sweep {stamp})"


def _is_sweep(override: str) -> bool:
    """Whether Hydra reads `override` as a sweep (`a=1,2`, `lr=range(...)`, `choice(...)`), not as one
    value that holds commas (a list or a dict: `callbacks.x={a:1,b:[1,2]}`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except Exception:  # Hydra reports a malformed override itself, before the sweep starts
        return "," in override or "(" in override


class SweepParentRunCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun, recording the sweep's overrides. The same
    sweep command after a Ctrl-C or a kill continues that sweep's parent run (cnnlab.training.resume).

    Jobs may run in other processes (joblib launcher), so the parent's id is handed over through a
    file in the sweep folder rather than through MLflow's in-process active-run stack.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        seeds = config.get("seeds", 1)
        problem = sweep_problem(seeds, config.get("seed"), list(config.hydra.overrides.task),
                                config.hydra.sweeper._target_)
        if problem:  # Hydra would turn an exception here into a warning and run the jobs anyway
            exit_with(problem)
        # The same sweep command after a kill or Ctrl-C continues that sweep (cnnlab.training.resume): its
        # parent run below, its finished jobs not trained again (only the key is kept here:
        # launchers pickle this callback for their job processes).
        self._sweep_key = resume.sweep_key(config)
        previous = resume.begin_sweep(self._sweep_key, config.hydra.sweep.dir)
        if not config.get("logger"):
            return  # logger=none: the sweep is not tracked (each job says so)
        try:
            settings = parse(Tracking, to_container(config.tracking), "tracking")
            uri = tracking_uri(settings.uri)
            http_settings(settings.timeout_s, settings.max_retries)
            experiment_id = ensure_experiment(uri, settings.experiment_name)
        except CnnlabError as exc:
            # Hydra turns a callback's exception into a warning and launches the jobs anyway; a
            # store that cannot be used stops the sweep here, before any job, as it stops a run.
            exit_with(str(exc))
        if self._continue_parent(previous.get("parent"), uri, config.hydra.sweep.dir):
            return
        overrides = list(config.hydra.overrides.task)
        name = sweep_run_name(overrides, dict(config.hydra.sweeper.get("params") or {}), seeds)
        client = StoreClient(uri)
        parent = client.create_run(experiment_id, run_name=name, tags={
            **git_info(), **process_tags(), keys.ROLE: keys.ROLE_SWEEP, keys.OVERRIDES: " ".join(overrides) or "(none)",
            keys.SWEEPER: config.hydra.sweeper._target_, keys.LAUNCHER: config.hydra.launcher._target_,
            keys.SEEDS: str(seeds),
        })
        write_run_pointer(Path(config.hydra.sweep.dir) / PARENT_RUN_FILE, parent.info.run_id, experiment_id, uri)
        resume.set_sweep_parent(self._sweep_key, {"run_id": parent.info.run_id, "experiment_id": experiment_id,
                                                  "tracking_uri": uri})
        log.info("MLflow sweep parent run %s (%s)", parent.info.run_id, uri)

    @staticmethod
    def _continue_parent(pointer: dict | None, uri: str, sweep_dir: str) -> bool:
        """Continue the parent run of the interrupted attempt at this sweep, if it is in this store and
        did not finish: RUNNING again, written by this process (so nothing closes it as orphaned), one
        more in its cnnlab.resumes, and named to this attempt's jobs. False: a new parent run."""
        from mlflow.exceptions import MlflowException

        if not pointer:
            return False
        if pointer.get("tracking_uri") != uri:
            log.warning("the interrupted sweep's parent run %s is in another store (%s): starting a new parent run",
                        pointer.get("run_id"), pointer.get("tracking_uri"))
            return False
        client = StoreClient(uri)
        try:
            run = client.get_run(pointer["run_id"])
        except MlflowException:  # deleted meanwhile
            return False
        if run.info.lifecycle_stage != "active" or run.info.status == "FINISHED":
            return False
        run_id = run.info.run_id
        client.update_run(run_id, status="RUNNING")
        if keys.ERROR in run.data.tags:  # closed as orphaned meanwhile: that error is over
            client.delete_tag(run_id, keys.ERROR)
        tags = {**git_info(), **process_tags(), keys.RESUMES: str(int(run.data.tags.get(keys.RESUMES, "0")) + 1)}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        write_run_pointer(Path(sweep_dir) / PARENT_RUN_FILE, run_id, run.info.experiment_id, uri)
        log.info("continuing the interrupted sweep: MLflow sweep parent run %s (%s)", run_id, uri)
        return True

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if getattr(self, "_sweep_key", None):  # every job ran: the same command is a new sweep now
            resume.end_sweep(self._sweep_key)
        pointer = Path(config.hydra.sweep.dir) / PARENT_RUN_FILE
        if not pointer.is_file():
            return
        info = json.loads(pointer.read_text())
        client = StoreClient(info["tracking_uri"])
        children = client.search_runs([info["experiment_id"]], f"tags.`{keys.PARENT_RUN}` = '{info['run_id']}'")
        failed = [r for r in children if r.info.status == "FAILED"]
        client.set_tag(info["run_id"], keys.CHILDREN, str(len(children)))
        client.set_tag(info["run_id"], keys.FAILED_CHILDREN, str(len(failed)))
        all_failed = children and len(failed) == len(children)
        client.set_terminated(info["run_id"], "FAILED" if all_failed else "FINISHED")
