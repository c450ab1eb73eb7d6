"""Training and evaluation on the tiny dataset: outputs, the MLflow run, both heads, the knobs
that config groups add (scheduler, callbacks, loggers), and the `cnnlab` front door."""

from __future__ import annotations

import csv
import json
import os
import re
from importlib.metadata import version

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from cnnlab.analysis.evaluate import evaluate
from cnnlab.core import keys
from cnnlab.core.config import Evaluate
from cnnlab.core.errors import CnnlabError, RunFailed
from cnnlab.core.internals import bf16_native_on_cpu
from cnnlab.training.module import Classifier
from cnnlab.training.train import train
from cnnlab.training.trained import recorded_data_spec

from conftest import compose_cfg, tiny_overrides

SETTINGS = Evaluate(batch_size=64, num_misclassified=6)


@pytest.fixture(scope="module")
def trained_store(tiny_dataset, tmp_path_factory):
    """One 2-epoch training on the tiny data, shared by the tests that only read its results:
    (config, result, output folder, tracking URI of its own store). It runs the defaults the smoke
    preset changes (precision, threads, memory format, model export, profile), as `cnnlab train` does."""
    workdir = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    defaults = compose_cfg()
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, workdir, model=True, profile=True), "trainer.max_epochs=2",
                      f"trainer.precision={defaults['trainer']['precision']}",
                      f"runtime.num_threads={defaults['runtime']['num_threads']}",
                      f"runtime.channels_last={defaults['runtime']['channels_last']}", f"tracking.uri={uri}",
                      "tracking.system_metrics_interval_s=0.5")
    return cfg, train(cfg), workdir / "run", uri


@pytest.fixture
def trained(trained_store):
    """The shared training, with this test's MLflow client pointed at its store."""
    cfg, result, out, uri = trained_store
    mlflow.set_tracking_uri(uri)  # the autouse fixture points each test at its own store
    return cfg, result, out


@pytest.mark.train
def test_train_writes_fixed_outputs_and_returns_metrics(trained):
    cfg, result, out = trained
    assert (out / keys.CHECKPOINT).is_file()
    assert 0.0 <= result[keys.TEST_ACC] <= 1.0 and result[keys.PARAMS] == 225_034
    assert result[keys.MACS] == 2_631_040 and result[keys.BEST_VAL_EPOCH] in (1, 2)
    rows = list(csv.DictReader((out / keys.CURVES_CSV).open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["train_images_per_s"]) > 0 for r in rows)
    assert result[keys.BEST_VAL_ACC] == max(float(r["val_acc"]) for r in rows)
    assert 100 < result[keys.PEAK_MEMORY] < 4096  # MB: torch alone is ~300, the default run stays under 2 GiB
    saved = json.loads((out / keys.TRAIN_METRICS).read_text())
    assert saved == result and saved["device"] == "cpu"
    assert json.loads((out / keys.RUN_POINTER).read_text())["run_id"] == result["mlflow_run_id"]


