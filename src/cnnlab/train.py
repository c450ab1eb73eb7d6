"""Training: `python -m cnnlab.train [overrides]` (Hydra app over conf/) and the DVC `train` stage.

`train(cfg, output_dir)` is a plain function returning the run's metrics; the Hydra entry point is
a thin wrapper. Outputs under output_dir (fixed names, so DVC can track them):
  models/model.ckpt        best checkpoint by validation accuracy (holds the resolved config)
  models/mlflow_run.json   the MLflow run this model belongs to
  metrics/train.json       final metrics and run facts
  metrics/curves.csv       one row per epoch
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import hydra
import mlflow
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from filelock import FileLock
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from cnnlab import CnnlabError, csv_text, tracking, write_atomic
from cnnlab.config import CONF_DIR, validate
from cnnlab.data import MNISTDataModule
from cnnlab.fetch import fetch_dataset, is_current, read_manifest
from cnnlab.model import CNNClassifier, count_macs, count_parameters, measure_latency

log = logging.getLogger(__name__)
CURVE_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "train_images_per_s")


class EpochCurves(Callback):
    """One CSV row per epoch with train and val side by side, plus epoch timing.

    Lightning's CSVLogger writes train and val metrics on separate rows (different steps), which DVC
    plots cannot draw as curves; this writes the table DVC and the comparison report want.
    """

    def __init__(self, path: Path):
        self.path, self.rows = path, []
        self._epoch_start = self._train_end = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start = self._train_end = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._train_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        now = time.perf_counter()
        train_time = (self._train_end if self._train_end > self._epoch_start else now) - self._epoch_start
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        images = trainer.num_training_batches * trainer.datamodule.cfg["batch_size"]
        images = min(images, len(trainer.datamodule.train))
        row = {"epoch": trainer.current_epoch + 1, "train_loss": m.get("train/loss"), "train_acc": m.get("train/acc"),
               "val_loss": m.get("val/loss"), "val_acc": m.get("val/acc"), "epoch_time_s": round(now - self._epoch_start, 3),
               "train_images_per_s": round(images / max(train_time, 1e-9), 1)}
        self.rows.append(row)
        write_atomic(self.path, csv_text(CURVE_FIELDS, self.rows))
        if trainer.logger is not None:
            trainer.logger.log_metrics({"perf/epoch_time_s": row["epoch_time_s"],
                                        "perf/train_images_per_s": row["train_images_per_s"]}, step=trainer.global_step)


def _threads_per_job() -> int | None:
    """With the joblib launcher running n jobs at once, give each cpu_count // n torch threads."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().launcher
    n_jobs = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")).lower() else None
    if not n_jobs or n_jobs == 1:
        return None
    cpus = os.cpu_count() or 1
    return max(1, cpus // (cpus if n_jobs < 0 else min(n_jobs, cpus)))


def _apply_runtime(runtime: dict) -> None:
    torch.set_float32_matmul_precision(runtime.get("matmul_precision", "highest"))
    threads = runtime.get("num_threads") or _threads_per_job()
    if threads:
        torch.set_num_threads(int(threads))
    # In-memory tensors need no worker processes; Lightning's advice to add some does not apply.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _curves_figure(rows: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in rows]
    for split in ("train", "val"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in rows], marker="o", label=split)
        ax_acc.plot(epochs, [r[f"{split}_acc"] for r in rows], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _log_model(module: CNNClassifier, example: torch.Tensor) -> None:
    """Log the network (with its softmax/sigmoid) as an MLflow PyTorch model with signature.

    MLflow 3 saves it with torch.export ("pt2"), so loading needs no cnnlab code; the example has
    several images because torch.export would pin a batch dimension of 1 to a constant.
    """
    from mlflow.models import infer_signature

    model = module.probability_model().to("cpu").eval()
    model = model.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        output = model(example)
    signature = infer_signature(example.numpy(), output.numpy())
    tracking._retry(mlflow.pytorch.log_model, model, name="model", signature=signature,
                    input_example=example.numpy(), pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def run_facts(net: torch.nn.Module, rows: list[dict], c: dict) -> dict:
    """What a comparison needs besides accuracy: size, cost, speed, and when validation peaked."""
    input_shape = (c["data"]["channels"], c["data"]["image_size"], c["data"]["image_size"])
    best_row = max(rows, key=lambda r: r["val_acc"])
    facts = {
        "val/best_acc": best_row["val_acc"], "val/best_epoch": best_row["epoch"],
        "model/params": count_parameters(net), "model/macs": count_macs(net, input_shape)["total"],
        "model/size_bytes": sum(t.numel() * t.element_size() for t in net.state_dict().values()),
        "perf/median_epoch_time_s": statistics.median([r["epoch_time_s"] for r in rows]),
        "perf/train_images_per_s": statistics.median([r["train_images_per_s"] for r in rows]),
    }
    for batch in c["benchmark"]["latency_batch_sizes"]:
        facts[f"perf/latency_ms_per_image_b{batch}"] = measure_latency(net, input_shape, batch,
                                                                       c["benchmark"]["latency_repeats"])
    return facts


def train(cfg: DictConfig | dict, output_dir: str | Path = ".") -> dict:
    """Train, test and log one model; return its metrics (test/acc, val/best_acc, ...)."""
    c = validate(cfg)
    out = Path(output_dir)
    _apply_runtime(c["runtime"])
    pl.seed_everything(c["seed"], workers=True, verbose=False)

    data_dir = c["paths"]["data_dir"]
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with FileLock(Path(data_dir) / f".{c['data']['name']}.lock"):  # parallel sweep jobs share the folder
        manifest = read_manifest(data_dir, c["data"]["name"])
        if manifest is None or not is_current(manifest, c["data"]):
            manifest = fetch_dataset(c["data"], data_dir, c["fetch"]["timeout_s"])
    datamodule = MNISTDataModule(c["data"], data_dir, seed=c["seed"])
    datamodule.setup()
    module = CNNClassifier(c)
    if c["runtime"].get("channels_last"):
        module = module.to(memory_format=torch.channels_last)

    uri, _ = tracking.setup(c["tracking"])
    parent = tracking.sweep_parent_run_id()
    tags = tracking.run_tags({"data.checksum": manifest["checksum"], "model.name": c["model"]["name"],
                              "data.name": c["data"]["name"], "cnnlab.role": "train"})
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=c["tracking"]["run_name"], tags=tags) as run:
        try:
            tracking.log_params(c)
            tracking._retry(mlflow.log_params, {f"data.split.{k}": v for k, v in datamodule.split.items()})
            tracking.log_dict_artifact(c, "config/resolved_config.json")
            logger = MLFlowLogger(experiment_name=c["tracking"]["experiment_name"], tracking_uri=uri, run_id=run.info.run_id)
            checkpoint = ModelCheckpoint(dirpath=out / "models", filename="model", monitor="val/acc", mode="max",
                                         save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False)
            curves = EpochCurves(out / "metrics" / "curves.csv")
            trainer: pl.Trainer = instantiate(c["trainer"], callbacks=[checkpoint, curves], logger=logger,
                                              default_root_dir=str(out / "outputs"))
            device = str(trainer.strategy.root_device)
            if trainer.strategy.root_device.type == "cuda":
                device += f" ({torch.cuda.get_device_name(trainer.strategy.root_device)})"
            mlflow.set_tags({"device": device, "precision": trainer.precision, "torch.threads": torch.get_num_threads()})
            trainer.fit(module, datamodule=datamodule)
            if not checkpoint.best_model_path:
                raise CnnlabError("training produced no checkpoint (did validation run? check trainer.limit_val_batches)")
            test = trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint.best_model_path, verbose=False)[0]
            best = CNNClassifier.load_from_checkpoint(checkpoint.best_model_path, map_location="cpu")
            rows = curves.rows
            results = {"test/loss": test["test/loss"], "test/acc": test["test/acc"],
                       **run_facts(best.net.to(trainer.strategy.root_device), rows, c)}
            tracking._retry(mlflow.log_metrics, {k: float(v) for k, v in results.items()})
            fig = _curves_figure(rows, f"{c['model']['name']} on {c['data']['name']}")
            tracking._retry(mlflow.log_figure, fig, "plots/learning_curves.png")
            tracking._retry(mlflow.log_artifact, str(curves.path), "metrics")
            if c["tracking"]["log_model"]:
                _log_model(best, datamodule.test.images[:4].float().cpu())
            tracking.write_run_pointer(out / "models" / "mlflow_run.json", run, uri)
            write_atomic(out / "metrics" / "train.json", json.dumps(
                {**results, "device": device, "mlflow_run_id": run.info.run_id}, indent=2) + "\n")
            log.info("test accuracy %.4f; MLflow run %s in %s (UI: %s)", results["test/acc"], run.info.run_id, uri,
                     tracking.ui_path(run.info.experiment_id, run.info.run_id))
            return {**results, "mlflow_run_id": run.info.run_id}
        except BaseException as exc:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            exc.mlflow_run_id = run.info.run_id  # main() need not record the failure again
            raise


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point. Returns best validation accuracy, the value sweepers maximise.

    In a multirun a failing job is logged (an MLflow run marked FAILED, with its error, under the
    sweep's parent) and returns NaN so the sweep goes on; a single run exits non-zero with a
    one-line error.
    """
    from hydra.core.hydra_config import HydraConfig

    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        return train(cfg, HydraConfig.get().runtime.output_dir)["val/best_acc"]
    except Exception as exc:
        if multirun:
            log.error("job %s failed, the sweep goes on: %s", HydraConfig.get().job.num, exc)
            if not getattr(exc, "mlflow_run_id", None):
                tracking.record_failed_run(cfg, exc)
            return math.nan
        if isinstance(exc, CnnlabError):
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
