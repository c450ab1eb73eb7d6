"""Checkpoints that survive faults: written atomically, loaded safely, and one to resume from.

- AtomicCheckpointIO (trainer.plugins): every checkpoint Lightning writes goes to a temp file in
  its own folder, is flushed to disk and renamed over the old one, so a kill or a full disk during
  a save leaves the previous checkpoint whole. (Lightning's own save stages the bytes and then
  writes them in place, so a failed write truncates the file.) Loading uses weights_only=True:
  a checkpoint is tensors and plain values, and nothing in it is unpickled.
- ResumeCheckpoint (callbacks.resume_checkpoint): models/last.ckpt, overwritten at every epoch's
  end (or every N steps), and on SIGTERM or Ctrl-C at the next batch boundary. A rerun of the same
  command continues from it (cnnlab.training.resume); a run that finishes removes it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from cnnlab.core.errors import CnnlabError
from cnnlab.core.files import write_atomic
from cnnlab.tracking.logger import mlflow_loggers
from cnnlab.training.trained import read_checkpoint

log = logging.getLogger(__name__)
LAST = "last"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic saves and weights-only loads (see the module doc)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        buffer = io.BytesIO()  # serialised first: torch.save into a file that fails midway hides the OSError
        torch.save(checkpoint, buffer)
        try:
            write_atomic(path, buffer.getvalue())
        except OSError as exc:  # disk full, quota, permissions: the previous checkpoint is intact
            raise CnnlabError(f"cannot save checkpoint {path}: {exc.strerror or exc}; "
                              f"the previous checkpoint there is unchanged") from None

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_checkpoint(path, map_location or "cpu")


class Interrupted(CnnlabError):
    """Training stopped by a signal; a checkpoint to resume from was written first."""

    def __init__(self, signum: int, checkpoint: str | None):
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}; run the same command again to resume" if checkpoint else "no checkpoint"
        super().__init__(f"interrupted by {name}: {where}")
        self.signum, self.exit_code = signum, 128 + signum  # the shell's convention for "killed by a signal"


class ResumeCheckpoint(ModelCheckpoint):
    """The checkpoint a rerun resumes from: <dirpath>/last.ckpt, every `every_n_epochs` epochs or
    every `every_n_train_steps` steps (then not at epoch ends), and when SIGTERM or SIGINT arrive.

    Signals are turned into a stop at the next batch boundary, never in the middle of an
    optimizer step: SIGTERM through Lightning's own flag (trainer.received_sigterm), SIGINT through
    a handler installed for the fit (a second Ctrl-C interrupts at once, as usual).
    """

    def __init__(self, dirpath: str, every_n_epochs: int | None = 1, every_n_train_steps: int | None = None):
        for key, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise CnnlabError(f"config callbacks.resume_checkpoint.{key}: expected an integer >= 1 or null, "
                                  f"got {value!r}")
        if every_n_epochs is None and every_n_train_steps is None:
            raise CnnlabError("config callbacks.resume_checkpoint: set every_n_epochs or every_n_train_steps")
        super().__init__(dirpath=dirpath, filename=LAST, monitor=None, save_top_k=1, enable_version_counter=False,
                         every_n_epochs=None if every_n_train_steps else every_n_epochs,
                         every_n_train_steps=every_n_train_steps,
                         # at the epoch's end, after EpochCurves has added the epoch's row (checkpoint
                         # callbacks run last), not when validation ends, before it
                         save_on_train_epoch_end=True)
        self.signum: int | None = None
        self._previous_sigint = None

    @property
    def state_key(self) -> str:
        return "ResumeCheckpoint"  # one per run, whatever its frequency; resumable after a config edit

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / f"{LAST}{self.FILE_EXTENSION}"

    def on_fit_start(self, trainer, pl_module):
        def on_sigint(signum, frame):
            self.signum = signal.SIGINT
            signal.signal(signal.SIGINT, self._previous_sigint)  # a second Ctrl-C stops at once
        self._previous_sigint = signal.signal(signal.SIGINT, on_sigint)

    def on_fit_end(self, trainer, pl_module):
        self._restore_sigint()

    def _restore_sigint(self):
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Here, not after the previous batch: Lightning counts a batch as completed only after its
        # on_train_batch_end hooks, and the checkpoint must say exactly which batches were trained.
        if trainer.received_sigterm and self.signum is None:
            self.signum = signal.SIGTERM
        if self.signum is not None:
            raise SIGTERMException  # Lightning's own "stop now" (a SystemExit): on_exception saves

    def on_exception(self, trainer, pl_module, exception):
        self._restore_sigint()
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return  # a failed run is not resumed from: its weights may be what failed (a NaN loss)
        self.signum = self.signum or (signal.SIGINT if isinstance(exception, KeyboardInterrupt) else signal.SIGTERM)
        if trainer.sanity_checking or trainer.global_step == 0:
            return
        # The whole training state (optimizer, loops, callbacks), as every resume checkpoint; also when
        # already saved at this step: it now records the stop. (Loading is weights-only regardless.)
        trainer.save_checkpoint(self.path, weights_only=False)
        name = signal.Signals(self.signum).name
        log.warning("interrupted by %s: saved %s", name, self.path)
        for logger in mlflow_loggers(trainer):
            logger.interrupted_by(name)  # the run ends KILLED, not FAILED

    def interruption(self) -> Interrupted | None:
        """The Interrupted error to report, if a signal stopped the fit."""
        if self.signum is None:
            return None
        return Interrupted(self.signum, str(self.path) if self.path.is_file() else None)


@contextlib.contextmanager
def interruptions_reported(callbacks: list):
    """Around fit and test: a stop by SIGTERM or Ctrl-C (Lightning ends it with a SystemExit, status
    0 for SIGTERM) becomes an Interrupted error naming the signal and the checkpoint written."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        for callback in callbacks:
            interruption = callback.interruption() if isinstance(callback, ResumeCheckpoint) else None
            if interruption is not None:
                raise interruption from None
        raise