@pytest.mark.train
def test_every_run_is_a_complete_mlflow_run(trained):
    cfg, result, out = trained
    client = MlflowClient(mlflow.get_tracking_uri())
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "cnn"
    assert client.get_experiment(run.info.experiment_id).name == "cnnlab"
    params = run.data.params
    assert params["model.conv_blocks.1.filters"] == "64" and params["optimizer.lr"] == "0.001"
    assert params["model.conv_blocks.1.activation"] == "relu" and params["model.init"] == "glorot"  # defaults recorded
    assert params["data.split.train_size"] == "300" and params["data.split.test_size"] == "100"
    assert params["callbacks.model_checkpoint.monitor"] == "val/acc" and params["scheduler"] == "null"
    assert not any("${" in v for v in params.values())
    for key in ("train/loss", "train/acc", "val/loss", keys.VAL_ACC, keys.TEST_LOSS, keys.TEST_ACC, keys.PARAMS,
                keys.MEDIAN_EPOCH_TIME, keys.LATENCY.format(batch=256), keys.PEAK_MEMORY):
        assert key in run.data.metrics, key
    threads = client.get_metric_history(run.info.run_id, keys.TORCH_THREADS)  # what each epoch trained with
    assert len(threads) == 2 and all(1 <= t.value <= (os.cpu_count() or 1) for t in threads)
    assert params["runtime.num_threads"] == "auto" and params["runtime.malloc_keep_memory"] == "True"
    assert run.data.metrics[keys.TEST_ACC] == pytest.approx(result[keys.TEST_ACC])
    assert len(client.get_metric_history(run.info.run_id, keys.VAL_ACC)) == 2  # one point per epoch
    tags = run.data.tags
    assert {keys.GIT_COMMIT, keys.GIT_DIRTY, keys.DATA_CHECKSUM, keys.OVERRIDES, keys.DEVICE, keys.THREADS} <= set(tags)
    # The machine-dependent defaults: asked `auto` (params), used this CPU's fast choice (tags).
    assert params["trainer.precision"] == "auto" and params["runtime.channels_last"] == "auto"
    native = bf16_native_on_cpu()
    assert tags[keys.PRECISION] == ("bf16-mixed" if native else "32-true") and tags[keys.CHANNELS_LAST] == "True"
    assert tags[keys.VERSION.format(package="torch")] == torch.__version__.split("+")[0]  # what a rerun needs
    assert {keys.VERSION.format(package=p) for p in ("python", "pytorch-lightning", "mlflow")} <= set(tags)
    assert len(tags[keys.DATA_CHECKSUM]) == 32 and tags[keys.MODEL_NAME] == "cnn" and tags[keys.DATA_NAME] == "custom"
    # The checkpoints keep the data module's checksum: a resumed training checks its data is the same
    state = torch.load(out / keys.CHECKPOINT, map_location="cpu", weights_only=False)["ImageDataModule"]
    assert state == {"checksum": tags[keys.DATA_CHECKSUM]}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "plots", "metrics"} <= artifacts  # MLflow 3 keeps the model as a LoggedModel of the run
    logged_config = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{keys.CONFIG_ARTIFACT}")
    assert logged_config["model"]["conv_blocks"][0]["filters"] == 32
    requirements = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{keys.ENVIRONMENT_ARTIFACT}").splitlines()
    assert f"torch=={version('torch')}" in requirements and f"mlflow=={version('mlflow')}" in requirements
    assert not any(line.startswith("cnnlab==") for line in requirements)  # the git commit says which cnnlab
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/{keys.MODEL_ARTIFACT}")
    probs = model(torch.zeros(3, 1, 28, 28))
    assert probs.shape == (3, 10) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/{keys.MODEL_ARTIFACT}")
    assert info.signature is not None and info.saved_input_example_info is not None


@pytest.mark.train
def test_the_run_records_its_datasets_and_system_metrics(trained):
    """MLflow's own features: the data as dataset inputs (train/validation/test, with the data's
    checksum as digest and its folder as source), and system metrics sampled while training."""
    cfg, result, out = trained
    client = MlflowClient(mlflow.get_tracking_uri())
    run = client.get_run(result["mlflow_run_id"])
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    for context, dataset in inputs.items():
        assert dataset.name == f"custom-{context}" and dataset.digest == run.data.tags[keys.DATA_CHECKSUM]
        assert json.loads(dataset.source)["uri"] == str((out.parent / "data" / "custom").resolve())
        assert "28, 28" in dataset.schema
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 1 and all(0 <= m.value <= 100 * (os.cpu_count() or 1) for m in history)


@pytest.mark.train
def test_the_logged_model_is_the_best_checkpoint(trained):
    """Test metrics, the MLflow model and evaluation all use the one best checkpoint."""
    _, result, out = trained
    restored = Classifier.restore(out / keys.CHECKPOINT)
    logged = mlflow.pytorch.load_model(f"runs:/{result['mlflow_run_id']}/{keys.MODEL_ARTIFACT}")
    pixels = torch.rand(4, 1, 28, 28)  # the logged model takes pixel values and normalises them itself
    norm = recorded_data_spec(out / keys.CHECKPOINT).normalize
    with torch.no_grad():
        torch.testing.assert_close(logged(pixels), restored.probability_model()((pixels - norm.mean) / norm.std))
    metadata = mlflow.models.get_model_info(f"runs:/{result['mlflow_run_id']}/{keys.MODEL_ARTIFACT}").metadata
    assert metadata["class_names"] == [str(i) for i in range(10)] and metadata["input_shape"] == [1, 28, 28]


