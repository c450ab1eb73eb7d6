"""Faults during training, done to real processes: SIGKILL then rerun (resume into the same MLflow
run, every epoch once), SIGTERM and Ctrl-C (checkpoint, KILLED, non-zero exit, resume from the very
batch), a NaN loss (stopped, FAILED, nothing logged as a model), and a checkpoint save that hits a
full disk (the old checkpoint survives)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.core import keys
from cnnlab.core.errors import CnnlabError
from cnnlab.tracking.sync import close_orphaned_runs
from cnnlab.training.train import train

from conftest import compose_cfg, tiny_overrides


def cli_overrides(dataset: Path, workdir: Path, *extra: str) -> list[str]:
    """The tiny run as a user types it: Hydra picks the output folder (outputs/runs/...)."""
    return [o for o in tiny_overrides(dataset, workdir) if not o.startswith("paths.output_dir=")] + list(extra)


def start(workdir: Path, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    return subprocess.Popen([sys.executable, "-m", "cnnlab.train", *overrides], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Exit status, and stderr followed by stdout (where Hydra's job logging prints)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err + out


def wait_for(condition, timeout: float = 180, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def curve_epochs(folder: Path) -> list[int]:
    path = folder / keys.CURVES_CSV
    return [int(r["epoch"]) for r in csv.DictReader(path.open())] if path.is_file() else []


def run_folders(workdir: Path) -> list[Path]:
    return sorted((workdir / "outputs" / "runs").glob("*/*"))


def train_runs(workdir: Path):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnlab")
    return client, experiment, client.search_runs([experiment.experiment_id], f"tags.`{keys.ROLE}` = 'train'")


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.e2e
def test_a_killed_training_resumes_into_the_same_run_with_every_epoch_once(tiny_dataset, tmp_path):
    epochs = 10
    overrides = cli_overrides(tiny_dataset, tmp_path, f"trainer.max_epochs={epochs}")
    first = start(tmp_path, overrides)
    folder = wait_for(lambda: next((f for f in run_folders(tmp_path) if len(curve_epochs(f)) >= 3), None),
                      what="three epochs")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert (folder / "models" / "last.ckpt").is_file()
    client, experiment, runs = train_runs(tmp_path)
    assert [r.info.status for r in runs] == ["RUNNING"]  # what SIGKILL leaves behind
    # Nothing alive writes it: `cnnlab compare` (and every new training) marks it KILLED.
    assert close_orphaned_runs(client, [experiment.experiment_id]) == [runs[0].info.run_id]
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"

    code, err = finish(start(tmp_path, overrides))  # the same command again
    assert code == 0, err[-3000:]
    assert "continuing the interrupted training in" in err and "resuming from" in err
    client, _, runs = train_runs(tmp_path)
    assert len(runs) == 1, "one training, one MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags[keys.RESUMES] == "1" and keys.ERROR not in run.data.tags
    val = history(client, run.info.run_id, keys.VAL_ACC)
    assert len(val) == epochs and len({step for step, _ in val}) == epochs  # every epoch once
    assert curve_epochs(folder) == list(range(1, epochs + 1))  # the curves continue in the first folder
    assert not (folder / "models" / "last.ckpt").exists() and not (folder / "models" / "resume.json").exists()
    assert json.loads((folder / keys.TRAIN_METRICS).read_text())["mlflow_run_id"] == run.info.run_id
    assert not list((tmp_path / "outputs" / ".unfinished").glob("*.json"))
    second = [f for f in run_folders(tmp_path) if f != folder]
    assert len(second) == 1 and not (second[0] / "models").exists()  # the rerun's own folder holds only its log

    code, err = finish(start(tmp_path, overrides))  # once finished, the same command trains afresh
    assert code == 0, err[-3000:]
    assert "resuming" not in err and len(train_runs(tmp_path)[2]) == 2


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_ends_the_run_killed_and_the_rerun_trains_what_was_left(
        tiny_dataset, tmp_path, signum):
    """Stopped mid-epoch: the resumed training ends where an uninterrupted one does, to the last
    digit (the same batches in the same order, optimizer state and epoch metrics restored)."""
    exact = ["trainer.max_epochs=6", "trainer.precision=32", "runtime.num_threads=1"]
    reference = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path / "reference"), *exact,
                            f"tracking.uri=sqlite:///{tmp_path / 'reference.db'}")
    expected = train(reference)

    workdir = tmp_path / "stopped"
    workdir.mkdir()
    overrides = cli_overrides(tiny_dataset, workdir, *exact, "callbacks.resume_checkpoint.every_n_train_steps=3")
    proc = start(workdir, overrides)
    folder = wait_for(lambda: next((f for f in run_folders(workdir) if len(curve_epochs(f)) >= 2), None),
                      what="two epochs")
    proc.send_signal(signum)
    code, err = finish(proc)
    assert code == 128 + signum, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # stderr's lines come first
    assert errors == [f"error: interrupted by {signal.Signals(signum).name}: checkpoint "
                      f"{folder / 'models' / 'last.ckpt'}; run the same command again to resume"], err[-3000:]
    assert "Traceback" not in err
    client, _, runs = train_runs(workdir)
    assert [r.info.status for r in runs] == ["KILLED"]
    assert runs[0].data.tags[keys.INTERRUPTED] == signal.Signals(signum).name and keys.ERROR not in runs[0].data.tags
    stopped_at = torch.load(folder / "models" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped_at < 6 * 10

    began = time.monotonic()
    code, err = finish(start(workdir, overrides))
    assert code == 0, err[-3000:]
    rerun_s = time.monotonic() - began
    # Lightning knows the loader is resumable (cnnlab.training.data.Batches), so it does not warn that it is not
    assert "not resumable" not in err
    client, _, runs = train_runs(workdir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tags = runs[0].data.tags  # finished, it claims no interruption; what stopped its first attempt stays
    assert keys.INTERRUPTED not in tags and tags[keys.RESUMED_AFTER] == signal.Signals(signum).name
    result = json.loads((folder / keys.TRAIN_METRICS).read_text())
    for key in (keys.TEST_ACC, keys.TEST_LOSS, keys.BEST_VAL_ACC):
        assert result[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key
    rows = list(csv.DictReader((folder / keys.CURVES_CSV).open()))
    reference_rows = list(csv.DictReader((tmp_path / "reference" / "run" / keys.CURVES_CSV).open()))
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference_rows]
    for got, want in zip(rows, reference_rows):  # the interrupted epoch's train metrics cover the whole epoch
        for column in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert float(got[column]) == pytest.approx(float(want[column]), rel=1e-6, abs=1e-7), column
    # Speed figures survive the stop: the resumed epoch's time is the time spent training it (before
    # the stop and after), never the seconds since some clock's zero; images/s counts the whole epoch.
    times = [float(r["epoch_time_s"]) for r in rows]
    speeds = [float(r["train_images_per_s"]) for r in rows]
    assert 0 < sum(times) < rerun_s + 120, times
    assert min(speeds) > 0.05 * max(speeds), speeds
    perf = history(client, runs[0].info.run_id, keys.EPOCH_TIME)
    assert [value for _, value in perf] == pytest.approx(times)  # MLflow holds the same figures, once per epoch
    assert result[keys.MEDIAN_EPOCH_TIME] < rerun_s + 120
    got = history(client, runs[0].info.run_id, keys.VAL_ACC)
    reference_client = MlflowClient(f"sqlite:///{tmp_path / 'reference.db'}")
    want = history(reference_client, expected["mlflow_run_id"], keys.VAL_ACC)
    assert len(got) == len(want) == 6 and len({step for step, _ in got}) == 6  # each epoch once, in order
    assert [value for _, value in got] == pytest.approx([value for _, value in want], rel=1e-6)
    # Lightning numbers logging steps by batches stepped; one stopped exactly at an epoch's start
    # may number the later epochs one lower. The values, and so the history, are the same.
    assert all(abs(a - b) <= 1 for (a, _), (b, _) in zip(got, want))


@pytest.mark.train
def test_a_nan_loss_stops_the_run_as_failed_and_logs_no_model(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'nan.db'}"
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path, model=True), "optimizer.lr=1e30", "trainer.max_epochs=3",
                      f"tracking.uri={uri}")
    with pytest.raises(CnnlabError, match=r"the training loss became (nan|inf).*lower optimizer.lr"):
        train(cfg)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert run.info.status == "FAILED" and "training loss became" in run.data.tags[keys.ERROR]
    assert keys.MODEL_ARTIFACT not in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert not (tmp_path / "run" / keys.TRAIN_METRICS).exists()

    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path / "off"), "optimizer.lr=1e30", "~callbacks.nan_guard",
                      f"tracking.uri={uri}")
    record = train(cfg)  # the guard turned off: the run goes on, and train.json stays valid JSON
    assert json.loads((tmp_path / "off" / "run" / keys.TRAIN_METRICS).read_text())["test/loss"] is None
    assert record["test/loss"] != record["test/loss"]  # NaN


SAVE_ON_A_FULL_DISK = """
import resource, signal, sys, torch
from cnnlab.training.checkpoints import AtomicCheckpointIO
from cnnlab.core.errors import CnnlabError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
try:
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1_000_000)}}, sys.argv[1])
except CnnlabError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.e2e
def test_a_checkpoint_save_that_fails_midway_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "models" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", SAVE_ON_A_FULL_DISK, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"cannot save checkpoint {path}:") and "unchanged" in proc.stdout
    assert path.read_bytes() == before and os.listdir(path.parent) == ["last.ckpt"]  # no partial temp file


