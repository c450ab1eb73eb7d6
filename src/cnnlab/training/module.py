"""The LightningModule: trains a network it is given, through a head it is given.

It receives built objects (the network, the head, an optimizer partial and an optional LR
scheduler partial) and reads no config. The `architecture` it is given (the model spec, input
shape and number of labels) is only a record: it goes into the checkpoint so that `restore`
can rebuild the same network and head for evaluation.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from cnnlab.core import keys
from cnnlab.training.heads import Head, WithProbabilities
from cnnlab.training.trained import load_weights, rebuild


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, head: Head, optimizer: partial, scheduler: partial | None = None,
                 architecture: dict | None = None):
        super().__init__()
        self.save_hyperparameters({"architecture": architecture}, logger=False)
        self.net, self.head = net, head
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        if architecture:
            self.example_input_array = torch.zeros(1, *architecture["input_shape"])
        # Each step keeps its predictions, targets and loss (tensors it has anyway); the metrics
        # are updated and logged once per epoch. Measured here, per-step self.log calls and
        # torchmetrics updates cost 10-15% of a 32-image CPU step (benchmarks/speed.py).
        self.metrics = nn.ModuleDict({
            f"{stage}_{name}": metric for stage in ("train", "val", "test")
            for name, metric in (("acc", MulticlassAccuracy(head.num_classes, average="micro")),
                                 ("loss", MeanMetric(nan_strategy="disable")))  # a NaN loss shows as a NaN mean
        })
        self.epoch_outputs: dict[str, list] = {"train": [], "val": [], "test": []}
        # The test set's binary question (model.positive_classes vs the rest) for every head, so
        # that a softmax model and a sigmoid head are compared on one scale (cnnlab.tracking.tasks).
        self.binary_acc, self.binary_outputs = BinaryAccuracy(), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, labels = batch
        targets = self.head.targets(labels)
        logits = self(x)
        loss = self.head.loss(logits, targets)
        # The batch's mean loss once per image, so that the epoch's loss is the mean over images.
        self.epoch_outputs[stage].append((self.head.predictions(logits), targets, loss.detach().expand(len(x))))
        if stage == "test" and self.head.positive.any() and not self.head.positive.all():
            self.binary_outputs.append((self.head.positive_probability(logits.detach()), self.head.positive[labels]))
        return loss

    def _log_epoch(self, stage: str) -> None:
        outputs = self.epoch_outputs[stage]
        if not outputs:
            return
        device = outputs[-1][0].device  # a resumed epoch's first entry comes from the checkpoint, on the CPU
        predictions, targets, losses = (torch.cat([t.to(device) for t in column]) for column in zip(*outputs))
        outputs.clear()
        accuracy, loss = self.metrics[f"{stage}_acc"], self.metrics[f"{stage}_loss"]
        accuracy.update(predictions, targets)
        loss.update(losses)
        # Logged as metric objects: Lightning computes them (synced across processes) and resets them.
        self.log_dict({f"{stage}/loss": loss, f"{stage}/acc": accuracy}, on_step=False, on_epoch=True, prog_bar=True)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # After the epoch's last step, not in on_train_epoch_end: Lightning runs the callbacks'
        # on_train_epoch_end (EpochCurves reads the epoch's metrics there) before the module's.
        # A stop requested by a callback (trainer.max_time's Timer, which runs before this hook)
        # ends the epoch here too: its metrics are those of the batches it trained.
        if self.trainer.is_last_batch or self.trainer.should_stop:
            self._log_epoch("train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_test_epoch_end(self):
        self._log_epoch("test")
        if self.binary_outputs:
            probability, positive = (torch.cat(column) for column in zip(*self.binary_outputs))
            self.binary_outputs.clear()
            self.binary_acc.update(probability, positive.long())  # threshold 0.5
            self.log(keys.TEST_BINARY_ACC, self.binary_acc, on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint written mid-epoch (SIGTERM, every N steps) keeps what the epoch's metrics
        # need from the batches trained so far, so a resumed epoch still reports the whole epoch.
        # In distributed training Lightning runs this on every process (Trainer.save_checkpoint
        # dumps the state on all, global rank 0 writes it): the outputs of all are gathered, each
        # process holding as many (shards of equal length, one entry per step since the fit began),
        # so rank 0's file has the whole global batch of every step. What a process restored from a
        # checkpoint (rank 0 only, see on_load_checkpoint) is not gathered: it is already global.
        outputs = self.epoch_outputs["train"]
        restored = outputs[:1] if outputs and outputs[0] is getattr(self, "_restored_train_outputs", None) else []
        trained = [torch.cat(column) for column in zip(*outputs[len(restored):])]
        if trained and self.trainer.world_size > 1:  # every process has as many entries: all gather, or none
            trained = [self.all_gather(column).flatten(0, 1) for column in trained]
        parts = [*restored, *([trained] if trained else [])]
        if parts:
            checkpoint["train_epoch_outputs"] = [torch.cat([t.cpu() for t in column]) for column in zip(*parts)]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Every process's outputs (on_save_checkpoint) resume on global rank 0 only, the others
        # start the epoch empty: at the epoch's end torchmetrics sums the metric states of all
        # processes, so each restored output counts once.
        saved = checkpoint.get("train_epoch_outputs")
        self._restored_train_outputs = tuple(saved) if saved and self.global_rank == 0 else None
        self.epoch_outputs["train"] = [self._restored_train_outputs] if self._restored_train_outputs else []

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.parameters())
        if self.make_scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.make_scheduler(optimizer), "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def probability_model(self) -> WithProbabilities:
        return WithProbabilities(self.net, self.head)

    @classmethod
    def restore(cls, checkpoint: str | Path, map_location="cpu") -> Classifier:
        """The trained classifier from a checkpoint, rebuilt from the architecture it records
        (loaded weights-only: a checkpoint holds tensors and plain values, nothing to unpickle)."""
        net, head, arch, weights = rebuild(checkpoint, map_location)
        module = cls(net, head, optimizer=None, architecture=arch)
        load_weights(module, weights, checkpoint)
        return module.eval()
