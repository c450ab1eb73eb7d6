"""Distributed data parallel (trainer=ddp) for real: two CPU processes (gloo) started by torchrun,
against one process; and the launch settings read from torchrun's and SLURM's environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cnnlab import keys
from cnnlab.config import ddp_devices, ddp_nodes, launch_id, run_folder_name

from conftest import compose_cfg, tiny_overrides

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.e2e
def test_two_processes_under_torchrun_train_one_run_as_one_process_would(tiny_dataset, tmp_path):
    """Each of the 2 processes trains on its half of every batch of 64 (2 x data.batch_size=32) and
    gradients are averaged, which is one process's step on those 64 images: same metrics (fp32)."""
    common = [o for o in tiny_overrides(tiny_dataset, tmp_path, profile=True) if not o.startswith("paths.output_dir")]
    common += ["trainer.max_epochs=2", "trainer.precision=32", "runtime.num_threads=1", "runtime.channels_last=false"]
    _run([sys.executable, "-m", "cnnlab.train", *common, "data.batch_size=64", "tracking.experiment_name=single",
          f"hydra.run.dir={tmp_path / 'single'}"], tmp_path)
    logs = tmp_path / "torchrun-logs"
    _run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--log-dir", str(logs), "--redirects", "3",
          "-m", "cnnlab.train", "trainer=ddp", *common, "tracking.experiment_name=ddp"], tmp_path)

    # One folder for the launch (named after it, not after each process), written once.
    (folder,) = (tmp_path / "outputs" / "runs").glob("*/cnn_torchrun-*")
    ddp, single = (json.loads((f / keys.TRAIN_METRICS).read_text()) for f in (folder, tmp_path / "single"))
    assert (folder / keys.CHECKPOINT).is_file() and not list(folder.glob("models/*.tmp"))
    rank_logs = sorted(logs.glob("*/attempt_0/*/stdout.log"))
    assert len(rank_logs) == 2  # both ranks trained, each to the end
    for rank, path in enumerate(rank_logs):
        assert f"process {rank} of 2 trained 10 steps" in path.read_text()

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])  # logged once, by rank 0
    assert run.info.run_id == ddp["mlflow_run_id"] and run.info.status == "FINISHED"
    params = run.data.params
    assert params["trainer.strategy._target_"].endswith("DDPStrategy") and params["trainer.devices"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, keys.VAL_ACC)]
    (one,) = client.search_runs([client.get_experiment_by_name("single").experiment_id])
    assert steps == [m.step for m in client.get_metric_history(one.info.run_id, keys.VAL_ACC)]
    assert steps[1] - steps[0] == 5  # 300 training images: 150 per process, 5 steps of 32 per epoch
    for key in (keys.TEST_LOSS, keys.TEST_ACC, keys.BEST_VAL_ACC):
        assert ddp[key] == pytest.approx(single[key], abs=2e-3), key
    assert ddp[keys.PARAMS] == single[keys.PARAMS]


def test_torchrun_and_slurm_environments_set_devices_nodes_and_one_folder(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "SLURM_NTASKS",
                 "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(name, raising=False)
    assert (ddp_devices(), ddp_nodes(), launch_id()) == (2, 1, None)
    assert run_folder_name("cnn").endswith(f"_cnn_{os.getpid()}")
    # torchrun --nnodes 2 --nproc-per-node 4: 8 processes, 4 per node
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert (ddp_devices(), ddp_nodes(), launch_id()) == (4, 2, "torchrun-job7")
    assert run_folder_name("cnn") == "cnn_torchrun-job7"
    trainer = compose_cfg("trainer=ddp")["trainer"]
    assert (trainer["devices"], trainer["num_nodes"], trainer["use_distributed_sampler"]) == (4, 2, False)
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    # srun --nodes 3 --ntasks-per-node 2 (SLURM writes "2(x3)")
    monkeypatch.setenv("SLURM_NTASKS", "6")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2(x3)")
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert (ddp_devices(), ddp_nodes(), launch_id()) == (2, 3, "slurm-4242.0")
    trainer = compose_cfg("trainer=ddp")["trainer"]
    assert (trainer["devices"], trainer["num_nodes"]) == (2, 3)