@pytest.mark.e2e
def test_a_second_training_into_the_same_folder_is_refused_while_the_first_runs(tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_dataset, tmp_path) + ["trainer.max_epochs=50"]
    overrides = [o.replace(f"paths.output_dir={tmp_path / 'run'}", "hydra.run.dir=fixed") for o in overrides]
    first = start(tmp_path, overrides)
    wait_for(lambda: curve_epochs(tmp_path / "fixed"), what="the first epoch")
    code, err = finish(start(tmp_path, overrides))
    first.kill()
    first.wait(timeout=60)
    assert code == 1 and "error: another training is running in" in err, err[-2000:]


@pytest.mark.e2e
def test_a_sweep_stopped_by_ctrl_c_run_again_continues_that_sweep(tiny_dataset, tmp_path):
    """The user's steps: a sweep (here one configuration with seeds=3), Ctrl-C during job 1, the same
    command again. Job 0 had finished: its result is taken, not trained again; job 1 resumes in its
    run; job 2 runs; all in the one parent run, continued and FINISHED at the end."""
    overrides = cli_overrides(tiny_dataset, tmp_path, "trainer.max_epochs=8")
    sweep = ["-m", "seeds=3", *overrides]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with open(tmp_path / "first.log", "w") as log:  # a file: a full pipe would stop the sweep
        first = subprocess.Popen([sys.executable, "-m", "cnnlab.train", *sweep], cwd=tmp_path, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    jobs = lambda: sorted((tmp_path / "outputs" / "sweeps").glob("*/*/*_cnn"))  # noqa: E731
    job1 = wait_for(lambda: next((j for j in jobs() if j.name.startswith("1_") and len(curve_epochs(j)) >= 2), None),
                    what="job 1's epoch 2")
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    assert first.wait(timeout=300) == 130, (tmp_path / "first.log").read_text()[-3000:]
    (job0,) = [j for j in jobs() if j.name.startswith("0_")]
    client, experiment, runs = train_runs(tmp_path)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]

    code, err = finish(start(tmp_path, sweep))  # the same sweep command again
    assert code == 0, err[-3000:]
    assert "continuing the interrupted sweep" in err and "not trained again" in err
    client, experiment, runs = train_runs(tmp_path)
    by_seed = {int(r.data.params["seed"]): r for r in runs}
    assert sorted(by_seed) == [42, 43, 44] and len(runs) == 3  # job 0 not trained twice
    assert all(r.info.status == "FINISHED" for r in runs)
    assert keys.RESUMES not in by_seed[42].data.tags and keys.RESUMES not in by_seed[44].data.tags
    resumed = by_seed[43].data.tags
    assert resumed[keys.RESUMES] == "1" and resumed[keys.RESUMED_AFTER] == "SIGINT" and keys.INTERRUPTED not in resumed
    assert curve_epochs(job1) == list(range(1, 9)) and curve_epochs(job0) == list(range(1, 9))
    assert len(history(client, by_seed[42].info.run_id, keys.VAL_ACC)) == 8
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`{keys.ROLE}` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags[keys.RESUMES] == "1"
    assert {r.data.tags[keys.PARENT_RUN] for r in runs} == {parent.info.run_id}
    assert parent.data.tags[keys.CHILDREN] == "3"
    assert not list((tmp_path / "outputs" / ".unfinished").rglob("*.json"))  # the sweep ran whole: nothing to continue
