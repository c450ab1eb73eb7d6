"""Counting host-device synchronisations in a training, on CUDA: a Lightning callback.

A CUDA step that never waits for the GPU lets the host queue the next steps while the GPU works; one
`.item()`, `bool(tensor)`, `.cpu()`, `nonzero()` or blocking host-device copy per step stalls the host
until the GPU has finished everything queued so far. PyTorch reports each such operation when
`torch.cuda.set_sync_debug_mode("warn")` is on ("called a synchronizing CUDA operation"); this
callback turns it on for a window of training batches, counts the warnings and says where they came from.

    PYTHONPATH=benchmarks python -m cnnlab.train ... \\
        +callbacks.sync_audit._target_=gpu_audit.SyncAudit \\
        +callbacks.sync_audit.first_batch=100 +callbacks.sync_audit.last_batch=300

The window is the fit's training batches first_batch <= n < last_batch (n counted from 0 by this
callback, across epochs): from the start of batch `first_batch` to the start of batch `last_batch`,
so it holds those batches' steps and every hook after them (callbacks', the module's, the loader's
next gather). Keep it inside one epoch: an epoch's end (metrics, validation, checkpoints) syncs by
design. cnnlab's NaN guard reads its device buffer every callbacks.nan_guard.check_every_n_steps (50)
steps, one sync each: a window that holds such a check counts it (at the end of batches 49, 99, ...).

Results, in `summary` (cnnlab's train() returns them and writes them to metrics/train.json) and
logged to the trainer's loggers: SYNCS (the count), SYNCS_PER_STEP, AUDITED_STEPS. `where` keeps the
count per source line, logged at the end. On a CPU nothing is counted and nothing is reported (the
debug mode is CUDA's).
"""

from __future__ import annotations

import collections
import logging
import warnings

import torch
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)

SYNCS, SYNCS_PER_STEP, AUDITED_STEPS = "perf/syncs", "perf/syncs_per_step", "perf/sync_audit_steps"
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's message (c10/cuda/CUDAFunctions.cpp)


class SyncAudit(Callback):
    """Counts synchronizing CUDA operations over training batches [first_batch, last_batch)."""

    latest: SyncAudit | None = None  # the last one to finish a fit in this process (tests read its `where`)

    def __init__(self, first_batch: int = 100, last_batch: int = 300):
        if not (isinstance(first_batch, int) and isinstance(last_batch, int) and 0 <= first_batch < last_batch):
            raise ValueError(f"SyncAudit: expected 0 <= first_batch < last_batch, got {first_batch!r}, {last_batch!r}")
        self.first, self.last = first_batch, last_batch
        self.summary: dict = {}
        self.where: collections.Counter = collections.Counter()  # "file:line" -> syncs
        self.syncs = 0
        self.steps = 0
        self._batch = 0             # training batches this fit has started
        self._caught: warnings.catch_warnings | None = None
        self._records: list | None = None
        self._mode_before: int | None = None
        self._started_at = 0        # the batch the window opened at
        self._cuda = False

    def on_train_start(self, trainer, pl_module):
        self._cuda = pl_module.device.type == "cuda"
        self._batch, self.syncs, self.steps, self.summary = 0, 0, 0, {}
        self.where.clear()
        if not self._cuda:
            log.info("SyncAudit counts CUDA synchronisations only; this run trains on %s: nothing counted",
                     pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._cuda:
            if self._batch == self.last:
                self._stop()
            if self._batch == self.first:
                self._start()
        self._batch += 1

    def on_train_epoch_end(self, trainer, pl_module):
        if self._caught is not None:
            log.warning("SyncAudit: the window [%d, %d) reached the end of an epoch; its count includes the "
                        "epoch end's synchronisations", self.first, self.last)

    def on_train_end(self, trainer, pl_module):
        self._stop()
        self._report(trainer)
        SyncAudit.latest = self

    def on_exception(self, trainer, pl_module, exception):
        self._stop()

    def _start(self) -> None:
        self._mode_before = torch.cuda.get_sync_debug_mode()
        self._caught = warnings.catch_warnings(record=True)
        self._records = self._caught.__enter__()
        warnings.simplefilter("always")  # every occurrence, not once per source line
        torch.cuda.set_sync_debug_mode("warn")
        self._started_at = self._batch

    def _stop(self) -> None:
        if self._caught is None:
            return
        torch.cuda.set_sync_debug_mode(self._mode_before or 0)
        self._caught.__exit__(None, None, None)
        records, self._caught, self._records = self._records or [], None, None
        self.steps += self._batch - self._started_at
        for record in records:
            if SYNC_WARNING in str(record.message):
                self.syncs += 1
                self.where[f"{record.filename}:{record.lineno}"] += 1
            else:  # not ours: given to the filters that apply outside the window
                warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)

    def _report(self, trainer) -> None:
        if not self._cuda:
            return
        if not self.steps:
            log.warning("SyncAudit: the fit trained %d batches, none in the window [%d, %d)", self._batch,
                        self.first, self.last)
            return
        self.summary = {SYNCS: float(self.syncs), SYNCS_PER_STEP: self.syncs / self.steps,
                        AUDITED_STEPS: float(self.steps)}
        for logger in trainer.loggers:
            logger.log_metrics(self.summary, step=trainer.global_step)
        log.info("SyncAudit: %d synchronizing CUDA operations in %d training batches [%d, %d): %.3f per step%s",
                 self.syncs, self.steps, self.first, self.first + self.steps, self.syncs / self.steps,
                 "".join(f"\n  {n:6d}  {where}" for where, n in self.where.most_common(10)))
