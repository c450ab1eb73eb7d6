"""Reproducible and safe by default: the same seed and config give the same numbers (deterministic
algorithms on), and no secret from the environment reaches the tracking store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.core import keys
from cnnlab.training.train import train

from conftest import compose_cfg, tiny_overrides


@pytest.mark.train
def test_the_same_seed_and_config_give_identical_metrics_and_weights(tiny_dataset, tmp_path):
    results, weights = [], []
    for attempt in ("first", "second"):
        cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path / attempt), "trainer.max_epochs=2",
                          "trainer.deterministic=true",
                          f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
        result = train(cfg)
        results.append({k: v for k, v in result.items() if k.startswith(("train/", "val/", "test/"))})
        state = torch.load(tmp_path / attempt / "run" / keys.CHECKPOINT, weights_only=True)["state_dict"]
        weights.append(state)
    assert results[0] == results[1] and results[0]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


SECRETS = {"MLFLOW_TRACKING_PASSWORD": "pw-7f3a91c2", "MLFLOW_TRACKING_TOKEN": "tok-5be2c8d0",
           "AWS_SECRET_ACCESS_KEY": "aws-0c9e44aa71", "AZURE_STORAGE_ACCESS_KEY": "az-93d1e5b7",
           "GOOGLE_APPLICATION_CREDENTIALS": "/secret/gcp-6a2f.json", "DATABASE_PASSWORD": "db-c41f0e86"}


@pytest.mark.e2e
def test_no_secret_from_the_environment_reaches_the_store(tiny_dataset, tmp_path):
    """A real training with credentials in its environment: not one of them appears in the run's
    params, tags or metrics, nor in any file it wrote."""
    store = tmp_path / "mlflow.db"
    env = {**os.environ, **SECRETS, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    overrides = [o for o in tiny_overrides(tiny_dataset, tmp_path, model=True) if not o.startswith("paths.output_dir=")]
    proc = subprocess.run([sys.executable, "-m", "cnnlab.train", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    recorded = " ".join([*(f"{k}={v}" for k, v in run.data.params.items()),
                         *(f"{k}={v}" for k, v in run.data.tags.items()), *run.data.metrics])
    # Everything the run wrote: the store, its artifacts and the logged model (MLflow 3 keeps models
    # apart from run artifacts), the output folder, Hydra's config copy and log.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in files) and any(p.name == "resolved_config.json" for p in files)
    for name, secret in SECRETS.items():
        assert secret not in recorded, f"{name} in the run's params or tags"
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{name} in {path.relative_to(tmp_path)}"
