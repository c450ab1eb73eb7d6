"""Comparing architectures: the zoo composes, sweeps nest under one parent, failures don't stop them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cnnlab.config import validate
from cnnlab.model import build_network, count_parameters

from conftest import REPO, compose_cfg, tiny_overrides

ZOO = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


def test_the_zoo_is_complete():
    assert {"cnn", "cnn_sigmoid", "cnn_same", "cnn_strided", "cnn_wide", "cnn_deep", "cnn_regularized"} <= set(ZOO)


@pytest.mark.parametrize("model", ZOO)
def test_every_zoo_model_validates_and_builds(model):
    cfg = validate(compose_cfg(f"model={model}"))
    assert cfg["model"]["name"] == model
    net = build_network(cfg["model"], 1, 28, 10)
    assert count_parameters(net) > 0


def test_strided_variant_has_no_pooling_and_same_keeps_size():
    strided = compose_cfg("model=cnn_strided")["model"]
    assert all(b["pool"] is None and b["stride"] == 2 for b in strided["conv_blocks"])
    same = build_network(compose_cfg("model=cnn_same")["model"], 1, 28, 10)
    assert same[7].in_features == 7 * 7 * 64  # 28 -> 14 -> 7 with 'same' convs


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_experiment_files_compose(experiment):
    cfg = validate(compose_cfg(f"experiment={experiment}"))
    assert cfg["tracking"]["experiment_name"] == experiment
    assert cfg["data"]["name"] == "fashion_mnist"


def _sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "cnnlab.train", "-m", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _runs(experiment: str):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cnnlab.role") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


@pytest.mark.slow
def test_parallel_sweep_nests_jobs_and_survives_a_failing_one(tiny_dataset, tmp_path):
    _sweep(tmp_path, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "model=cnn,cnn_strided",
           "optimizer.lr=0.001,-1", *tiny_overrides(tiny_dataset, tmp_path))
    (parent,), children = _runs("cnnlab")
    assert parent.info.status == "FINISHED"
    assert "model=cnn,cnn_strided" in parent.data.tags["hydra.overrides"]
    assert "Joblib" in parent.data.tags["hydra.launcher"]
    assert len(children) == 4 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 2 and all("optimizer.lr" in c.data.tags["error"] for c in failed)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(c.info.run_name for c in finished) == ["cnn", "cnn_strided"]
    expected_threads = max(1, (os.cpu_count() or 1) // 2)
    assert all(c.data.tags["torch.threads"] == str(expected_threads) for c in finished)
    assert parent.data.tags["cnnlab.children"] == "4" and parent.data.tags["cnnlab.failed_children"] == "2"


@pytest.mark.slow
def test_optuna_search_maximises_validation_accuracy(tiny_dataset, tmp_path):
    _sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           *tiny_overrides(tiny_dataset, tmp_path))
    (parent,), children = _runs("optuna")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    lrs = {float(c.data.params["optimizer.lr"]) for c in children}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(c.data.metrics["val/best_acc"] for c in children))
