"""The distributed checks of tests/test_ddp.py that need two processes, in one launch (each process
start costs ~13 s of imports on a 2-core machine):

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py DATASET WORKDIR

Each process (gloo, CPU) trains in turn, all in one process group:
- zoo: every model of conf/model/ for two steps under the real trainer=ddp config;
- checkpoint: an uninterrupted run, and the same run stopped by SIGTERM (sent to every process at
  the same step, as torchrun and srun do) after steps 2 and 4 and resumed twice;
- nan: a loss that turns NaN on rank 1 only, under NonFiniteLossGuard.
and writes what it saw to WORKDIR/rank<N>.json for the test to check. `Probe` (a callback given in
the config) is also used in-process by test_ddp.py.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn

from cnnlab.core import keys
from cnnlab.core.config import CONF_DIR
from cnnlab.core.errors import CnnlabError
from cnnlab.training.callbacks import NonFiniteLossGuard
from cnnlab.training.checkpoints import Interrupted
from cnnlab.training.train import train

from conftest import compose_cfg, tiny_overrides  # this file's folder is on sys.path (a script's, or pytest's)

# Hydra imports a config's `_target_: ddp_worker.Probe` by module name: let it find this one.
if __name__ == "__main__":
    sys.modules.setdefault("ddp_worker", sys.modules["__main__"])

RECORDS: list[dict] = []  # one per fit this process ran with a Probe


class Probe(pl.Callback):
    """Records what each fit ran with (RECORDS); sends this process SIGTERM after the first step of
    `stop_at` beyond where the fit began (a resumed fit goes on to the next one)."""

    def __init__(self, stop_at: list[int] = ()):
        self.stop_at, self.record = list(stop_at), {}

    def on_train_start(self, trainer, pl_module):
        began = trainer.global_step
        self.stop = next((s for s in self.stop_at if s > began), None)
        batch_norms = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        restored = pl_module.epoch_outputs["train"]
        self.record = {"strategy": type(trainer.strategy).__name__, "world_size": trainer.world_size,
                       "rank": trainer.global_rank, "began_at": began, "batch_norms": len(batch_norms),
                       "sync_batch_norms": sum(isinstance(m, nn.SyncBatchNorm) for m in batch_norms),
                       "restored_outputs": sum(len(entry[0]) for entry in restored),
                       "broadcast_buffers": getattr(trainer.strategy.model, "broadcast_buffers", None)}
        RECORDS.append(self.record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.stop:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer, pl_module):
        self.record["global_step"] = trainer.global_step


def overrides(dataset: Path, workdir: Path, output: str, *extra: str) -> list[str]:
    common = [o for o in tiny_overrides(dataset, workdir) if not o.startswith("paths.output_dir")]
    return [*common, f"paths.output_dir={workdir / output}", "trainer=ddp", "logger=none", *extra]


def zoo(dataset: Path, workdir: Path) -> dict:
    found = {}
    for name in sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")):
        cfg = compose_cfg(*overrides(dataset, workdir, f"zoo-{name}", f"model={name}", "trainer.limit_train_batches=2",
                                     "trainer.limit_val_batches=1", "+callbacks.probe._target_=ddp_worker.Probe"))
        result = train(cfg)
        found[name] = {**RECORDS[-1], "test_acc": result[keys.TEST_ACC], "devices": cfg["trainer"]["devices"],
                       "sync_batchnorm": cfg["trainer"]["sync_batchnorm"]}
    return found


def checkpoint(dataset: Path, workdir: Path) -> dict:
    """Steps of 32 images per process; 150 training images per process: 5 steps in the epoch."""
    found: dict = {"saved_outputs": [], "interrupted": []}
    reference = train(compose_cfg(*overrides(dataset, workdir, "reference")))
    cfg = compose_cfg(*overrides(dataset, workdir, "stopped", "+callbacks.probe={_target_:ddp_worker.Probe,"
                                                                  "stop_at:[2,4]}"))
    last = workdir / "stopped" / "models" / "last.ckpt"
    for _ in range(2):
        try:
            train(cfg)
            raise AssertionError("the fit was not interrupted")
        except Interrupted as exc:
            found["interrupted"].append(str(exc))
        torch.distributed.barrier()  # rank 0 has written the checkpoint
        saved = torch.load(last, weights_only=True)
        found["saved_outputs"].append([len(column) for column in saved["train_epoch_outputs"]])
    resumed = train(cfg)
    found["fits"] = RECORDS[-3:]
    found["reference"] = {k: reference[k] for k in (keys.TEST_ACC, keys.TEST_LOSS)}
    found["resumed"] = {k: resumed[k] for k in (keys.TEST_ACC, keys.TEST_LOSS)}
    if torch.distributed.get_rank() == 0:
        for name, folder in (("reference_curves", "reference"), ("resumed_curves", "stopped")):
            found[name] = list(csv.DictReader((workdir / folder / "metrics" / "curves.csv").open()))
    return found


class NanOnRank1(pl.LightningModule):
    """A linear model whose loss is NaN at global step `bad_step` on global rank 1 only (from the next
    step on every process's is: the gradients are averaged)."""

    def __init__(self, bad_step: int):
        super().__init__()
        self.layer, self.bad_step = nn.Linear(4, 1), bad_step

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if self.global_rank == 1 and self.global_step == self.bad_step:
            loss = loss * float("nan")
        return loss

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))
        return torch.utils.data.DataLoader(data, batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def nan(workdir: Path) -> str:
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(), max_epochs=1, logger=False,
                         callbacks=[NonFiniteLossGuard(check_every_n_steps=3)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=workdir / "nan")
    try:
        trainer.fit(NanOnRank1(bad_step=2))
    except CnnlabError as exc:
        return str(exc)
    return f"no error after {trainer.global_step} steps"


def main(dataset: Path, workdir: Path) -> None:
    rank = int(os.environ["RANK"])
    found: dict = {}
    try:
        found["zoo"] = zoo(dataset, workdir)
        found["checkpoint"] = checkpoint(dataset, workdir)
        found["nan"] = nan(workdir)
    finally:
        (workdir / f"rank{rank}.json").write_text(json.dumps(found, indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
