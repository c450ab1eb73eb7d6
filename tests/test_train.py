"""Training and evaluation on the tiny dataset: outputs, MLflow runs, both heads, clear errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.evaluate import evaluate
from cnnlab.train import train

from conftest import compose_cfg, tiny_overrides


@pytest.fixture
def trained(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path), "trainer.max_epochs=2")
    return cfg, train(cfg, tmp_path / "run"), tmp_path / "run"


def test_train_writes_fixed_outputs_and_returns_metrics(trained):
    cfg, result, out = trained
    assert (out / "models" / "model.ckpt").is_file()
    assert 0.0 <= result["test/acc"] <= 1.0 and result["model/params"] == 225_034
    assert result["model/macs"] == 2_631_040 and result["val/best_epoch"] in (1, 2)
    rows = list(csv.DictReader((out / "metrics" / "curves.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["train_images_per_s"]) > 0 for r in rows)
    saved = json.loads((out / "metrics" / "train.json").read_text())
    assert saved["test/acc"] == pytest.approx(result["test/acc"]) and saved["device"] == "cpu"
    assert json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"] == result["mlflow_run_id"]


def test_every_run_is_a_complete_mlflow_run(trained):
    cfg, result, _ = trained
    client = MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "cnn"
    assert client.get_experiment(run.info.experiment_id).name == "cnnlab"
    params = run.data.params
    assert params["model.conv_blocks.1.filters"] == "64" and params["optimizer.lr"] == "0.001"
    assert params["data.split.train_size"] == "300"
    assert not any("${" in v for v in params.values())
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert key in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2  # one point per epoch
    tags = run.data.tags
    assert {"git.commit", "git.dirty", "data.checksum", "hydra.overrides", "device"} <= set(tags)
    assert len(tags["data.checksum"]) == 32
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "plots", "metrics"} <= artifacts  # MLflow 3 keeps the model as a LoggedModel of the run
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    probs = model(torch.zeros(3, 1, 28, 28))
    assert probs.shape == (3, 10) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    assert info.signature is not None and info.saved_input_example_info is not None


def test_evaluate_logs_into_the_training_run(trained, tmp_path):
    cfg, result, out = trained
    metrics = evaluate(out / "models" / "model.ckpt", out)
    assert metrics["mlflow_run_id"] == result["mlflow_run_id"]
    assert metrics["test"]["acc"] == pytest.approx(result["test/acc"], abs=1e-6)
    assert set(metrics["per_class"]) == set(cfg["data"]["class_names"])
    rows = list(csv.DictReader((out / "metrics" / "predictions.csv").open()))
    assert len(rows) == 100 and set(rows[0]) == {"actual", "predicted"}
    assert (out / "plots" / "misclassified.png").stat().st_size > 1000
    run = MlflowClient().get_run(result["mlflow_run_id"])
    assert "test/macro_f1" in run.data.metrics and "test/f1/3" in run.data.metrics
    assert run.data.tags["cnnlab.evaluated"] == "true"
    plots = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/misclassified.png", "plots/learning_curves.png"} <= plots


def test_evaluate_uses_the_trained_config_not_defaults(trained, tmp_path):
    """A checkpoint trained on `custom` data with val_size=100 must not be evaluated on MNIST defaults."""
    cfg, result, out = trained
    metrics = evaluate(out / "models" / "model.ckpt", tmp_path / "eval-elsewhere", settings={"num_misclassified": 3})
    assert metrics["test"]["acc"] == pytest.approx(result["test/acc"], abs=1e-6)  # the tiny test set, not MNIST's
    rows = list(csv.DictReader((tmp_path / "eval-elsewhere" / "metrics" / "predictions.csv").open()))
    assert len(rows) == 100 and set(metrics["per_class"]) == set(cfg["data"]["class_names"])


def test_sigmoid_head_trains_end_to_end(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path), "model=cnn_sigmoid", "trainer.max_epochs=3")
    result = train(cfg, tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "metrics" / "curves.csv").open()))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert result["test/acc"] > 0.6  # even vs odd bar rows: well above chance after 3 epochs
    model = mlflow.pytorch.load_model(f"runs:/{result['mlflow_run_id']}/model")
    p = model(torch.zeros(2, 1, 28, 28))
    assert p.shape == (2, 1) and ((p > 0) & (p < 1)).all()
    metrics = evaluate(tmp_path / "run" / "models" / "model.ckpt", tmp_path / "run")
    assert set(metrics["per_class"]) == {"negative", "positive"}


def _cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "cnnlab.train", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_hydra_cli_bad_config_is_one_line_error(tmp_path):
    result = _cli("optimizer.lr=-3", cwd=tmp_path)
    assert result.returncode != 0
    assert "optimizer.lr" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_hydra_cli_missing_data_names_dataset_and_sources(tmp_path):
    result = _cli("data=custom", f"data.path={tmp_path / 'nowhere'}", f"paths.data_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0
    assert "could not fetch dataset 'custom'" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
