"""End to end: the real `dvc repro` in a temporary copy of the repository, on tiny IDX data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from cnnlab.training.fetch import MANIFEST, verified_cache_path
from test_data import touch_every_file
from test_layers import assert_wing_edits_reach_only_their_stages

from conftest import REPO, tiny_colour_overrides, tiny_overrides

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def copy_repo(dest: Path) -> Path:
    """A fresh git checkout of the working tree (tracked and untracked-but-not-ignored files)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def train_outside_dvc(train_command, dataset: Path, repo: Path, workdir: Path) -> None:
    """Touch every data file (new mtimes, no byte changed: what `dvc pull`, `dvc checkout`, a copy or
    a restore do), then train on the project's data outside DVC. The run hashes the files again and
    notes them in the user's cache; the data folder, the fetch stage's output, stays as it was (else
    DVC sees it modified and the next `dvc repro` fetches and trains again)."""
    folder = repo / "data" / "custom"
    manifest = (folder / MANIFEST).read_bytes()
    touch_every_file(folder)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    workdir.mkdir()
    overrides = [o for o in tiny_overrides(dataset, workdir) if not o.startswith("paths.")]
    result = train_command(*overrides, f"paths.data_dir={repo / 'data'}", f"hydra.run.dir={workdir / 'run'}",
                           "logger=none", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (folder / MANIFEST).read_bytes() == manifest
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert verified_cache_path(repo / "data", "custom").is_file()


def test_dvc_repro_end_to_end(tiny_dataset, tmp_path, train_command):
    repo = copy_repo(tmp_path / "repo")
    # The copy's own code, so its stages write their bytecode caches where DVC hashes the code.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo / "src")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("MLFLOW_TRACKING_URI")  # use the project's default store, as a user would
    overrides = [o for o in tiny_overrides(tiny_dataset, repo, model=True) if not o.startswith("paths.")]
    run([str(BIN / "cnnlab"), "params", *overrides], repo, env)
    first = run([str(BIN / "dvc"), "repro"], repo, env)
    for stage in ("fetch", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch", "train", "evaluate"}
    assert lock["stages"]["train"]["params"]["params.yaml"]["data"]["name"] == "custom"
    train_metrics = json.loads((repo / "metrics" / "train.json").read_text())
    eval_metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    accuracy = 1 - eval_metrics["misclassified"] / eval_metrics["test_size"]
    assert accuracy == pytest.approx(train_metrics["test/acc"], abs=1e-6)  # same checkpoint, same test set
    assert (repo / "models" / "model.ckpt").is_file() and (repo / "plots" / "misclassified.png").is_file()
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], repo, env)
    assert "eval.json" in shown.stdout and "train.json" in shown.stdout

    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(store)
    (run_info,) = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert run_info.info.run_id == train_metrics["mlflow_run_id"] and run_info.info.status == "FINISHED"
    assert run_info.data.params["data.name"] == "custom" and run_info.data.params["trainer.max_epochs"] == "1"
    assert run_info.data.tags["dvc.stage"] == "train"
    # params.yaml was changed after the commit, which the params record: the code is what was committed
    assert run_info.data.tags["git.dirty"] == "false" and run_info.data.tags["git.dirty_paths"] == "(none)"
    manifest = json.loads((repo / "data/custom/manifest.json").read_text())
    assert run_info.data.tags["data.checksum"] == manifest["checksum"]
    assert {"test/acc", "val/acc", "train/loss", "eval/macro_f1"} <= set(run_info.data.metrics)
    mlflow.set_tracking_uri(store)
    model = mlflow.pytorch.load_model(f"runs:/{run_info.info.run_id}/model")
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    assert str(repo / "mlartifacts") in client.get_experiment(run_info.info.experiment_id).artifact_location

    train_outside_dvc(train_command, tiny_dataset, repo, tmp_path / "outside")
    assert "Data and pipelines are up to date." in run([str(BIN / "dvc"), "status"], repo, env).stdout

    # Importing more of the package (as `cnnlab compare` does) writes more bytecode; not a change.
    run([sys.executable, "-c", "import cnnlab.analysis.compare, cnnlab.cli"], repo, env)
    pycache = repo / "src" / "cnnlab" / "analysis" / "compare" / "__pycache__"
    assert (pycache / f"groups.{sys.implementation.cache_tag}.pyc").is_file()
    second = run([str(BIN / "dvc"), "repro"], repo, env)
    assert "Running stage" not in second.stdout
    assert len(client.search_runs([run_info.info.experiment_id])) == 1

    # Each stage depends on the wings it runs: analysis edits leave it up to date, training edits do not.
    assert_wing_edits_reach_only_their_stages(repo, BIN / "dvc", env)


