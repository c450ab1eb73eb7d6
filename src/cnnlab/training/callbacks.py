"""Lightning callbacks that make a training run a record (chosen in conf/callbacks/).

Each one that produces run-level numbers keeps them in `summary`, logs them to the trainer's
loggers, and `train()` returns them; see cnnlab.core.keys for the names.
"""

from __future__ import annotations

import copy
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from cnnlab.core import keys
from cnnlab.core.config import flatten
from cnnlab.core.errors import CnnlabError, one_line
from cnnlab.core.files import csv_text, write_atomic
from cnnlab.core.internals import batches_done_this_epoch, convert_inf
from cnnlab.tracking.lineage import job_overrides
from cnnlab.tracking.logger import mlflow_loggers
from cnnlab.tracking.repeats import USED_TAGS, configuration_id, without_seed
from cnnlab.tracking.tasks import task_id
from cnnlab.training import costs, plots, runtime
from cnnlab.training.heads import FromPixels
from cnnlab.training.images import pixels_of

log = logging.getLogger(__name__)
CURVE_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "train_images_per_s")


def _log_metrics(trainer: pl.Trainer, metrics: dict) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


class EpochCurves(Callback):
    """One CSV row per epoch with train and val side by side, plus epoch time and throughput; at
    the end of training, the best epoch, median epoch time and throughput, and peak memory.

    Lightning's CSVLogger (and DVCLive's one file per metric) put train and val metrics on
    separate rows or files, keyed by step; DVC's plots and the comparison report want one row
    per epoch, which this writes after every epoch (atomically, so a crash leaves a whole file).

    A value is written only if it was measured in that epoch: an epoch without validation
    (`trainer.check_val_every_n_epoch`) has blank val columns, never the last epoch's. Time is
    the time spent training the epoch: an epoch stopped and resumed (Ctrl-C, SIGTERM, a kill)
    adds the part before the stop, which every checkpoint written mid-epoch carries, to the part
    after it; the time in between is no part of it. Validation time is left out of images/s.
    """

    def __init__(self, path: str):
        self.path, self.rows, self.summary = Path(path), [], {}
        self._trainer: pl.Trainer | None = None
        self._cuda: torch.device | None = None  # the GPU trained on, whose queued work timing waits for
        self._start: float | None = None  # perf_counter() when this process began the current epoch
        self._carried_s = 0.0             # the epoch's seconds before a stop (from the checkpoint)
        self._val_s = 0.0                 # the epoch's seconds in validation (mid-epoch ones included)
        self._val_start: float | None = None
        self._validated = False
        self._images = 0                  # images trained this epoch (all attempts)
        self._resumed: dict = {}          # a mid-epoch checkpoint's part of the epoch, until it is used

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer
        self._cuda = trainer.strategy.root_device if trainer.strategy.root_device.type == "cuda" else None

    def _now(self) -> float:
        """perf_counter() once the GPU has done the work queued so far (the host runs ahead of it):
        one sync at each end of an epoch and of a validation."""
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        return time.perf_counter()

    def _begin_epoch(self) -> None:
        partial, self._resumed = self._resumed, {}
        self._start = self._now()
        self._carried_s, self._val_s = partial.get("epoch_s", 0.0), partial.get("val_s", 0.0)
        self._images, self._validated, self._val_start = partial.get("images", 0), False, None

    # Lightning calls on_train_epoch_start for every epoch it begins, but not for an epoch resumed
    # in the middle; on_train_start then begins it (whichever comes first uses the resumed part).
    def on_train_start(self, trainer, pl_module):
        self._begin_epoch()

    def on_train_epoch_start(self, trainer, pl_module):
        if self._start is None:  # not the epoch on_train_start began
            self._begin_epoch()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._images += len(batch[1])

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._val_start = self._now()

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking and self._val_start is not None:
            self._val_s += self._now() - self._val_start
            self._val_start, self._validated = None, True

    def _elapsed_s(self) -> float:
        return self._carried_s + (self._now() - self._start if self._start is not None else 0.0)

    def on_train_epoch_end(self, trainer, pl_module):
        epoch_s = self._elapsed_s()
        train_s = max(epoch_s - self._val_s, 1e-9)
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        val = (lambda key: m.get(key)) if self._validated else (lambda key: None)
        row = {"epoch": trainer.current_epoch + 1, "train_loss": m.get("train/loss"), "train_acc": m.get("train/acc"),
               "val_loss": val("val/loss"), "val_acc": val(keys.VAL_ACC),
               "epoch_time_s": round(epoch_s, 3),
               # all processes of a distributed training together (each trains on its shard)
               "train_images_per_s": round(self._images * trainer.world_size / train_s, 1)}
        self.rows.append(row)
        self._start, self._images = None, 0
        if trainer.is_global_zero:
            write_atomic(self.path, csv_text(CURVE_FIELDS, self.rows))
            log.info("epoch %d/%d: %s; %.1f s, %.0f images/s", row["epoch"], trainer.max_epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k in CURVE_FIELDS[1:5] and v is not None),
                     row["epoch_time_s"], row["train_images_per_s"])
        # Logged through the module, so Lightning files them at the step of the epoch's other metrics.
        pl_module.log_dict({keys.EPOCH_TIME: row["epoch_time_s"], keys.TRAIN_IMAGES_PER_S: row["train_images_per_s"],
                            keys.TORCH_THREADS: float(torch.get_num_threads())}, on_step=False, on_epoch=True)

    def state_dict(self) -> dict:
        """In every checkpoint: the rows so far (a resumed run's curves start where it stopped) and,
        written mid-epoch, the epoch's part so far (a resumed epoch's time and images/s are whole)."""
        state: dict = {"rows": self.rows}
        if self._start is not None and batches_done_this_epoch(self._trainer):
            state["epoch"] = {"epoch_s": self._elapsed_s(), "val_s": self._val_s, "images": self._images}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state.get("rows", []))
        self._resumed = dict(state.get("epoch") or {})

    def on_fit_end(self, trainer, pl_module):
        rows = [r for r in self.rows if r["val_acc"] is not None]
        if not rows:
            return
        best = max(rows, key=lambda r: r["val_acc"])
        self.summary = {keys.BEST_VAL_ACC: best["val_acc"], keys.BEST_VAL_EPOCH: best["epoch"],
                        keys.MEDIAN_EPOCH_TIME: statistics.median(r["epoch_time_s"] for r in self.rows),
                        keys.MEDIAN_TRAIN_IMAGES_PER_S: statistics.median(r["train_images_per_s"] for r in self.rows),
                        **peak_memory(pl_module.device)}
        _log_metrics(trainer, self.summary)
        for logger in mlflow_loggers(trainer):
            logger.log_artifact(self.path, Path(keys.CURVES_ARTIFACT).parent.as_posix())
            title = f"{trainer.datamodule.spec.name}: learning curves"
            logger.log_figure(plots.learning_curves(self.rows, title), keys.LEARNING_CURVES_PLOT)


class EpochProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (callbacks.progress_bar), with epochs numbered from 1 as curves.csv
    and val/best_epoch number them, and its total kept for an epoch resumed in the middle (Lightning
    sets it only when an epoch begins). Off when stderr is not a terminal: a log file would get
    every redraw, and EpochCurves logs one line per epoch there."""

    def __init__(self, refresh_rate: int = 50, leave: bool = False):
        super().__init__(refresh_rate=refresh_rate if sys.stderr.isatty() else 0, leave=leave)

    def _describe(self, trainer) -> None:
        bar = self.train_progress_bar
        bar.total = convert_inf(self.total_train_batches)
        bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._describe(trainer)

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self._describe(trainer)


def peak_memory(device: torch.device) -> dict:
    """The process's peak resident memory so far, and on CUDA the peak tensor memory of the device."""
    import resource  # POSIX; ru_maxrss is in KiB on Linux

    peak = {keys.PEAK_MEMORY: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak[keys.PEAK_DEVICE_MEMORY] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


class ModelProfile(Callback):
    """What the trained network costs: parameters, MACs per image, bytes, inference latency.

    Latency is timed in fp32 on the training device, as the exported MLflow model runs, whatever
    precision training used (tag `latency_precision`)."""

    def __init__(self, latency_batch_sizes: list[int], latency_min_run_time_s: float = 0.2):
        where = "config callbacks.model_profile"
        if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in latency_batch_sizes):
            raise CnnlabError(f"{where}.latency_batch_sizes: expected integers >= 1, got {list(latency_batch_sizes)!r}")
        if not isinstance(latency_min_run_time_s, (int, float)) or latency_min_run_time_s <= 0:
            raise CnnlabError(f"{where}.latency_min_run_time_s: expected a number > 0, got {latency_min_run_time_s!r}")
        self.batch_sizes, self.min_run_time_s = list(latency_batch_sizes), latency_min_run_time_s
        self.summary: dict = {}

    def on_fit_end(self, trainer, pl_module):
        net, shape = pl_module.net, trainer.datamodule.input_shape
        self.summary = {keys.PARAMS: costs.count_parameters(net), keys.MACS: costs.count_macs(net, shape)["total"],
                        keys.SIZE_BYTES: costs.size_bytes(net)}
        for batch in self.batch_sizes:
            self.summary[keys.LATENCY.format(batch=batch)] = costs.latency_ms_per_image(
                net, shape, batch, self.min_run_time_s)
        _log_metrics(trainer, self.summary)
        for logger in mlflow_loggers(trainer):
            logger.set_tags({keys.LATENCY_PRECISION: "32"})


