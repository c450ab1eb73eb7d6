"""Evaluate stage: what training's test lacks, on the same test set and the same best checkpoint.

Test loss and accuracy belong to training (`trainer.test`, in metrics/train.json). Evaluation adds
per-class precision/recall/F1, the confusion matrix and misclassified examples, under its own
keys (eval/...), and logs them into the MLflow run that trained the model. Model and data are
rebuilt from the checkpoint (what was trained, never recomposed defaults). Outputs:
  metrics/eval.json          macro F1, misclassified count, test size (DVC metrics)
  metrics/predictions.csv    actual,predicted per test image (DVC confusion plot)
  metrics/per_class.csv      class,precision,recall,f1 (DVC bar plot; per class, also in MLflow)
  plots/misclassified.png    a grid of misclassified test images
  plots/confusion_matrix.png the confusion matrix as an image (for MLflow; a DVC image plot too)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from omegaconf import OmegaConf

from cnnlab.core import keys
from cnnlab.core.config import Evaluate, parse, project_root
from cnnlab.core.errors import CnnlabError, command, one_line
from cnnlab.core.files import csv_text, write_atomic
from cnnlab.tracking.store import default_http_settings, store_client

if TYPE_CHECKING:  # torch, Lightning and MLflow are imported where they work: `--help` does not wait for them
    from cnnlab.training.data import ImageDataModule
    from cnnlab.training.module import Classifier

log = logging.getLogger(__name__)


def predict(module: Classifier, datamodule: ImageDataModule, batch_size: int):
    """Targets, predicted classes and probabilities over the test set."""
    import torch

    from cnnlab.training.data import Batches

    targets, preds, probs = [], [], []
    with torch.inference_mode():
        for x, labels in Batches(datamodule.test, batch_size, shuffle=False):
            logits = module(x)
            targets.append(module.head.targets(labels))
            preds.append(module.head.predictions(logits))
            probs.append(module.head.probabilities(logits))
    return torch.cat(targets), torch.cat(preds), torch.cat(probs)


def evaluate(checkpoint: str | Path, settings: Evaluate, output_dir: str | Path = ".",
             run_pointer: str | Path | None = None, data_dir: str | Path | None = None) -> dict:
    """Evaluate a checkpoint on its test set; write DVC metrics and plots; log into its MLflow run
    (named by `run_pointer`, by default models/mlflow_run.json beside the checkpoint). The test
    data is the checkpoint's own (its data config), from `data_dir` if given. Nothing is written
    before the checkpoint and the data have been read."""
    from torchmetrics.classification import (
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    from cnnlab.training import plots
    from cnnlab.training.module import Classifier

    checkpoint, out = Path(checkpoint), Path(output_dir)
    if not checkpoint.exists():
        raise CnnlabError(f"{checkpoint} not found: train a model first (`dvc repro train` or `cnnlab train`)")
    module = Classifier.restore(checkpoint)
    datamodule = test_data(checkpoint, data_dir)
    datamodule.setup("test")
    targets, preds, probs = predict(module, datamodule, settings.batch_size)

    names = module.head.class_names(datamodule.spec.class_names)
    k = len(names)
    precision = MulticlassPrecision(k, average=None, zero_division=0)(preds, targets)
    recall = MulticlassRecall(k, average=None, zero_division=0)(preds, targets)
    f1 = MulticlassF1Score(k, average=None, zero_division=0)(preds, targets)
    confusion = MulticlassConfusionMatrix(k)(preds, targets)
    per_class = {name: {"precision": round(float(p), 6), "recall": round(float(r), 6), "f1": round(float(f), 6)}
                 for name, p, r, f in zip(names, precision, recall, f1)}
    metrics = {"macro_f1": round(float(f1.mean()), 6), "misclassified": int((preds != targets).sum()),
               "test_size": len(targets), "per_class": per_class}

    # Per-class values go to per_class.csv (a plot) and MLflow, not to the DVC metrics: there they
    # would be 3 x classes columns ahead of everything else in `dvc exp show`.
    summary = {k: v for k, v in metrics.items() if k != "per_class"}
    write_atomic(out / keys.EVAL_METRICS, json.dumps(summary, indent=2) + "\n")
    write_atomic(out / keys.PREDICTIONS_CSV, csv_text(
        ["actual", "predicted"],
        ({"actual": names[t], "predicted": names[p]} for t, p in zip(targets.tolist(), preds.tolist()))))
    write_atomic(out / keys.PER_CLASS_CSV, csv_text(
        ["class", "precision", "recall", "f1"], ({"class": n, **v} for n, v in per_class.items())))
    images = datamodule.original_images(datamodule.test.tensors[0])
    write_atomic(out / keys.MISCLASSIFIED_PNG, plots.png(
        plots.misclassified(images, targets, preds, probs, names, settings.num_misclassified)))
    write_atomic(out / keys.CONFUSION_PNG, plots.png(plots.confusion_matrix(confusion, names)))

    pointer = Path(run_pointer) if run_pointer else checkpoint.parent / Path(keys.RUN_POINTER).name
    if pointer.is_file():
        info = json.loads(pointer.read_text())
        default_http_settings()  # MLflow's own would wait minutes on a dead server
        try:
            metrics["mlflow_run_id"] = _log_to_training_run(info, metrics, out)
        except Exception as exc:  # the files are written; say plainly what did not reach MLflow
            raise CnnlabError(f"metrics and plots written to {out}, but not logged to MLflow run {info.get('run_id')} "
                              f"in {info.get('tracking_uri')}: {one_line(exc)[:300]}") from None
    else:
        log.warning("%s not found: metrics written, nothing logged to MLflow", pointer)
    return metrics


def test_data(checkpoint: Path, data_dir: str | Path | None = None) -> ImageDataModule:
    """The data module a checkpoint was trained with. Its data folder is recorded as given (often
    relative, `data`): found from the current folder, else from the project the checkpoint lies in,
    so evaluation works from anywhere."""
    from cnnlab.training.data import ImageDataModule
    from cnnlab.training.trained import recorded_data

    hparams = recorded_data(checkpoint)
    name = hparams["data"]["name"]
    recorded = Path(hparams.get("data_dir", "data"))
    if data_dir is not None:
        candidates = [Path(data_dir)]
    elif recorded.is_absolute():
        candidates = [recorded]
    else:
        project = next((p for p in checkpoint.resolve().parents if (p / "dvc.yaml").is_file()), None)
        candidates = [Path.cwd() / recorded] + ([project / recorded] if project else [])
    found = next((c for c in candidates if (c / name).is_dir()), None)
    if found is None:
        tried = ", ".join(str(c / name) for c in candidates)
        raise CnnlabError(f"test data of dataset '{name}' not found (tried {tried}): pass --data-dir <folder "
                          f"holding {name}/>, or run from the project that trained the model")
    try:
        return ImageDataModule(**{**hparams, "data_dir": str(found.resolve())})  # as found from here
    except (CnnlabError, TypeError) as exc:
        raise CnnlabError(f"{checkpoint}: its recorded data config cannot be used ({exc})") from None


def _log_to_training_run(info: dict, metrics: dict, out: Path) -> str:
    """Log through the client rather than reopening the run: a failure here must not mark the
    training run FAILED."""
    from mlflow.entities import Metric

    client, run_id = store_client(info["tracking_uri"]), info["run_id"]  # a store that is gone is not created anew
    flat = {keys.EVAL_MACRO_F1: metrics["macro_f1"]}
    flat.update({keys.EVAL_PER_CLASS.format(metric=m, name=_metric_name(n)): v[m]
                 for n, v in metrics["per_class"].items() for m in ("precision", "recall", "f1")})
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in flat.items()])
    for path in (keys.EVAL_METRICS, keys.PER_CLASS_CSV):
        client.log_artifact(run_id, str(out / path), "evaluation")
    for path in (keys.MISCLASSIFIED_PNG, keys.CONFUSION_PNG):
        client.log_artifact(run_id, str(out / path), "plots")
    client.set_tag(run_id, keys.EVALUATED, "true")
    return run_id


def _metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits and _-./ and spaces; class names may hold others."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in name)


def _settings(params: str | None) -> dict | None:
    """The `evaluate` section: of --params, else of the project's params.yaml, else of conf/
    (outside a project, where there is no params.yaml)."""
    path = Path(params) if params else project_root() / "params.yaml"
    if path.is_file():
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("evaluate")
    if params:
        raise CnnlabError(f"{path} not found: give a composed config (`cnnlab params --output {path}`)")
    from cnnlab.core.config import compose_params

    return yaml.safe_load(compose_params()).get("evaluate")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnlab evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=keys.CHECKPOINT, help="trained model (default: %(default)s)")
    parser.add_argument("--output-dir", default=".", help="where metrics/ and plots/ go (default: .)")
    parser.add_argument("--params", default=None,
                        help="the `evaluate` settings' config (default: the project's params.yaml, else conf/)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the dataset's folder (default: as recorded in the checkpoint)")
    args = parser.parse_args(argv)
    settings = parse(Evaluate, _settings(args.params), "evaluate")
    metrics = evaluate(args.checkpoint, settings, args.output_dir, data_dir=args.data_dir)
    print(f"macro F1 {metrics['macro_f1']:.4f}; {metrics['misclassified']} of {metrics['test_size']} "
          f"test images misclassified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
