"""Distributed data parallel (trainer=ddp) for real: two CPU processes (gloo) started by torchrun,
against one process; every zoo model, a NaN on one process and a mid-epoch checkpoint in one more
torchrun launch (tests/ddp_worker.py); one DDP process; and the launch settings read from torchrun's
and SLURM's environment and this machine's GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.core import config, keys
from cnnlab.core.config import CONF_DIR, ddp_devices, ddp_nodes, launch_id, run_folder_name
from cnnlab.core.errors import CnnlabError
from cnnlab.training.config import load

from conftest import compose_cfg, stop_group, tiny_overrides

BIN = Path(sys.executable).parent
LAUNCHER_ENV = ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "SLURM_NTASKS",
                "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_JOB_NUM_NODES")


def _no_launcher(monkeypatch) -> None:
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)


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
    _no_launcher(monkeypatch)
    assert (ddp_devices("cpu"), ddp_nodes(), launch_id()) == (2, 1, None)
    assert run_folder_name("cnn").endswith(f"_cnn_{os.getpid()}")
    # torchrun --nnodes 2 --nproc-per-node 4: 8 processes, 4 per node
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert (ddp_devices("cpu"), ddp_devices("gpu"), ddp_nodes(), launch_id()) == (4, 4, 2, "torchrun-job7")
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
    assert (ddp_devices("auto"), ddp_nodes(), launch_id()) == (2, 3, "slurm-4242.0")
    trainer = compose_cfg("trainer=ddp")["trainer"]
    assert (trainer["devices"], trainer["num_nodes"]) == (2, 3)


def test_ddp_takes_every_gpu_else_two_cpu_processes_and_sync_batchnorm_on_gpus_only(monkeypatch):
    """Without a launcher, trainer=ddp trains on every visible GPU (sync_batchnorm on) when the
    training runs on CUDA, else in 2 CPU processes (sync_batchnorm off: torch's SyncBatchNorm refuses
    CPU tensors); an explicit trainer.sync_batchnorm=true with a CPU training is refused in one line."""
    _no_launcher(monkeypatch)
    gpus = torch.cuda.device_count()
    trainer = compose_cfg("trainer=ddp")["trainer"]  # this machine, as it is
    assert (trainer["devices"], trainer["sync_batchnorm"]) == ((gpus, True) if gpus else (2, False))
    # buffers (BatchNorm's statistics) broadcast before each forward only where they are not synced
    assert trainer["strategy"]["broadcast_buffers"] is (not trainer["sync_batchnorm"])
    monkeypatch.setattr(config, "_cuda_devices", lambda: 4)  # a machine with 4 GPUs
    for overrides, expected in ((["trainer=ddp"], (4, True)), (["trainer=ddp", "trainer.accelerator=gpu"], (4, True)),
                                (["trainer=ddp", "trainer.accelerator=cpu"], (2, False)),
                                (["trainer=ddp", "debug=smoke"], (2, False)),  # smoke trains on the CPU
                                (["trainer=ddp", "trainer.devices=3"], (3, True))):
        trainer = compose_cfg(*overrides)["trainer"]
        assert (trainer["devices"], trainer["sync_batchnorm"]) == expected, overrides
        assert trainer["strategy"]["broadcast_buffers"] is not expected[1], overrides
    monkeypatch.undo()
    _no_launcher(monkeypatch)
    with pytest.raises(CnnlabError) as refused:
        load(compose_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.sync_batchnorm=true", resolve=False))
    assert str(refused.value).startswith("config trainer.sync_batchnorm: true needs a training on CUDA GPUs")
    assert "\n" not in str(refused.value)
    load(compose_cfg("trainer=ddp", "trainer.accelerator=cpu", resolve=False))  # the default is accepted


@pytest.mark.train
def test_ddp_with_one_device_trains_in_one_ddp_process(tiny_dataset, tmp_path, monkeypatch):
    """trainer=ddp trainer.devices=1: one process (no other started), still DDPStrategy (gloo here,
    NCCL on a GPU); in this process, its process group and environment undone after."""
    from cnnlab.training.train import train
    from ddp_worker import RECORDS

    _no_launcher(monkeypatch)
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path), "trainer=ddp", "trainer.devices=1", "logger=none",
                      "trainer.limit_train_batches=2", "+callbacks.probe._target_=ddp_worker.Probe")
    environment = dict(os.environ)  # Lightning's launcher sets MASTER_ADDR, WORLD_SIZE... for its children
    try:
        result = train(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    assert RECORDS[-1] == {"strategy": "DDPStrategy", "world_size": 1, "rank": 0, "began_at": 0, "batch_norms": 0,
                           "sync_batch_norms": 0, "restored_outputs": 0, "broadcast_buffers": True,
                           "global_step": 2}
    assert 0 <= result[keys.TEST_ACC] <= 1


@pytest.mark.e2e
def test_two_processes_train_the_zoo_stop_together_on_nan_and_checkpoint_every_rank(tiny_dataset, tmp_path):
    """One torchrun launch of tests/ddp_worker.py, 2 gloo CPU processes (each start costs ~13 s of imports):
    (a) every zoo model trains 2 steps under trainer=ddp (cnn_regularized with plain BatchNorm on CPUs);
    (b) a loss NaN on rank 1 only stops both processes with the guard's error, none hangs;
    (c) a mid-epoch checkpoint (SIGTERM to both after steps 2 and 4) holds every process's step outputs,
    they resume on rank 0 only, and the resumed epoch reports the uninterrupted run's train/acc."""
    logs = tmp_path / "torchrun-logs"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--log-dir", str(logs), "--redirects", "3",
           str(Path(__file__).with_name("ddp_worker.py")), str(tiny_dataset), str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ))
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        stop_group(proc, timeout_s=5)
        output = "hung: stopped after 300 s"
    files = [tmp_path / f"rank{rank}.json" for rank in (0, 1)]
    ranks = [json.loads(p.read_text()) if p.is_file() else {} for p in files]
    worker_logs = "".join(p.read_text()[-2000:] for p in sorted(logs.glob("*/attempt_0/*/stderr.log")))
    assert proc.returncode == 0 and all(ranks), f"{output[-3000:]}\n{worker_logs}"

    # (a) the zoo
    models = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    for rank, found in enumerate(ranks):
        assert sorted(found["zoo"]) == models
        for name, run in found["zoo"].items():
            assert (run["strategy"], run["world_size"], run["rank"], run["global_step"], run["devices"],
                    run["sync_batchnorm"], run["sync_batch_norms"], run["broadcast_buffers"]) == \
                   ("DDPStrategy", 2, rank, 2, 2, False, 0, True), name  # CPUs: rank 0's BatchNorm statistics
            assert run["test_acc"] == ranks[0]["zoo"][name]["test_acc"], name  # metrics synced across processes
        assert found["zoo"]["cnn_regularized"]["batch_norms"] == 5

    # (b) a NaN on one process: both stop at the same check with the guard's error
    assert ranks[0]["nan"].startswith("the training loss of another process became nan or inf"), ranks[0]["nan"]
    assert ranks[1]["nan"].startswith("the training loss became nan at step 3 (epoch 1)"), ranks[1]["nan"]

    # (c) mid-epoch checkpoints: 150 training images per process, steps of 32
    for rank, found in enumerate(ranks):
        stops = found["checkpoint"]
        assert [s.split(":")[0] for s in stops["interrupted"]] == ["interrupted by SIGTERM"] * 2
        # predictions, targets and losses of 2 processes x 2 (then 4) steps x 32 images
        assert stops["saved_outputs"] == [[2 * 2 * 32] * 3, [2 * 4 * 32] * 3]
        assert [(f["began_at"], f["restored_outputs"]) for f in stops["fits"]] == \
               ([(0, 0), (2, 128), (4, 256)] if rank == 0 else [(0, 0), (2, 0), (4, 0)])
        assert stops["fits"][-1]["global_step"] == 5
        assert stops["resumed"] == pytest.approx(stops["reference"], rel=1e-6)
    (reference,), (resumed,) = ranks[0]["checkpoint"]["reference_curves"], ranks[0]["checkpoint"]["resumed_curves"]
    assert resumed["train_acc"] == reference["train_acc"]  # 300 images counted once each
    assert float(resumed["train_loss"]) == pytest.approx(float(reference["train_loss"]), rel=1e-5)
