"""Commands started in a sub-folder of the project (conf/, while editing configs) find the
project's data folder and output folder, as they find its MLflow store: relative config paths
belong to the project root, never to the folder a command starts in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cnnlab.core.config import CONF_DIR, project_path, project_root

from conftest import tiny_overrides


@pytest.fixture
def project(tmp_path) -> Path:
    """A project checkout's shape: a dvc.yaml at its root and a conf/ folder to start commands in."""
    root = tmp_path / "project"
    (root / "conf" / "data").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def test_relative_paths_and_hydra_folders_belong_to_the_project_root(project, monkeypatch):
    monkeypatch.chdir(project / "conf" / "data")
    assert project_root() == project.resolve()
    assert project_path("data") == project.resolve() / "data"
    assert project_path("/elsewhere/data") == Path("/elsewhere/data")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", return_hydra_config=True)
    run_dir = Path(OmegaConf.select(cfg, "hydra.run.dir"))
    sweep_dir = Path(OmegaConf.select(cfg, "hydra.sweep.dir"))
    assert run_dir.is_relative_to(project.resolve() / "outputs" / "runs")
    assert sweep_dir.is_relative_to(project.resolve() / "outputs" / "sweeps")


@pytest.mark.e2e
def test_a_training_started_in_conf_writes_data_and_outputs_at_the_project_root(project, tiny_dataset):
    overrides = [o for o in tiny_overrides(tiny_dataset, project) if not o.startswith(("paths.", "data.path"))]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "cnnlab.train", *overrides, f"data.path={tiny_dataset}",
                           "logger=none"], cwd=project / "conf", env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stderr + proc.stdout)[-3000:]
    assert sorted(p.name for p in (project / "conf").iterdir()) == ["data"]  # nothing new in conf/
    assert not list((project / "conf" / "data").iterdir())
    assert (project / "data" / "custom" / "manifest.json").is_file()
    runs = list((project / "outputs" / "runs").glob("*/*/models/model.ckpt"))
    assert len(runs) == 1
