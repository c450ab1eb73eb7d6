"""Defaults that fit the machine: `trainer.precision: auto` and `runtime.channels_last: auto` take the
fast choice of the device a run trains on (benchmarks/machine_defaults.py measures them), the run
records what was asked (params) and what was used (tags), and comparisons group runs by what they used.

The two CPU paths: `ONEDNN_MAX_CPU_ISA=AVX2` makes a bf16 CPU answer as a CPU without bf16 does
(oneDNN reads it once, at start-up, hence subprocesses); a GPU's answer is faked at torch's
function boundary (torch.cuda.is_available, torch.cuda.is_bf16_supported)."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.analysis.compare import compare
from cnnlab.core import keys
from cnnlab.core.errors import CnnlabError
from cnnlab.tracking.repeats import as_used, configuration_id
from cnnlab.training import runtime
from cnnlab.training.config import load
from cnnlab.training.train import train

from conftest import compose_cfg, tiny_overrides

BF16_ANSWER = "from cnnlab.core.internals import bf16_native_on_cpu; print(bf16_native_on_cpu())"


def _native_answer(env: dict) -> bool:
    done = subprocess.run([sys.executable, "-c", BF16_ANSWER], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stdout.strip() == "True"


def test_avx2_isa_makes_any_cpu_answer_no_native_bf16():
    """The variable a test (or a user) sets to see the non-native path reaches torch's answer."""
    assert _native_answer({**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}) is False
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    with open("/proc/cpuinfo") as fh:  # the CPU's own answer: AVX512-BF16 or AMX in its flags
        flags = set(next(line for line in fh if line.startswith("flags")).split())
    assert _native_answer(env) is bool({"avx512_bf16", "amx_bf16"} & flags)


CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native, precision", [(True, "bf16-mixed"), (False, "32")])
def test_auto_on_a_cpu_follows_its_bf16(monkeypatch, native, precision):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "bf16_native_on_cpu", lambda: native)
    for accelerator in ("auto", "cpu"):
        assert runtime.training_device(accelerator) == CPU
        assert runtime.resolve_precision("auto", accelerator) == precision
    assert runtime.resolve_channels_last("auto", precision, CPU) is True  # oneDNN's layout, fp32 or bf16


@pytest.mark.parametrize("ampere, precision", [(True, "bf16-mixed"), (False, "32")])
def test_auto_on_a_gpu_follows_its_bf16_not_the_cpus(monkeypatch, ampere, precision):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: ampere)
    monkeypatch.setattr(runtime, "bf16_native_on_cpu", lambda: not ampere)  # the CPU must not decide
    assert runtime.training_device("auto").type == "cuda"
    assert runtime.resolve_precision("auto", "auto") == runtime.resolve_precision("auto", "gpu") == precision
    assert runtime.resolve_precision("auto", "cpu") == ("32" if ampere else "bf16-mixed")  # cpu asked: the CPU's
    assert runtime.resolve_channels_last("auto", precision, GPU) is ampere  # tensor cores' layout, not fp32's


