"""The speed work must not change what is computed: each fast path against the plain path.

- cnnlab's Lightning loop (metrics accumulated per step, logged per epoch) trains the same weights
  as a plain PyTorch loop over the same batches, and reports the same epoch loss and accuracy;
- bf16 autocast + channels_last stays within tolerance of fp32;
- batches drawn on the device (the GPU path) cover each sample once per epoch, like the DataLoader;
- the runtime's thread policy and allocator setting (cnnlab.training.runtime).
Timings are not asserted here; benchmarks/speed.py measures them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import TensorDataset

from cnnlab.core.config import instantiate
from cnnlab.training import runtime
from cnnlab.training.config import load
from cnnlab.training.data import Batches, ImageDataModule
from cnnlab.training.fetch import fetch_dataset
from cnnlab.training.heads import build_head
from cnnlab.training.module import Classifier
from cnnlab.training.network import build_network

from conftest import compose_cfg, tiny_overrides


@pytest.fixture
def config(tiny_dataset, tmp_path):
    cfg = compose_cfg("data=custom", f"data.path={tiny_dataset}", "data.val_size=100", f"paths.data_dir={tmp_path}",
                      "data.batch_size=16", "data.eval_batch_size=64")
    fetch_dataset(cfg["data"], tmp_path)
    return load(cfg)


def fresh_classifier(config, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    head = build_head(config.model, config.data.num_classes)
    net = build_network(config.model, config.data.channels, config.data.image_size, head.num_outputs)
    return Classifier(net, head, optimizer=instantiate("optimizer", config.optimizer))


class EpochMetrics(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.mark.train
def test_lightning_loop_trains_what_a_plain_loop_trains(config):
    """Two epochs through Lightning and through a hand-written loop over the same batches: the same
    weights, and the epoch's logged loss and accuracy are the plain loop's per-sample averages."""
    dm = ImageDataModule(config.data, config.paths.data_dir, seed=7)
    dm.setup("fit")
    tracked, plain = fresh_classifier(config), fresh_classifier(config)
    assert all(torch.equal(a, b) for a, b in zip(tracked.state_dict().values(), plain.state_dict().values()))

    metrics = EpochMetrics()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[metrics])
    trainer.fit(tracked, datamodule=dm)

    optimizer = plain.make_optimizer(plain.parameters())
    loader = Batches(dm.train, config.data.batch_size, shuffle=True, seed=7)  # the same seeded orders
    history = []
    for _ in range(2):
        loss_sum = correct = seen = 0.0
        for x, y in loader:
            logits = plain(x)
            loss = plain.head.loss(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        history.append({"train/loss": loss_sum / seen, "train/acc": correct / seen})
    for (name, a), b in zip(tracked.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for got, expected in zip(metrics.rows, history, strict=True):
        assert got["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-5)
        assert got["train/acc"] == pytest.approx(expected["train/acc"], abs=1e-6)


def test_validation_metrics_are_the_whole_split(config):
    dm = ImageDataModule(config.data, config.paths.data_dir)
    model = fresh_classifier(config)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    got = trainer.validate(model, datamodule=dm, verbose=False)[0]
    x, y = dm.val.tensors
    with torch.no_grad():
        logits = model(x)
    assert got["val/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert got["val/loss"] == pytest.approx(model.head.loss(logits, y).item(), rel=1e-5)


def test_bf16_channels_last_stays_close_to_fp32(config):
    """The bf16-mixed + channels_last fast path: same predictions on nearly all images, a loss within
    bf16's precision, and gradients pointing the same way."""
    model = fresh_classifier(config)
    dm = ImageDataModule(config.data, config.paths.data_dir)
    dm.setup("fit")
    x, y = dm.val.tensors
    fp32_logits = model(x)
    fp32_loss = model.head.loss(fp32_logits, y)
    fp32_grad = torch.autograd.grad(fp32_loss, model.net[0].weight)[0]

    fast = fresh_classifier(config).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_logits = fast(x.contiguous(memory_format=torch.channels_last))
        fast_loss = fast.head.loss(fast_logits, y)
    fast_grad = torch.autograd.grad(fast_loss, fast.net[0].weight)[0]

    assert fast_logits.dtype == torch.bfloat16
    assert fast_loss.item() == pytest.approx(fp32_loss.item(), rel=2e-2)
    agree = (fast_logits.argmax(1) == fp32_logits.argmax(1)).float().mean().item()
    assert agree >= 0.95
    cosine = torch.nn.functional.cosine_similarity(fast_grad.flatten().float(), fp32_grad.flatten(), dim=0)
    assert cosine.item() > 0.98


def test_channels_last_fp32_computes_the_same_logits(config):
    model = fresh_classifier(config)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_cover_every_sample_once_per_epoch(shuffle):
    x, y = torch.arange(50).float().view(50, 1), torch.arange(50)
    loader = Batches(TensorDataset(x, y), batch_size=16, shuffle=shuffle, seed=3)
    assert len(loader) == 4
    epochs = [[b for b in loader] for _ in range(2)]
    for epoch in epochs:
        assert [len(b[1]) for b in epoch] == [16, 16, 16, 2]
        seen = torch.cat([b[1] for b in epoch])
        assert sorted(seen.tolist()) == list(range(50))
        assert all(torch.equal(bx[:, 0].long(), by) for bx, by in epoch)  # images stay with their labels
    orders = [torch.cat([b[1] for b in epoch]) for epoch in epochs]
    assert torch.equal(orders[0], orders[1]) != shuffle  # a new order each epoch, only when shuffling
    again = torch.cat([b[1] for b in Batches(TensorDataset(x, y), 16, shuffle, seed=3)])
    assert torch.equal(again, orders[0])  # seeded