@pytest.mark.train
def test_evaluate_adds_its_own_keys_to_the_training_run(trained):
    cfg, result, out = trained
    metrics = evaluate(out / keys.CHECKPOINT, SETTINGS, out)
    assert metrics["mlflow_run_id"] == result["mlflow_run_id"]
    assert 1 - metrics["misclassified"] / metrics["test_size"] == pytest.approx(result[keys.TEST_ACC], abs=1e-6)
    assert set(metrics["per_class"]) == set(cfg["data"]["class_names"])
    # DVC metrics: the summary only (per class: per_class.csv and MLflow), so `dvc exp show` stays narrow
    assert set(json.loads((out / keys.EVAL_METRICS).read_text())) == {"macro_f1", "misclassified", "test_size"}
    assert len(list(csv.DictReader((out / keys.PER_CLASS_CSV).open()))) == len(cfg["data"]["class_names"])
    rows = list(csv.DictReader((out / keys.PREDICTIONS_CSV).open()))
    assert len(rows) == 100 and set(rows[0]) == {"actual", "predicted"}
    assert (out / keys.MISCLASSIFIED_PNG).stat().st_size > 1000
    client = MlflowClient(mlflow.get_tracking_uri())
    run = client.get_run(result["mlflow_run_id"])
    assert keys.EVAL_MACRO_F1 in run.data.metrics and "eval/f1/3" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, keys.TEST_ACC)) == 1  # one owner: training's test
    assert run.data.tags[keys.EVALUATED] == "true" and run.info.status == "FINISHED"
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {keys.CONFUSION_PNG, keys.MISCLASSIFIED_PNG, keys.LEARNING_CURVES_PLOT} <= plots


@pytest.mark.train
def test_evaluate_uses_the_trained_data_not_defaults(trained, tmp_path):
    """A checkpoint trained on `custom` data must be evaluated on that data, from any folder."""
    cfg, result, out = trained
    metrics = evaluate(out / keys.CHECKPOINT, SETTINGS, tmp_path / "eval-elsewhere")
    assert metrics["test_size"] == 100  # the tiny test set, not MNIST's 10,000
    rows = list(csv.DictReader((tmp_path / "eval-elsewhere" / keys.PREDICTIONS_CSV).open()))
    assert len(rows) == 100 and set(metrics["per_class"]) == set(cfg["data"]["class_names"])


@pytest.mark.train
def test_sigmoid_head_trains_end_to_end(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path, model=True), "model=cnn_sigmoid", "trainer.max_epochs=3")
    result = train(cfg)
    rows = list(csv.DictReader((tmp_path / "run" / keys.CURVES_CSV).open()))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert result[keys.TEST_ACC] > 0.6  # even vs odd bar rows: well above chance after 3 epochs
    model = mlflow.pytorch.load_model(f"runs:/{result['mlflow_run_id']}/{keys.MODEL_ARTIFACT}")
    p = model(torch.zeros(2, 1, 28, 28))
    assert p.shape == (2, 1) and ((p > 0) & (p < 1)).all()
    metrics = evaluate(tmp_path / "run" / keys.CHECKPOINT, SETTINGS, tmp_path / "run")
    assert set(metrics["per_class"]) == {"negative", "positive"}