def test_queued_dvc_experiments_log_to_the_project_store(tiny_colour_folder, tmp_path):
    """`dvc exp run --queue -S model=a,b` + `dvc queue start`: each experiment is an MLflow run in the
    project's own store (not one inside DVC's temporary copy), tagged with its DVC experiment. On a
    folder of colour images (`-S data=folder -S data.path=...`): the pipeline runs on a folder with
    one config change, DVC's own composition of conf/ reading the folder's classes, the fetch stage
    preparing it and evaluate testing on its held-out part."""
    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI")
    sets = [arg for o in tiny_colour_overrides(tiny_colour_folder, repo) if not o.startswith("paths.")
            for arg in ("-S", o)]
    run([str(BIN / "dvc"), "exp", "run", "--queue", "-S", "model=cnn,cnn_strided", *sets], repo, env)
    run([str(BIN / "dvc"), "queue", "start", "-j", "1"], repo, env)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = run([str(BIN / "dvc"), "queue", "status"], repo, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["cnn", "cnn_strided"]
    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert all(r.data.tags["dvc.baseline_rev"] == baseline and r.data.tags["dvc.exp_name"] for r in runs)
    assert all(str(repo / "mlartifacts") in r.info.artifact_uri for r in runs)
    assert all(r.data.params["data.format"] == "folder" and r.data.tags["data.name"] == "shapes" for r in runs)
    assert all(r.data.params["data.class_names.4"] == "class_4" and "eval/macro_f1" in r.data.metrics for r in runs)

    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], repo, env).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    names = {e["name"] for e in experiments}
    assert names == {r.data.tags["dvc.exp_name"] for r in runs}


def test_dvc_repro_killed_mid_training_resumes_on_the_next_repro(tiny_dataset, tmp_path):
    """SIGKILL to `dvc repro` and its training; the next `dvc repro` continues that training (same
    MLflow run, every epoch once) and leaves a pipeline DVC calls up to date."""
    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo / "src")}
    env.pop("MLFLOW_TRACKING_URI")
    epochs = 12
    overrides = [o for o in tiny_overrides(tiny_dataset, repo) if not o.startswith("paths.")]
    run([str(BIN / "cnnlab"), "params", *overrides, f"trainer.max_epochs={epochs}"],
        repo, env)
    repro = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    curves = repo / "metrics" / "curves.csv"
    deadline = time.monotonic() + 300
    while not (curves.is_file() and len(curves.read_text().splitlines()) >= 4):  # header + 3 epochs
        assert repro.poll() is None and time.monotonic() < deadline, "the training did not get to epoch 3"
        time.sleep(0.05)
    os.killpg(repro.pid, 9)  # dvc and the training it runs
    repro.wait(timeout=60)
    assert (repo / "models" / "last.ckpt").is_file()

    second = run([str(BIN / "dvc"), "repro"], repo, env)
    assert "Running stage 'train'" in second.stdout
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (resumed,) = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert resumed.info.status == "FINISHED" and resumed.data.tags["cnnlab.resumes"] == "1"
    assert len(client.get_metric_history(resumed.info.run_id, "val/acc")) == epochs
    rows = curves.read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, epochs + 1))
    assert json.loads((repo / "metrics" / "train.json").read_text())["mlflow_run_id"] == resumed.info.run_id
    assert not (repo / "models" / "last.ckpt").exists()
    assert "Running stage" not in run([str(BIN / "dvc"), "repro"], repo, env).stdout
