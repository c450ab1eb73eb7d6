"""cnnlab on a CUDA GPU: real trainings in-process on the tiny data, with the default callbacks, in
every precision, augmenting, stopped mid-epoch and resumed; the batch order a seed gives on the CPU
and the GPU; what a GPU run records; and host-device syncs per training step, counted
(benchmarks/gpu_audit.py).

The GPU tests are `@pytest.mark.gpu` (tests/conftest.py): skipped where torch finds no CUDA GPU,
failed there under CNNLAB_REQUIRE_GPU=1 (`make gpu-check` runs them so); all in the train tier. The
last three run anywhere: the sync audit's bookkeeping (with torch's debug mode played by a stand-in)
and its place in a CPU training, and benchmarks/gpu_check.py's plan without CUDA (no CUDA touched).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import signal
import subprocess
import sys
import warnings
from types import SimpleNamespace

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from torch.utils.data import TensorDataset

from cnnlab.core import keys
from cnnlab.training.data import Batches
from cnnlab.training.train import train

from conftest import REPO, compose_cfg, tiny_overrides, write_dataset

BENCHMARKS = REPO / "benchmarks"


class Probe(pl.Callback):
    """What a training ran with, seen from inside it (added as `+callbacks.probe._target_=...Probe`;
    Hydra builds it, so what it saw is kept on the class)."""

    seen: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        # a layout shows only where channels > 1: a convolution's weight with several input channels
        weight = next(p for p in pl_module.parameters() if p.dim() == 4 and p.shape[1] > 1)
        self.info = {"device": pl_module.device, "precision": trainer.precision,
                     "fused": optimizer.defaults.get("fused"), "cudnn_benchmark": torch.backends.cudnn.benchmark,
                     "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                     "channels_last": weight.is_contiguous(memory_format=torch.channels_last)
                     and not weight.is_contiguous()}
        Probe.seen.append(self.info)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "batch_devices" in self.info:
            return
        x = batch[0]
        self.info["batch_devices"] = [t.device.type for t in batch]
        # augmented images are none of the training set's: each differs from its nearest by far more than rounding
        images = trainer.datamodule.train.tensors[0]
        nearest = (images.float() - x[0].float()).abs().flatten(1).amax(1).min()
        self.info["augmented"] = bool(nearest > 1e-3)

    def on_train_end(self, trainer, pl_module):
        self.info["global_step"] = trainer.global_step


class StopAt(pl.Callback):
    """SIGTERM to this process after optimizer step `at_step`, as a cluster's scheduler or `timeout`
    sends it: Lightning's handler notes it, cnnlab's resume checkpoint is written, the fit ends."""

    def __init__(self, at_step: int | None = None):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            handler = signal.getsignal(signal.SIGTERM)
            assert handler not in (signal.SIG_DFL, signal.SIG_IGN, None), "Lightning's SIGTERM handler is not set"
            signal.raise_signal(signal.SIGTERM)


PROBE = f"+callbacks.probe._target_={__name__}.Probe"


def bf16_native() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


@pytest.fixture
def on_gpu(tmp_path, monkeypatch):
    """A test that trains on the GPU: run from tmp_path (cnnlab's index of unfinished trainings lives
    under the project root, here tmp_path), benchmarks/ importable (gpu_audit), and torch's process-wide
    settings that a training changes (cuDNN autotuning and TF32, matmul precision, threads) put back."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision(),
              torch.get_num_threads())
    Probe.seen.clear()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = before[:2]
    torch.set_float32_matmul_precision(before[2])
    torch.set_num_threads(before[3])


def gpu_cfg(dataset, workdir, *overrides: str, model: bool = False, profile: bool = False) -> dict:
    """The tests' tiny training (debug=smoke pins the CPU: set back to the GPU), on one GPU."""
    return compose_cfg(*tiny_overrides(dataset, workdir, model=model, profile=profile), "trainer.accelerator=gpu",
                       "trainer.devices=1", *overrides)


def curve_rows(out) -> list[dict]:
    return list(csv.DictReader((out / keys.CURVES_CSV).open()))


def used_precision(asked: str) -> str:
    """The precision Lightning names for what was asked, `auto` resolved on this GPU."""
    if asked == "auto":
        return "bf16-mixed" if bf16_native() else "32-true"
    return {"32": "32-true"}.get(asked, asked)