class NonFiniteLossGuard(Callback):
    """Stop training when the loss turns NaN or infinite (callbacks.nan_guard; on by default).

    Training on from there only produces garbage that looks like a finished run. Each step's loss is
    copied into a small buffer on its own device (one copy: reading it on the host every step would
    stall a GPU at every step, and even a per-step isfinite costs more than the copy). The buffer is
    checked (one host read) every `check_every_n_steps` steps, at the epoch's end and before any
    checkpoint is written, so the run fails naming the first bad step and its loss, no model is
    logged, and no checkpoint holds weights trained on a broken loss. In distributed training all
    processes decide together, so none is left waiting for the others in the next all-reduce.
    """

    def __init__(self, check_every_n_steps: int = 50):
        if not isinstance(check_every_n_steps, int) or isinstance(check_every_n_steps, bool) or check_every_n_steps < 1:
            raise CnnlabError(f"config callbacks.nan_guard.check_every_n_steps: expected an integer >= 1, "
                              f"got {check_every_n_steps!r}")
        self.every = check_every_n_steps
        self._losses: torch.Tensor | None = None  # the losses since the last check, on the loss's device
        self._held = 0                            # how many of them
        self._steps = 0                           # batches trained in this fit (a resumed one starts at 0)
        self._first_step = 0                      # the trainer's global step when this fit began

    def on_train_start(self, trainer, pl_module):
        self._losses, self._held, self._steps, self._first_step = None, 0, 0, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if self._losses is None or self._losses.device != loss.device:
            self._losses = torch.empty(self.every, device=loss.device)
        self._losses[self._held] = loss.detach()
        self._held, self._steps = self._held + 1, self._steps + 1
        if self._held == self.every:
            self.check(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.check(trainer)  # an error here writes no file: the last checkpoint stays a sound one

    def check(self, trainer) -> None:
        """Read whether the held losses are all finite (one host sync); fail the run if any is not."""
        losses, held = self._losses, self._held
        finite = torch.isfinite(losses[:held]) if losses is not None and held else None
        bad = finite is not None and not bool(finite.all())
        self._held = 0
        if trainer.strategy.reduce_boolean_decision(bad, all=False):  # any process: all stop
            if not bad:
                raise CnnlabError("the training loss of another process became nan or inf: lower optimizer.lr, or "
                                  "check the data (callbacks.nan_guard stops such runs)")
            first = int((~finite).nonzero()[0])
            step = self._first_step + self._steps - held + first + 1
            raise CnnlabError(f"the training loss became {float(losses[first])} at step {step} (epoch "
                              f"{trainer.current_epoch + 1}): lower optimizer.lr, or check the data "
                              f"(callbacks.nan_guard stops such runs)")


def package_versions() -> dict[str, str]:
    """What a rerun needs installed: Python and the packages that compute or record the result."""
    from importlib.metadata import PackageNotFoundError, version

    found = {keys.VERSION.format(package="python"): platform.python_version()}
    for package in ("cnnlab", "torch", "pytorch-lightning", "torchmetrics", "hydra-core", "mlflow", "numpy"):
        try:
            found[keys.VERSION.format(package=package)] = version(package)
        except PackageNotFoundError:
            continue
    return found


def installed_requirements() -> str:
    """Every installed distribution as `name==version`, one per line, for `pip install -r`: the
    environment a run can be repeated in. cnnlab itself is left out (the run records its git commit)."""
    from importlib.metadata import distributions

    found = {(d.metadata["Name"] or "").lower(): d.version for d in distributions() if d.metadata["Name"]}
    found.pop("cnnlab", None)
    return "".join(f"{name}=={version}\n" for name, version in sorted(found.items()))


class RunRecord(Callback):
    """What every run records besides its metrics, once the data is ready: the resolved config
    (as params, flattened to dotted keys, and as a JSON artifact), the data's checksum and split,
    the device, precision and threads it ran with, and the package versions (git commit, dirty
    flag and overrides come with the run itself, cnnlab.tracking.lineage.run_tags); and, if it fails, why.

    train() adds it to every run (it is not optional, so it is not in conf/callbacks/). `used`: the
    values train() chose for knobs set to `auto` (cnnlab.tracking.repeats.USED_TAGS) besides the precision
    and the device, which the trainer says; all are recorded as tags.
    """

    def __init__(self, config: dict, used: dict | None = None):
        self.config, self.used = config, dict(used or {})
        self.failed_run_id: str | None = None  # the MLflow run a failure was recorded on (on_exception)

    def on_fit_start(self, trainer, pl_module):
        datamodule, device = trainer.datamodule, trainer.strategy.root_device
        name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        if "bf16" in str(trainer.precision) and not runtime.bf16_is_native(device):
            log.warning("%s has no native bf16: trainer.precision=%s will be slow here; use trainer.precision=auto "
                        "(or 32)", name, trainer.precision)
        params = {k: ("null" if v is None else v) for k, v in flatten(self.config).items()}
        params.update({f"data.split.{k}": v for k, v in datamodule.split.items()})
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        # What this run repeats, so that runs differing only in seed are grouped (cnnlab.tracking.repeats): with
        # the values it used, so `auto` on two kinds of machine makes two configurations. The precision
        # as Lightning names it: "32" and "32-true" train alike.
        used = {**self.used, "trainer.precision": trainer.precision, "trainer.accelerator": device.type,
                "trainer.devices": trainer.num_devices}
        tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32  # runtime.apply: follows matmul_precision
        repeats = {keys.CONFIGURATION: configuration_id({**params, **used}),
                   keys.REPEATS: without_seed(job_overrides())}
        for logger in mlflow_loggers(trainer):
            logger.set_tags({**repeats, keys.MODEL_NAME: self.config["model"]["name"],
                             keys.DATA_NAME: datamodule.spec.name,
                             keys.DATA_CHECKSUM: datamodule.checksum, keys.DEVICE: name,
                             keys.TASK: task_id(params, datamodule.checksum),  # what its accuracy measures
                             **{USED_TAGS[k]: v for k, v in used.items()}, keys.THREADS: torch.get_num_threads(),
                             keys.TF32: tf32,
                             **package_versions()})
            logger.log_dict(self.config, keys.CONFIG_ARTIFACT)
            logger.log_text(installed_requirements(), keys.ENVIRONMENT_ARTIFACT)
            logger.log_datasets([(dataset_input(datamodule, split), split) for split in ("train", "validation")])
            skipped = datamodule.skipped
            logger.set_tags({keys.DATA_SKIPPED: len(skipped)})
            if skipped:  # data.skip_bad_files: what this run did not train or test on, and why
                logger.log_dict({"skipped": skipped}, keys.SKIPPED_ARTIFACT)

    def on_test_start(self, trainer, pl_module):
        for logger in trainer.loggers:
            logger.log_hyperparams({"data.split.test_size": trainer.datamodule.split["test_size"]})
        for logger in mlflow_loggers(trainer):
            logger.log_datasets([(dataset_input(trainer.datamodule, "test"), "test")])

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return  # not an error: the run ends KILLED and resumes (cnnlab.training.checkpoints.ResumeCheckpoint)
        for logger in mlflow_loggers(trainer):
            if logger.opened:  # a run exists: record the error on it (Lightning marks it FAILED)
                logger.set_tags({keys.ERROR: one_line(exception)})
                self.failed_run_id = logger.run_id  # train() raises RunFailed with it


def dataset_input(datamodule, split: str):
    """One split of the run's data as an MLflow dataset (the UI's Datasets column): named
    `<dataset>-<split>`, its digest the checksum of the files the run read (data.checksum), its
    source where they came from (the IDX folder, the image folder, the archive), its schema the
    tensors a batch holds."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(np.float32), (-1, *datamodule.input_shape), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    return MetaDataset(LocalArtifactDatasetSource(datamodule.source),
                       name=f"{datamodule.spec.name}-{split}", digest=datamodule.checksum, schema=schema)


class LogMLflowModel(Callback):
    """After testing (the best checkpoint's weights are loaded), log the network with the data's
    normalisation before it and its softmax/sigmoid after it (heads.FromPixels) as an MLflow
    PyTorch model, with signature, input example and, as metadata, what `cnnlab predict` needs:
    the class names and the image size. It takes pixel values in [0, 1] and returns probabilities,
    so a registered or served model needs nothing but images.

    The example has several images because torch.export would pin a batch dimension of 1 to a constant.
    """

    def __init__(self, examples: int = 4):
        self.examples = examples

    def on_test_end(self, trainer, pl_module):
        import mlflow
        from mlflow.models import infer_signature

        loggers = mlflow_loggers(trainer)
        if not loggers:
            return
        data = trainer.datamodule
        model = FromPixels(copy.deepcopy(pl_module.probability_model()),
                           *data.spec.normalize.per_channel(data.spec.channels)).to(
            "cpu", memory_format=torch.contiguous_format).eval()
        example = data.original_images(data.test.tensors[0][: self.examples].float().cpu())
        with torch.no_grad():
            output = model(example)
        signature = infer_signature(example.numpy(), output.numpy())
        metadata = model_metadata(pl_module.head.class_names(data.spec.class_names), data.input_shape,
                                  data.spec.format)
        export = {"signature": signature, "input_example": example.numpy(), "metadata": metadata,
                  "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"]}

        def save_model(folder: Path) -> None:  # a store away at the end: the model waits on disk for `cnnlab sync`
            with torch.inference_mode():  # as in on_test_end, where its tensors were made (Lightning's test loop)
                mlflow.pytorch.save_model(model, str(folder / keys.MODEL_ARTIFACT), **export)

        for logger in loggers:
            def log_model(logger=logger):
                mlflow.set_experiment(experiment_id=logger.experiment_id)  # MLflow 3 files the model under it
                mlflow.pytorch.log_model(model, name=keys.MODEL_ARTIFACT, run_id=logger.run_id, **export)
            logger.send({"kind": "model", "name": keys.MODEL_ARTIFACT}, log_model, spool=save_model)


def model_metadata(class_names: list[str], input_shape: tuple[int, int, int], data_format: str = "idx") -> dict:
    """What a logged model says about its input and output (MLflow model metadata; cnnlab.analysis.predict
    reads it): the classes, the input shape, and how a picture is made to look like its training
    images (cnnlab.training.images.pixels_of its data.format)."""
    return {keys.MODEL_INPUT: keys.MODEL_INPUT_PIXELS, keys.MODEL_PIXELS: pixels_of(data_format),
            "class_names": list(class_names), "input_shape": list(input_shape)}