@pytest.mark.train
def test_glorot_init_is_recorded_and_changes_the_start(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tiny_overrides(tiny_dataset, tmp_path)
    runs = {init: train(compose_cfg(*base, f"model.init={init}", f"paths.output_dir={tmp_path / init}"))
            for init in ("torch", "glorot")}
    client = MlflowClient()
    assert {init: client.get_run(r["mlflow_run_id"]).data.params["model.init"] for init, r in runs.items()} == \
           {"torch": "torch", "glorot": "glorot"}
    first = {init: next(csv.DictReader((tmp_path / init / keys.CURVES_CSV).open()))["train_loss"] for init in runs}
    assert first["torch"] != first["glorot"]


@pytest.mark.train
def test_scheduler_and_optional_callbacks(tiny_dataset, tmp_path, monkeypatch):
    """scheduler=cosine with the LR monitor logs a decaying learning rate; early stopping can end
    training before max_epochs (patience 0 after a perfect epoch on the tiny data)."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path), "trainer.max_epochs=3", "scheduler=cosine",
                      "callbacks=[default,early_stopping,lr_monitor]", "callbacks.early_stopping.patience=0",
                      "callbacks.early_stopping.min_delta=1.0")
    result = train(cfg)
    client = MlflowClient()
    lrs = [m.value for m in client.get_metric_history(result["mlflow_run_id"], "lr-Adam")]
    assert lrs[0] == pytest.approx(1e-3) and all(b < a for a, b in zip(lrs, lrs[1:]))
    rows = list(csv.DictReader((tmp_path / "run" / keys.CURVES_CSV).open()))
    assert len(rows) == 2  # min_delta 1.0 can never be met: stopped after epoch 1 + patience


@pytest.mark.train
def test_without_a_logger_nothing_is_tracked(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train(compose_cfg(*tiny_overrides(tiny_dataset, tmp_path), "logger=none"))
    assert result["mlflow_run_id"] is None and (tmp_path / "run" / keys.CHECKPOINT).is_file()
    assert not (tmp_path / "run" / keys.RUN_POINTER).exists()
    assert MlflowClient().search_experiments(filter_string="name = 'cnnlab'") == []


def test_cli_train_bad_config_is_one_line_error_and_opens_no_run(tmp_path, train_command):
    for bad in ("optimizer.lr=-3", "optimizer.betas=[2.0,0.999]"):
        result = train_command(bad, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.startswith("error: config optimizer") and result.stderr.count("\n") == 1, result.stderr
    assert MlflowClient().search_experiments(filter_string="name = 'cnnlab'") == []


@pytest.mark.parametrize("override, message", [
    ("callbacks.nan_guard.check_every_n_steps=0", "config callbacks.nan_guard.check_every_n_steps: expected"),
    ("callbacks.resume_checkpoint.every_n_train_steps=-5", "config callbacks.resume_checkpoint.every_n_train_steps"),
    ("callbacks.model_profile.latency_batch_sizes=[0]", "config callbacks.model_profile.latency_batch_sizes"),
    ("+trainer.no_such_argument=1", "config trainer: TypeError"),
])
def test_values_checked_by_building_them_fail_before_any_data_or_run(tiny_dataset, tmp_path, override, message):
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path, profile=True), override)
    with pytest.raises((CnnlabError, MisconfigurationException), match=re.escape(message)):
        train(cfg)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "models").exists()
    assert all(not MlflowClient().search_runs([e.experiment_id]) for e in MlflowClient().search_experiments())


def test_cli_train_missing_data_names_dataset_and_sources(tmp_path, train_command):
    result = train_command("data=custom", f"data.path={tmp_path / 'nowhere'}", f"paths.data_dir={tmp_path}",
                           "debug=smoke", cwd=tmp_path)
    assert result.returncode == 1
    assert "could not fetch dataset 'custom'" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.train
def test_a_run_that_fails_midway_is_failed_with_its_error(tiny_dataset, tmp_path, monkeypatch):
    """The MLflow run is open (params logged) when saving the first checkpoint fails: it must end
    FAILED, carrying the error, not stay RUNNING or look FINISHED."""
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should be")
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path), f"callbacks.model_checkpoint.dirpath={blocker}")
    with pytest.raises(RunFailed) as error:  # the error, with the run it was recorded on
        train(cfg)
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("cnnlab").experiment_id])
    assert run.info.status == "FAILED" and run.info.run_id == error.value.run_id
    cause = error.value.__cause__
    assert type(cause).__name__ in run.data.tags[keys.ERROR] and "model.init" in run.data.params
    assert str(error.value) == str(cause).strip()
