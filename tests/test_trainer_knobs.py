"""Lightning's Trainer arguments, as a Lightning user overrides them (`trainer.<key>=...`, no `+`),
on the tiny data: each works with cnnlab's callbacks (checkpoints, resume, curves, profile,
progress bar) as Lightning documents it, or is refused before any work in one line that says why
and what to use instead. In-process trainings of a few batches each."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from cnnlab.core import keys
from cnnlab.core.config import project_root
from cnnlab.core.errors import CnnlabError
from cnnlab.training.config import load
from cnnlab.training.data import Batches, ImageDataModule
from cnnlab.training.train import train

from conftest import compose_cfg, tiny_overrides

pytestmark = pytest.mark.train  # about twenty short trainings, in-process


def curves(out: Path) -> list[dict]:
    return list(csv.DictReader((out / keys.CURVES_CSV).open()))


def blank(row: dict, *columns: str) -> bool:
    return all(row[c] == "" for c in columns)


def measured(row: dict, *columns: str) -> bool:
    return all(row[c] != "" for c in columns)


def check_progress_bar_off(result, out, err):
    assert result[keys.TEST_ACC] >= 0 and (out / keys.CHECKPOINT).is_file()


def check_model_summary(result, out, err):
    assert (out / keys.CHECKPOINT).is_file()


def check_fast_dev_run(result, out, err):
    # One batch of each, no checkpoint kept, nothing left to "continue" next time, no run tracked.
    assert 0.0 <= result[keys.TEST_ACC] <= 1.0 and result["mlflow_run_id"] is None
    assert not (out / keys.CHECKPOINT).exists() and not (out / "models" / "last.ckpt").exists()


def check_limits(result, out, err):
    rows = curves(out)
    assert len(rows) == 2 and all(measured(r, "train_acc", "val_acc") for r in rows)


def check_overfit(result, out, err):
    rows = curves(out)
    assert float(rows[-1]["train_acc"]) == 1.0, rows  # the same 2 batches, every epoch: memorised


def check_max_time(result, out, err):
    rows = curves(out)
    assert len(rows) < 50, "max_time stopped it"
    assert all(measured(r, "train_loss", "train_acc") for r in rows)
    # the last, cut-short epoch reports its own batches, never a copy of the epoch before
    assert len(rows) < 2 or rows[-1]["train_loss"] != rows[-2]["train_loss"]


def check_val_every_2(result, out, err):
    rows = curves(out)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert blank(rows[0], "val_loss", "val_acc") and blank(rows[2], "val_loss", "val_acc")  # not validated
    assert measured(rows[1], "val_loss", "val_acc") and result[keys.BEST_VAL_EPOCH] == 2


def check_val_twice_an_epoch(result, out, err):
    assert all(measured(r, "val_acc", "train_acc") for r in curves(out))


def check_trained(result, out, err):
    assert (out / keys.CHECKPOINT).is_file() and len(curves(out)) == 2


# (overrides, what must hold afterwards: a check of the run, or the start of the one-line refusal)
KNOBS = {
    "enable_progress_bar": (["trainer.enable_progress_bar=false"], check_progress_bar_off),
    "enable_model_summary": (["trainer.enable_model_summary=true"], check_model_summary),
    "fast_dev_run": (["trainer.fast_dev_run=true"], check_fast_dev_run),
    "limit_batches": (["trainer.limit_train_batches=3", "trainer.limit_val_batches=1"], check_limits),
    "limit_val_batches=0": (["trainer.limit_val_batches=0"], "config trainer.limit_val_batches: expected a number > 0"),
    "overfit_batches": (["trainer.overfit_batches=2", "trainer.max_epochs=25", "optimizer.lr=3e-3"], check_overfit),
    "max_time": (["trainer.max_time=00:00:00:03", "trainer.max_epochs=50", "data.val_size=20"], check_max_time),
    "accumulate_grad_batches": (["trainer.accumulate_grad_batches=2"], check_trained),
    "gradient_clip_val": (["trainer.gradient_clip_val=0.5", "trainer.gradient_clip_algorithm=value"], check_trained),
    "check_val_every_n_epoch": (["trainer.check_val_every_n_epoch=2", "trainer.max_epochs=3"], check_val_every_2),
    "check_val_every_n_epoch>epochs": (["trainer.check_val_every_n_epoch=5"],
                                       "config trainer.check_val_every_n_epoch: 5 > trainer.max_epochs=2"),
    "val_check_interval": (["trainer.val_check_interval=0.5"], check_val_twice_an_epoch),
    "log_every_n_steps": (["trainer.log_every_n_steps=1"], check_trained),
    "deterministic": (["trainer.deterministic=true"], check_trained),
    "benchmark": (["trainer.benchmark=false"], check_trained),
    "num_sanity_val_steps": (["trainer.num_sanity_val_steps=0"], check_trained),
    "devices=1": (["trainer.devices=1"], check_trained),
    "devices=2": (["trainer.devices=2"], "config trainer.devices: 2 devices train with DDP"),
    "accelerator=cpu": (["trainer.accelerator=cpu"], check_trained),
    "accelerator=gpu": (["trainer.accelerator=gpu"], "config trainer.accelerator: 'gpu' asked for"),
    "precision=32": (["trainer.precision=32"], check_trained),
    "precision=16-mixed": (["trainer.precision=16-mixed", "trainer.accelerator=cpu"],
                           "config trainer.precision: '16-mixed' (float16 autocast) runs on a GPU only"),
}


@pytest.mark.parametrize("knob", list(KNOBS))
def test_trainer_knob_works_with_cnnlab_or_is_refused_in_one_line(knob, tiny_dataset, tmp_path, capfd):
    overrides, expect = KNOBS[knob]
    if knob == "accelerator=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = compose_cfg(*tiny_overrides(tiny_dataset, tmp_path), "trainer.max_epochs=2", "trainer.precision=32",
                      "logger=none", *overrides)
    if isinstance(expect, str):
        with pytest.raises(CnnlabError) as refused:
            load(cfg)  # before any work: nothing is fetched or trained
        assert str(refused.value).startswith(expect) and "\n" not in str(refused.value)
        assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
        return
    result = train(cfg)
    out = tmp_path / "run"
    expect(result, out, capfd.readouterr().err)
    assert json.loads((out / keys.TRAIN_METRICS).read_text())[keys.TEST_ACC] == pytest.approx(result[keys.TEST_ACC])
    assert not (out / "models" / "last.ckpt").exists(), "a finished run leaves nothing to resume"
    unfinished = project_root() / "outputs" / ".unfinished"
    assert not any(str(out) in entry.read_text() for entry in unfinished.glob("*.json")), "nothing to continue"


def test_overfit_batches_trains_on_the_same_batches_every_epoch(tiny_dataset, tmp_path):
    """Lightning's overfit_batches makes a loader sequential; cnnlab's own loader follows it."""
    cfg = load(compose_cfg(*tiny_overrides(tiny_dataset, tmp_path)))
    data = ImageDataModule(cfg.data, str(tmp_path / "data"), seed=1)
    data.prepare_data()
    data.setup("fit")
    def first_batches(loader: Batches, epoch: int) -> list[torch.Tensor]:
        loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch's start
        return [labels for (_, labels), _ in zip(loader, range(2))]

    shuffled = Batches(data.train, 16, shuffle=True, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(first_batches(shuffled, 0), first_batches(shuffled, 1)))
    trainer = pl.Trainer(overfit_batches=2, logger=False, enable_checkpointing=False, accelerator="cpu")
    data.trainer = trainer
    overfit = data.train_dataloader()
    assert all(torch.equal(a, b) for a, b in zip(first_batches(overfit, 0), first_batches(overfit, 1)))


def test_a_resumed_loader_goes_on_after_the_batches_it_had_handed_out(tiny_dataset, tmp_path):
    """Batches is resumable as Lightning defines it: its state says how far the epoch got."""
    cfg = load(compose_cfg(*tiny_overrides(tiny_dataset, tmp_path)))
    data = ImageDataModule(cfg.data, str(tmp_path / "data"), seed=1)
    data.prepare_data()
    data.setup("fit")
    loader = Batches(data.train, 32, shuffle=True, seed=5)
    loader.sampler.set_epoch(3)
    whole = [b[1] for b in loader]
    loader.sampler.set_epoch(3)
    iterator = iter(loader)
    for _ in range(4):
        next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 4}
    resumed = Batches(data.train, 32, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(3)  # Lightning sets the epoch before iterating
    rest = [b[1] for b in resumed]
    assert len(rest) == len(whole) - 4 and all(torch.equal(a, b) for a, b in zip(rest, whole[4:]))
    at_epoch_end = Batches(data.train, 32, shuffle=True, seed=5)
    at_epoch_end.load_state_dict({"epoch": 3, "batches": 2})
    at_epoch_end.sampler.set_epoch(4)  # the checkpoint ended epoch 3 (limit_train_batches=2): a whole epoch 4
    assert len(list(at_epoch_end)) == len(whole)