@pytest.mark.train
@pytest.mark.gpu  # the data stays on it
def test_on_a_gpu_the_dataset_lives_on_the_device(config):
    dm = ImageDataModule(config.data, config.paths.data_dir)
    model = fresh_classifier(config)
    trainer = pl.Trainer(max_epochs=1, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert dm.train.tensors[0].is_cuda and dm.val.tensors[0].is_cuda
    assert dm.train_dataloader().tensors[0].is_cuda
    assert trainer.callback_metrics["train/acc"] > 0


# --- runtime: threads and allocator ------------------------------------------------------------------------

def test_auto_threads_take_the_cores_others_leave_idle(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    assert runtime.auto_threads(others_busy=0.0) == 4
    assert runtime.auto_threads(others_busy=1.1) == 3
    assert runtime.auto_threads(others_busy=2.6) == 1
    assert runtime.auto_threads(others_busy=9.0) == 1  # never fewer than one


def test_cpu_clock_sees_another_busy_process():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start
        clock = runtime.CpuClock()
        time.sleep(1.5)
        assert clock.others_busy() >= 0.5
    finally:
        hog.kill()
        hog.wait()


def test_adaptive_threads_follow_the_load(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    load = {"busy": 1.0}
    monkeypatch.setattr(runtime.CpuClock, "others_busy", lambda self: load["busy"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        callback = runtime.AdaptiveThreads(interval_s=0.0)
        callback.on_train_start(None, None)
        callback.on_train_batch_end(None, None, None, None, 0)
        assert torch.get_num_threads() == 1  # another process took a core
        load["busy"] = 0.0
        callback.on_train_batch_end(None, None, None, None, 1)
        assert torch.get_num_threads() == 2  # and gave it back
        assert callback.changes == [1, 2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_allocator_setting_is_applied_on_linux():
    assert runtime.keep_freed_memory() is True


def test_a_fixed_thread_count_is_used_as_given():
    before = torch.get_num_threads()
    try:
        cfg = load(compose_cfg("runtime.num_threads=1", "runtime.malloc_keep_memory=false"))
        assert runtime.apply(cfg.runtime) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class ScriptedLoss(pl.LightningModule):
    """A module whose training loss is `losses[step]` (scaled by a weight, so there is a gradient)."""

    def __init__(self, losses: list[float]):
        super().__init__()
        self.weight, self.losses = torch.nn.Parameter(torch.ones(())), losses

    def training_step(self, batch, batch_idx):
        return self.weight * self.losses[self.global_step]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(losses: list[float], *callbacks) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(ScriptedLoss(losses), train_dataloaders=torch.utils.data.DataLoader(range(len(losses))))
    return trainer


class HostReads:
    """Counts tensors read into Python (bool, float, int, .item()) while it is on: on a GPU each one
    waits for the device to finish its queued work. Reads by torch.optim are left out: Adam's step
    counter is a CPU tensor, which a GPU need not be waited for."""

    def __init__(self, monkeypatch):
        self.count = 0
        self.where: list[str] = []
        for name in ("__bool__", "__float__", "__int__", "item"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original):
                caller = sys._getframe(1).f_code.co_filename
                if f"torch{os.sep}optim{os.sep}" not in caller:
                    self.count += 1
                    self.where.append(caller)
                return _original(tensor, *args)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.train
def test_a_cnnlab_fit_reads_no_tensor_on_the_host_per_training_step(tiny_dataset, tmp_path, monkeypatch):
    """The whole default training (callbacks=default, the MLflow logger, augmentation) in two fits that
    differ only in their number of steps: the reads they make (at epoch ends, validation, test) are
    the same, none per step (the NaN guard reads its buffer every 50 steps; an epoch here has 10)."""
    from cnnlab.training.train import train

    reads = HostReads(monkeypatch)
    counts = []
    for steps in (3, 9):
        train(compose_cfg(*tiny_overrides(tiny_dataset, tmp_path / str(steps)), "data.augment.enabled=true",
                          f"trainer.limit_train_batches={steps}"))
        counts.append(reads.count)
        reads.count, reads.where = 0, []
    assert counts[0] > 0  # it counts: validation and test read their metrics
    assert (counts[1] - counts[0]) / 6 == 0, f"{counts}: host reads per training step"


def test_the_nan_guard_reads_the_loss_at_its_interval_and_names_the_first_bad_step(monkeypatch):
    from cnnlab.core.errors import CnnlabError
    from cnnlab.training.callbacks import NonFiniteLossGuard

    losses = [1.0] * 22
    reads = HostReads(monkeypatch)
    _fit(losses)
    without = reads.count
    reads.count = 0
    _fit(losses, NonFiniteLossGuard(check_every_n_steps=5))
    assert reads.count - without == 22 // 5 + 1  # one read per check (and the epoch's last 2), none per step

    losses[6] = float("nan")  # the 7th step: found at the next check, after step 10, and named exactly
    guard = NonFiniteLossGuard(check_every_n_steps=5)
    with pytest.raises(CnnlabError, match=r"the training loss became nan at step 7 \(epoch 1\): lower optimizer.lr"):
        _fit(losses, guard)


@pytest.mark.parametrize("nvml_loads", [True, False])
def test_lightnings_nvml_probe_is_dropped_only_where_nvml_cannot_load(monkeypatch, nvml_loads):
    """Without NVML torch would try to load it at every optimizer step (runtime.skip_nvml_probe_without_nvml)."""
    import ctypes

    def cdll(name):
        if not nvml_loads:
            raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setenv(runtime.NVML_CHECK_VAR, "1")
    assert runtime.skip_nvml_probe_without_nvml() is not nvml_loads
    assert (runtime.NVML_CHECK_VAR in os.environ) is nvml_loads
