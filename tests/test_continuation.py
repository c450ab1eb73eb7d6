"""What a rerun continues, without training: a sweep cut short (its parent run, its finished jobs'
results), a resumed run's tags (interrupted no more, the history kept), and what git.dirty counts.
The end-to-end kill-and-rerun of a sweep is tests/test_resume.py's."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from mlflow.tracking import MlflowClient

from cnnlab.cli import params_main
from cnnlab.core import keys
from cnnlab.core.config import CONF_DIR
from cnnlab.tracking.lineage import PARENT_RUN_FILE, git_info
from cnnlab.tracking.logger import MLflowLogger
from cnnlab.training import resume
from cnnlab.training.sweep_parent import SweepParentRunCallback

SWEEP = ["model=cnn,cnn_strided", "data=fashion_mnist", "trainer.max_epochs=2", "trainer.limit_train_batches=300"]


def sweep_config(*overrides: str, sweep_dir: Path | None = None):
    """The config a sweep command (`python -m cnnlab.train -m ...`) starts from, as Hydra composes it
    for its callbacks, in `sweep_dir`."""
    extra = [f"hydra.sweep.dir={sweep_dir}"] if sweep_dir else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return GlobalHydra.instance().config_loader().load_configuration("config", [*overrides, *extra],
                                                                          RunMode.MULTIRUN)


def test_a_sweep_is_known_by_its_command_not_its_folder_or_launcher(tmp_path):
    key = resume.sweep_key(sweep_config(*SWEEP, sweep_dir=tmp_path / "a"))
    assert resume.sweep_key(sweep_config(*SWEEP, sweep_dir=tmp_path / "b")) == key
    assert resume.sweep_key(sweep_config(*SWEEP, "hydra/launcher=parallel")) == key
    assert resume.sweep_key(sweep_config(*SWEEP[1:], "model=cnn,cnn_wide")) != key
    assert resume.sweep_key(sweep_config(*SWEEP, "seeds=2")) != key
    assert resume.sweep_key(sweep_config(*SWEEP, "hydra.sweeper.max_batch_size=1")) != key
    optuna = ["hparams_search=optuna", "data=fashion_mnist"]
    assert resume.sweep_key(sweep_config(*optuna, "hydra.sweeper.n_trials=3")) != resume.sweep_key(
        sweep_config(*optuna, "hydra.sweeper.n_trials=4"))


def killed_attempt(sweep_dir: Path) -> None:
    """The first attempt, in a process of its own that ends without ending the sweep (as Ctrl-C or a
    kill leave it): its parent run opens, job 0 finishes (metrics/train.json, recorded), job 1 does not."""
    SweepParentRunCallback().on_multirun_start(config=sweep_config(*SWEEP, sweep_dir=sweep_dir))
    job = sweep_dir / "0_cnn"
    (job / "metrics").mkdir(parents=True)
    (job / "metrics" / "train.json").write_text(json.dumps({"val/best_acc": 0.75, "test/loss": None, "device": "cpu",
                                                            "mlflow_run_id": "run-of-job-0"}))
    resume.record_finished_job("job-0-key", job, sweep_dir=sweep_dir)


@pytest.mark.parametrize("folder", ["second", "first"], ids=["in a new sweep folder", "in a fixed hydra.sweep.dir"])
def test_the_same_sweep_command_continues_an_interrupted_sweep_and_a_finished_one_is_new(tmp_path, monkeypatch,
                                                                                         folder):
    monkeypatch.chdir(tmp_path)  # the project: the index of unfinished sweeps is its outputs/.unfinished/
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    first = tmp_path / "outputs" / "sweeps" / "first"
    process = multiprocessing.get_context("fork").Process(target=killed_attempt, args=(first,))  # no re-import
    process.start()
    process.join(timeout=300)
    assert process.exitcode == 0
    client = MlflowClient()
    parent_id = json.loads((first / PARENT_RUN_FILE).read_text())["run_id"]
    assert client.get_run(parent_id).info.status == "RUNNING"  # what the dead sweep left

    second = tmp_path / "outputs" / "sweeps" / folder
    config = sweep_config(*SWEEP, sweep_dir=second)
    callback = SweepParentRunCallback()
    callback.on_multirun_start(config=config)
    assert json.loads((second / PARENT_RUN_FILE).read_text())["run_id"] == parent_id  # the same parent, continued
    parent = client.get_run(parent_id)
    assert parent.info.status == "RUNNING" and parent.data.tags[keys.RESUMES] == "1"
    assert parent.data.tags[keys.PROCESS].startswith(f"{os.getpid()}:")  # this process writes it now
    done = resume.finished_in_sweep("job-0-key", sweep_dir=second)  # job 0 is not trained again
    assert done["val/best_acc"] == 0.75 and done["mlflow_run_id"] == "run-of-job-0" and math.isnan(done["test/loss"])
    assert resume.finished_in_sweep("job-1-key", sweep_dir=second) is None  # job 1 trains (or resumes)
    (second / "2_cnn" / "metrics").mkdir(parents=True)
    (second / "2_cnn" / "metrics" / "train.json").write_text('{"val/best_acc": 0.5}')
    resume.record_finished_job("job-2-key", second / "2_cnn", sweep_dir=second)
    assert resume.finished_in_sweep("job-2-key", sweep_dir=second) is None  # finished in this attempt: trains

    other = SweepParentRunCallback()  # the same command again while this one runs: a sweep of its own
    other.on_multirun_start(config=sweep_config(*SWEEP, sweep_dir=tmp_path / "outputs" / "sweeps" / "concurrent"))
    concurrent = json.loads((tmp_path / "outputs" / "sweeps" / "concurrent" / PARENT_RUN_FILE).read_text())["run_id"]
    assert concurrent != parent_id
    assert resume.finished_in_sweep("job-0-key", sweep_dir=tmp_path / "outputs" / "sweeps" / "concurrent") is None

    callback.on_multirun_end(config=config)  # every job ran
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert not (tmp_path / "outputs" / ".unfinished" / "sweeps" / resume.sweep_key(config)).exists()

    third = tmp_path / "outputs" / "sweeps" / "third"
    SweepParentRunCallback().on_multirun_start(config=sweep_config(*SWEEP, sweep_dir=third))
    assert json.loads((third / PARENT_RUN_FILE).read_text())["run_id"] not in (parent_id, concurrent)  # a new sweep
    assert resume.finished_in_sweep("job-0-key", sweep_dir=third) is None  # whose jobs all train


def test_a_resumed_run_is_interrupted_no_more_and_keeps_what_stopped_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient()
    experiment = client.create_experiment("cnnlab")
    run = client.create_run(experiment, tags={keys.INTERRUPTED: "SIGINT"})
    client.set_terminated(run.info.run_id, "KILLED")  # what Ctrl-C leaves (cnnlab.training.checkpoints)
    uri = os.environ["MLFLOW_TRACKING_URI"]

    def resume_and(status: str):
        logger = MLflowLogger("cnnlab", "cnn", system_metrics_interval_s=None)
        logger.continue_run({"run_id": run.info.run_id, "tracking_uri": uri})
        logger.log_metrics({"val/acc": 0.5}, step=1)  # opens the run, as the resumed training does
        if status == "died":
            return  # no finalize: the process died (SIGKILL); the next training marks it KILLED
        logger.finalize(status)

    resume_and("died")
    client.set_terminated(run.info.run_id, "KILLED")  # as close_orphaned_runs does
    resume_and("success")
    tags = client.get_run(run.info.run_id).data.tags
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert keys.INTERRUPTED not in tags  # a finished run does not claim to be interrupted
    assert tags[keys.RESUMES] == "2" and tags[keys.RESUMED_AFTER] == "SIGINT, process died"


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=folder,
                          check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("project", [".", "sub"], ids=["at the repository root", "in a subfolder"])
def test_git_dirty_describes_the_code_not_params_yaml_or_results(tmp_path, monkeypatch, project):
    """The README's quick start (`make run DATA=fashion_mnist`) composes params.yaml with `cnnlab
    params data=...` in a fresh clone: the code is still the commit's."""
    root = tmp_path / project
    (root / "src").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "src" / "model.py").write_text("x = 1\n")
    (root / "metrics").mkdir()
    (root / "metrics" / "train.json").write_text("{}\n")
    monkeypatch.chdir(root)
    assert params_main([]) == 0  # the committed params.yaml: conf/'s defaults
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "clone")

    assert params_main(["data=fashion_mnist"]) == 0
    (root / "metrics" / "train.json").write_text('{"test/acc": 0.9}\n')  # what dvc repro then writes
    assert git(root, "status", "--porcelain", "--untracked-files=no")  # both changed
    info = git_info()
    assert info[keys.GIT_DIRTY] == "false" and info[keys.GIT_DIRTY_PATHS] == "(none)"
    assert info[keys.GIT_COMMIT] == git(root, "rev-parse", "HEAD").strip()

    (root / "src" / "model.py").write_text("x = 2\n")
    info = git_info()
    prefix = "" if project == "." else f"{project}/"
    assert info[keys.GIT_DIRTY] == "true" and info[keys.GIT_DIRTY_PATHS] == f"{prefix}src/model.py"
