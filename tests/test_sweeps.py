"""Comparing architectures: the zoo composes, sweeps nest under one parent, failures don't stop them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from cnnlab.training.config import load
from cnnlab.training.costs import count_macs, count_parameters
from cnnlab.training.heads import build_head
from cnnlab.training.network import build_network

from conftest import REPO, compose_cfg, tiny_overrides

# Every model of the zoo (conf/model/): parameters and multiply-accumulates per 28x28x1 image with
# ten labels, as built from conf/ (MACs count the convolutions and matrix products).
ZOO = {
    "cnn": (225_034, 2_631_040),
    "cnn_sigmoid": (223_873, 2_629_888),
    "cnn_same": (421_642, 4_241_152),
    "cnn_strided": (421_642, 1_362_304),
    "cnn_wide": (896_522, 10_132_224),
    "cnn_deep": (467_818, 18_691_840),
    "cnn_regularized": (468_458, 18_691_840),
}


def test_the_table_covers_every_zoo_model():
    assert sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")) == sorted(ZOO)


@pytest.mark.parametrize("model, params, macs", [(m, p, c) for m, (p, c) in ZOO.items()], ids=list(ZOO))
def test_every_zoo_model_validates_and_builds_to_its_size_and_cost(model, params, macs):
    config = load(compose_cfg(f"model={model}"))
    assert config.model.name == model
    head = build_head(config.model, config.data.num_classes)
    shape = (config.data.channels, config.data.image_size, config.data.image_size)
    net = build_network(config.model, *shape[:2], head.num_outputs)
    assert (count_parameters(net), count_macs(net, shape)["total"]) == (params, macs)
    assert net.eval()(torch.zeros(2, *shape)).shape == (2, head.num_outputs)


def test_strided_variant_has_no_pooling_and_same_keeps_size():
    strided = load(compose_cfg("model=cnn_strided")).model
    assert all(b.pool is None and b.stride == 2 for b in strided.conv_blocks)
    same = build_network(load(compose_cfg("model=cnn_same")).model, 1, 28, 10)
    assert same[7].in_features == 7 * 7 * 64  # 28 -> 14 -> 7 with 'same' convs


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_experiment_files_compose(experiment):
    config = load(compose_cfg(f"experiment={experiment}"))
    assert config.tracking.experiment_name == experiment and config.seeds == 3
    assert config.data.name == "fashion_mnist"


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


@pytest.mark.e2e
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
    # Every job ran (the failed ones too): nothing is left for the same command to continue (cnnlab.training.resume).
    assert not list((tmp_path / "outputs" / ".unfinished" / "sweeps").iterdir())


@pytest.mark.e2e
def test_optuna_search_maximises_validation_accuracy(tiny_dataset, tmp_path):
    _sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           *tiny_overrides(tiny_dataset, tmp_path))
    (parent,), children = _runs("optuna")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    lrs = {float(c.data.params["optimizer.lr"]) for c in children}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(c.data.metrics["val/best_acc"] for c in children))