# --- trainings on the GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.train
@pytest.mark.parametrize("precision", ["auto", "bf16-mixed", "16-mixed", "32"])
def test_the_default_callbacks_train_on_the_gpu_in_every_precision(precision, tiny_dataset, tmp_path, on_gpu):
    """callbacks=default on the GPU (NaN guard, both checkpoints, curves, progress bar; with `auto` also
    the model profile and the MLflow model export, as `cnnlab train` runs): data, model and batches on
    the device, the precision and layout `auto` picks, Adam fused, and a model that learned."""
    if precision == "bf16-mixed" and not bf16_native():
        pytest.skip("this GPU emulates bf16 (before Ampere)")
    everything = precision == "auto"
    result = train(gpu_cfg(tiny_dataset, tmp_path, f"trainer.precision={precision}", "runtime.channels_last=auto",
                           "trainer.max_epochs=2", PROBE, model=everything, profile=everything))
    out = tmp_path / "run"
    seen = Probe.seen[-1]
    assert result["device"] == "cuda:0" and seen["device"].type == "cuda"
    assert seen["batch_devices"] == ["cuda", "cuda"] and not seen["augmented"]
    assert seen["precision"] == used_precision(precision)
    assert seen["channels_last"] is (used_precision(precision) != "32-true")  # tensor cores' layout, not fp32's
    assert seen["fused"] is True and seen["cudnn_benchmark"] is True  # optimizer.fused, trainer.benchmark: auto
    rows = curve_rows(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(math.isfinite(float(r["train_loss"])) and float(r["train_images_per_s"]) > 0 for r in rows)
    assert (out / keys.CHECKPOINT).is_file() and not (out / "models" / "last.ckpt").exists()
    assert result[keys.TEST_ACC] >= 0.8, result  # chance is 0.1; fp32 on a CPU reaches 1.0 in one epoch
    assert result[keys.PEAK_DEVICE_MEMORY] > 0 and result[keys.PEAK_MEMORY] > 0
    if everything:
        assert result[keys.LATENCY.format(batch=256)] > 0 and result[keys.MACS] == 2_631_040
        model = mlflow.pytorch.load_model(f"runs:/{result['mlflow_run_id']}/{keys.MODEL_ARTIFACT}")
        probs = model(torch.zeros(3, 1, 28, 28))  # exported for the CPU, whatever it trained on
        assert probs.shape == (3, 10) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.train
def test_augmentation_trains_on_the_gpu(tiny_dataset, tmp_path, on_gpu):
    result = train(gpu_cfg(tiny_dataset, tmp_path, "data.augment.enabled=true", "trainer.precision=auto",
                           "trainer.max_epochs=2", PROBE))
    seen = Probe.seen[-1]
    assert seen["augmented"] and seen["batch_devices"] == ["cuda", "cuda"]
    assert result["device"] == "cuda:0" and math.isfinite(result[keys.TEST_LOSS])
    assert result[keys.TEST_ACC] > 0.2, result  # above chance (0.1): shifts move the bars that tell classes apart


@pytest.mark.gpu
@pytest.mark.train
def test_the_nan_guard_stops_a_gpu_run(tiny_dataset, tmp_path, on_gpu):
    from cnnlab.core.errors import CnnlabError

    with pytest.raises(CnnlabError, match=r"the training loss became (nan|inf) at step \d+"):
        train(gpu_cfg(tiny_dataset, tmp_path, "trainer.precision=32", "optimizer.lr=1e30", "trainer.max_epochs=3"))


@pytest.mark.gpu
@pytest.mark.train
def test_a_gpu_training_stopped_mid_epoch_resumes_where_it_stopped(tiny_dataset, tmp_path, on_gpu):
    """SIGTERM after step 14 (epoch 2 of 3, 10 steps each; resume checkpoint every 3 steps): the rerun
    resumes from models/last.ckpt, trains the 16 steps that were left (30 in all, not 34: the loader
    skips what epoch 2 had trained) and ends where an uninterrupted GPU run ends."""
    from cnnlab.training.checkpoints import Interrupted

    exact = ["trainer.precision=32", "trainer.max_epochs=3", "callbacks.resume_checkpoint.every_n_train_steps=3",
             PROBE, f"+callbacks.stop._target_={__name__}.StopAt"]
    expected = train(gpu_cfg(tiny_dataset, tmp_path / "reference", *exact, "+callbacks.stop.at_step=null"))
    assert Probe.seen[-1]["global_step"] == 30

    cfg = gpu_cfg(tiny_dataset, tmp_path / "stopped", *exact, "+callbacks.stop.at_step=14")
    with pytest.raises(Interrupted) as stopped:
        train(cfg)
    checkpoint = tmp_path / "stopped" / "run" / "models" / "last.ckpt"
    assert stopped.value.signum == signal.SIGTERM and checkpoint.is_file()
    assert torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"] == 14

    result = train(cfg)  # the same command again
    assert Probe.seen[-1]["global_step"] == 30 and Probe.seen[-1]["device"].type == "cuda"
    assert result["device"] == "cuda:0" and not checkpoint.exists()
    assert [r["epoch"] for r in curve_rows(tmp_path / "stopped" / "run")] == ["1", "2", "3"]
    # the same batches in the same order: the same model, up to the GPU's own run-to-run rounding
    assert result[keys.TEST_LOSS] == pytest.approx(expected[keys.TEST_LOSS], rel=1e-2)
    assert abs(result[keys.TEST_ACC] - expected[keys.TEST_ACC]) <= 0.02
    run = MlflowClient(mlflow.get_tracking_uri()).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[keys.RESUMES] == "1"


# --- batch order --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.train
def test_one_seed_draws_the_same_batches_on_the_cpu_and_the_gpu():
    """cnnlab.training.data.Batches over the same tensors on the CPU and on the GPU: the same samples in the same
    batches, epoch after epoch, with their augmentation draws, in a shard of a distributed training too;
    and a loader state saved on one device resumes on the other with the batches that were left."""
    n = 1000
    x, y = torch.arange(n, dtype=torch.float32).view(n, 1), torch.arange(n)

    def loader(device: str, **kwargs) -> Batches:
        return Batches(TensorDataset(x.to(device), y.to(device)), batch_size=32, shuffle=True, seed=7, **kwargs)

    def epochs(batches: Batches, count: int = 2) -> list[list[tuple]]:
        return [[tuple(t.cpu() for t in batch) for batch in batches] for _ in range(count)]

    for kwargs in ({}, {"augment": True}, {"shard": (1, 2)}):
        on_cpu, on_gpu = epochs(loader("cpu", **kwargs)), epochs(loader("cuda", **kwargs))
        for cpu_epoch, gpu_epoch in zip(on_cpu, on_gpu, strict=True):
            assert len(cpu_epoch) == len(gpu_epoch)
            for cpu_batch, gpu_batch in zip(cpu_epoch, gpu_epoch):
                assert all(torch.equal(a, b) for a, b in zip(cpu_batch, gpu_batch, strict=True)), kwargs
        orders = [torch.cat([batch[1] for batch in epoch]) for epoch in on_cpu]
        assert not torch.equal(orders[0], orders[1])  # shuffled, anew each epoch
    first = torch.cat([batch[1] for batch in epochs(loader("cpu"), 1)[0]])
    assert not torch.equal(first, torch.sort(first).values)

    for there, back in (("cpu", "cuda"), ("cuda", "cpu")):
        stopped = loader(there)
        batches = iter(stopped)
        for _ in range(4):
            next(batches)
        resumed = loader(back)
        resumed.load_state_dict(stopped.state_dict())
        rest = torch.cat([batch[1].cpu() for batch in resumed])
        assert torch.equal(rest, first[4 * 32:]), f"saved on {there}, resumed on {back}"


# --- what a GPU run records ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.train
@pytest.mark.parametrize("matmul_precision, tf32", [("highest", False), ("high", True)])
def test_a_gpu_run_records_the_device_and_knobs_it_used(matmul_precision, tf32, tiny_dataset, tmp_path, on_gpu):
    """Tags say what ran (cuda, one device, fused Adam, cuDNN autotuning, TF32 following
    runtime.matmul_precision), params what was asked (`auto`); and what ran is what the tags say."""
    result = train(gpu_cfg(tiny_dataset, tmp_path, "trainer.precision=auto", "runtime.channels_last=auto",
                           f"runtime.matmul_precision={matmul_precision}", PROBE))
    seen = Probe.seen[-1]
    assert seen["cudnn_tf32"] is tf32 and seen["fused"] is True and seen["cudnn_benchmark"] is True
    run = MlflowClient(mlflow.get_tracking_uri()).get_run(result["mlflow_run_id"])
    tags, params = run.data.tags, run.data.params
    assert tags[keys.ACCELERATOR] == "cuda" and tags[keys.NUM_DEVICES] == "1"
    assert tags[keys.DEVICE].startswith(f"cuda:0 ({torch.cuda.get_device_name(0)}")
    assert tags[keys.TF32].lower() == str(tf32).lower()
    assert tags[keys.FUSED_OPTIMIZER].lower() == "true" and tags[keys.CUDNN_BENCHMARK].lower() == "true"
    assert tags[keys.PRECISION] == used_precision("auto")
    assert params["optimizer.fused"] == "auto" and params["trainer.benchmark"] == "auto"
    assert params["trainer.accelerator"] == "gpu" and params["trainer.devices"] == "1"


# --- host syncs per step --------------------------------------------------------------------------------

# 100 training batches an epoch (3,200 images of batch 32). The window audited lies between the NaN
# guard's reads (callbacks.nan_guard: every 50 steps, after batches 49 and 99), away from the
# trainer's log interval (50) and the epoch's end, and after cuDNN's autotuning of the first steps.
SYNC_WINDOW = (55, 95)
SYNC_AUDIT = ["+callbacks.sync_audit._target_=gpu_audit.SyncAudit",
              f"+callbacks.sync_audit.first_batch={SYNC_WINDOW[0]}",
              f"+callbacks.sync_audit.last_batch={SYNC_WINDOW[1]}"]


@pytest.fixture(scope="module")
def hundred_batches(tmp_path_factory):
    """The tests' dataset, with 100 training batches an epoch (3,300 images, 100 held out for validation)."""
    return write_dataset(tmp_path_factory.mktemp("idx-3300"), n_train=3300, n_test=100)


def audited(dataset, workdir, *overrides: str) -> tuple[dict, object]:
    import gpu_audit

    result = train(gpu_cfg(dataset, workdir, "runtime.channels_last=auto", *SYNC_AUDIT, *overrides))
    assert result[gpu_audit.AUDITED_STEPS] == SYNC_WINDOW[1] - SYNC_WINDOW[0]
    return result, gpu_audit.SyncAudit.latest


@pytest.mark.gpu
@pytest.mark.train
@pytest.mark.parametrize("precision, extra", [("bf16-mixed", ()), ("16-mixed", ()),
                                              ("bf16-mixed", ("data.augment.enabled=true",))],
                         ids=["bf16-mixed", "16-mixed", "bf16-mixed-augment"])
def test_a_default_training_makes_no_host_sync_per_step_on_the_gpu(precision, extra, hundred_batches, tmp_path,
                                                                     on_gpu):
    """callbacks=default with the MLflow logger: not one synchronizing CUDA operation in 40 steady steps
    (16-mixed: the fused Adam reads the grad scaler's found_inf on the device)."""
    import gpu_audit

    if precision == "bf16-mixed" and not bf16_native():
        pytest.skip("this GPU emulates bf16 (before Ampere)")
    result, audit = audited(hundred_batches, tmp_path, f"trainer.precision={precision}", *extra)
    assert result[gpu_audit.SYNCS] == 0, f"host syncs per source line: {dict(audit.where)}"
    assert result[gpu_audit.SYNCS_PER_STEP] == 0


@pytest.mark.gpu
@pytest.mark.train
def test_the_sync_audit_counts_a_sync_every_step(hundred_batches, tmp_path, on_gpu):
    """The audit above counts: a NaN guard that reads its buffer after every step is one sync a step."""
    import gpu_audit

    result, audit = audited(hundred_batches, tmp_path, "trainer.precision=32",
                            "callbacks.nan_guard.check_every_n_steps=1")
    steps = SYNC_WINDOW[1] - SYNC_WINDOW[0]
    assert result[gpu_audit.SYNCS] >= steps and result[gpu_audit.SYNCS_PER_STEP] >= 1
    assert any("callbacks.py" in where for where in audit.where), dict(audit.where)


# --- the audit and the one-command GPU check, on any machine ---------------------------------------------

def test_the_sync_audit_counts_the_sync_warnings_of_its_window_only(monkeypatch):
    """SyncAudit's bookkeeping, with torch's sync debug mode played by a stand-in: it is on for batches
    [first, last) only, every warning is counted (not once per source line), other warnings pass on,
    the mode is put back; on a CPU nothing is switched on or reported."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_audit

    mode = {"now": 0}
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["now"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda value: mode.update(now=value))

    def synchronize():  # what torch does at a synchronizing CUDA operation
        if mode["now"] == "warn":
            warnings.warn("called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:1.)",
                          stacklevel=1)

    logged = []
    trainer = SimpleNamespace(loggers=[SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))],
                              global_step=8)
    gpu = SimpleNamespace(device=torch.device("cuda"))
    audit = gpu_audit.SyncAudit(first_batch=2, last_batch=5)
    audit.on_train_start(trainer, gpu)
    with pytest.warns(UserWarning, match="another warning"):
        for batch in range(8):
            audit.on_train_batch_start(trainer, gpu, None, batch)
            synchronize()
            synchronize()
            if batch == 3:
                warnings.warn("another warning", stacklevel=1)
    audit.on_train_end(trainer, gpu)
    assert mode["now"] == 0
    assert audit.summary == {gpu_audit.SYNCS: 6, gpu_audit.SYNCS_PER_STEP: 2, gpu_audit.AUDITED_STEPS: 3}
    assert logged == [audit.summary] and list(audit.where.values()) == [6]

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda value: pytest.fail("switched on for a CPU"))
    cpu = SimpleNamespace(device=torch.device("cpu"))
    audit.on_train_start(trainer, cpu)
    for batch in range(8):
        audit.on_train_batch_start(trainer, cpu, None, batch)
    audit.on_train_end(trainer, cpu)
    assert audit.summary == {} and logged == [{gpu_audit.SYNCS: 6, gpu_audit.SYNCS_PER_STEP: 2,
                                               gpu_audit.AUDITED_STEPS: 3}]


@pytest.mark.train
def test_the_sync_audit_joins_a_cpu_training_from_the_command_line_and_reports_nothing(tiny_dataset, tmp_path,
                                                                                       monkeypatch):
    """`+callbacks.sync_audit._target_=gpu_audit.SyncAudit` with benchmarks/ on the path, as gpu_check runs it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.chdir(tmp_path)
    result = train(compose_cfg(*tiny_overrides(tiny_dataset, tmp_path), *SYNC_AUDIT[:1],
                               "+callbacks.sync_audit.first_batch=2", "+callbacks.sync_audit.last_batch=5"))
    assert result["device"] == "cpu" and not any(key.startswith("perf/sync") for key in result)



def test_the_gpu_check_prints_every_step_and_checks_nothing_without_cuda(tmp_path, capsys, monkeypatch):
    """benchmarks/gpu_check.py with --dry-run, and without it where torch finds no CUDA: every step
    with its command, timeout and expected values; nothing run or written; exit status 3."""
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)

    def no_process(*args, **kwargs):
        raise AssertionError(f"a dry run started {args}")
    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: pytest.fail("--dry-run asked torch about CUDA"))
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == gpu_check.NOT_CHECKED == 3
    printed = capsys.readouterr().out
    steps = [step.name for step in gpu_check.STEPS]
    assert {"env", "data", "tests", "syncs-bf16-mixed", "syncs-16-mixed", "e2e", "evaluate", "precision-16-mixed",
            "precision-32", "resume-stop", "resume", "nccl", "speed"} == set(steps)
    for index, step in enumerate(gpu_check.STEPS):
        assert f"{index:2d}. {step.name}: " in printed and step.expected in printed
    assert "CNNLAB_REQUIRE_GPU=1 python -m pytest -m gpu" in printed
    assert "+callbacks.sync_audit._target_=gpu_audit.SyncAudit" in printed
    assert printed.strip().splitlines()[-1] == "dry run: nothing was checked"

    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    assert gpu_check.main(["--out", str(out)]) == 3
    printed = capsys.readouterr().out
    assert all(f". {name}: " in printed for name in steps)
    assert printed.strip().splitlines()[-1] == "no CUDA: nothing was checked"
    assert not out.exists()