def test_what_is_asked_explicitly_is_obeyed(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_native_on_cpu", lambda: False)
    for asked in ("32", "bf16-mixed", "16-mixed", "64-true"):
        assert runtime.resolve_precision(asked, "auto") == asked
    assert runtime.resolve_channels_last(True, "32", GPU) is True
    assert runtime.resolve_channels_last(False, "bf16-mixed", CPU) is False
    assert runtime.resolve_channels_last("auto", "16-mixed", GPU) is True


def test_the_shipped_defaults_are_auto_on_one_device():
    cfg = compose_cfg()
    assert cfg["trainer"]["precision"] == "auto" and cfg["runtime"]["channels_last"] == "auto"
    assert cfg["optimizer"]["fused"] == "auto" and cfg["trainer"]["benchmark"] == "auto"
    # Lightning's devices=auto is every visible GPU: an 8-GPU node would train 8 processes, 8x the batch
    assert cfg["trainer"]["devices"] == 1


def test_on_a_gpu_the_optimizer_is_fused_and_cudnn_autotunes():
    adam = compose_cfg()["optimizer"]
    assert runtime.resolve_optimizer(adam, GPU)["fused"] is True
    assert runtime.resolve_optimizer(adam, CPU)["fused"] is False  # torch's default (not fused) on a CPU
    assert runtime.resolve_optimizer({**adam, "fused": None}, GPU)["fused"] is None  # as asked
    rprop = {"_target_": "torch.optim.Rprop", "_partial_": True, "fused": "auto"}  # no fused kernel: left out
    assert "fused" not in runtime.resolve_optimizer(rprop, GPU)
    assert load(compose_cfg()).optimizer["fused"] == "auto"  # checked before work, auto included
    # Lightning cannot clip what a fused optimizer unscales itself (mixed precision): auto is not fused then
    assert runtime.resolve_optimizer(adam, GPU, "16-mixed", clipping=True)["fused"] is False
    assert runtime.resolve_optimizer(adam, GPU, "32", clipping=True)["fused"] is True
    with pytest.raises(CnnlabError, match=r"^config optimizer.fused: a fused optimizer unscales its own gradients"):
        runtime.resolve_optimizer({**adam, "fused": True}, GPU, "bf16-mixed", clipping=True)
    assert runtime.resolve_benchmark("auto", False, GPU) is True
    assert runtime.resolve_benchmark("auto", True, GPU) is False  # deterministic kernels asked for
    assert runtime.resolve_benchmark("auto", False, CPU) is False
    assert runtime.resolve_benchmark(None, False, GPU) is None  # Lightning's own meaning
    with pytest.raises(CnnlabError, match=r"^config trainer.benchmark: expected auto, true, false or null"):
        load(compose_cfg("trainer.benchmark=fast"))


@pytest.mark.parametrize("matmul, tf32", [("highest", False), ("high", True), ("medium", True)])
def test_cudnn_tf32_follows_the_matmul_precision(matmul, tf32):
    """torch leaves cuDNN's TF32 convolutions on whatever set_float32_matmul_precision says."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.get_num_threads()
    try:
        runtime.apply(load(compose_cfg(f"runtime.matmul_precision={matmul}", "runtime.num_threads=1")).runtime)
        assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cuda.matmul.allow_tf32 is tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
        torch.set_num_threads(before[2])


def test_a_cpu_run_and_a_gpu_run_of_one_config_are_two_configurations():
    """Runs record the device they used (tag `accelerator`): compare never pools them as repeats."""
    params = {"model.name": "cnn", "trainer.accelerator": "auto", "trainer.devices": "1", "seed": "1"}
    on = {device: configuration_id(as_used(params, {keys.ACCELERATOR: device})) for device in ("cpu", "cuda")}
    assert on["cpu"] != on["cuda"]
    assert on["cpu"] == configuration_id(as_used({**params, "seed": "2"}, {keys.ACCELERATOR: "cpu"}))


@pytest.mark.train
def test_a_run_records_what_it_asked_and_used_and_compare_keeps_machines_apart(tiny_dataset, tmp_path, monkeypatch):
    """Two trainings of one config, on a CPU with native bf16 and on one without (torch's answer faked):
    each records `auto` as its params and what it used as tags; compare sees two configurations."""
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path), "trainer.precision=auto", "runtime.channels_last=auto")
    runs = {}
    for native in (True, False):
        monkeypatch.setattr(runtime, "bf16_native_on_cpu", lambda native=native: native)
        runs[native] = train(cfg)["mlflow_run_id"]
    client = MlflowClient(mlflow.get_tracking_uri())
    recorded = {native: client.get_run(run_id).data for native, run_id in runs.items()}
    for data in recorded.values():
        assert data.params["trainer.precision"] == "auto" and data.params["runtime.channels_last"] == "auto"
    assert recorded[True].tags[keys.PRECISION] == "bf16-mixed" and recorded[False].tags[keys.PRECISION] == "32-true"
    assert recorded[True].tags[keys.CHANNELS_LAST] == recorded[False].tags[keys.CHANNELS_LAST] == "True"  # a CPU
    assert recorded[True].tags[keys.CONFIGURATION] != recorded[False].tags[keys.CONFIGURATION]
    for data in recorded.values():  # the device and the GPU-only choices, as used on this CPU
        assert (data.params["trainer.accelerator"], data.tags[keys.ACCELERATOR], data.tags[keys.NUM_DEVICES]) == \
            ("cpu", "cpu", "1")
        assert data.params["optimizer.fused"] == "auto" and data.tags[keys.FUSED_OPTIMIZER] == "False"
        assert data.params["trainer.benchmark"] == "auto" and data.tags[keys.CUDNN_BENCHMARK] == "False"
        assert data.tags[keys.TF32] == "False"
    labels = sorted(g["label"] for g in compare(output=tmp_path / "report").groups)
    assert labels == ["cnn (trainer.precision=32-true)", "cnn (trainer.precision=bf16-mixed)"]


@pytest.mark.e2e
def test_a_training_on_the_avx2_path_uses_and_records_fp32(tiny_dataset, tmp_path):
    """The non-native path end to end, in a real process: `cnnlab train` with the shipped `auto`s."""
    uri = f"sqlite:///{tmp_path / 'avx2.db'}"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, "-m", "cnnlab.train", *tiny_overrides(tiny_dataset, tmp_path),
                           "trainer.precision=auto", "runtime.channels_last=auto"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no native bf16" not in done.stderr  # auto chose fp32: nothing to warn about
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("cnnlab").experiment_id])
    assert run.data.params["trainer.precision"] == "auto"
    assert run.data.tags[keys.PRECISION] == "32-true" and run.data.tags[keys.CHANNELS_LAST] == "True"
