"""Evaluate stage: test metrics, per-class precision/recall/F1, confusion matrix, misclassified examples.

Rebuilds the model and data from the config stored in the checkpoint (what was trained, never
recomposed defaults) and logs everything into the MLflow run that trained it. Outputs:
  metrics/eval.json          test loss/accuracy and per-class precision, recall, F1 (DVC metrics)
  metrics/predictions.csv    actual,predicted per test image (DVC confusion plot)
  metrics/per_class.csv      class,precision,recall,f1 (DVC bar plot)
  plots/misclassified.png    a grid of misclassified test images
  plots/confusion_matrix.png the confusion matrix as an image (for MLflow)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path

import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from cnnlab import CnnlabError, command, csv_text, tracking, write_atomic
from cnnlab.config import validate_evaluate
from cnnlab.data import MNISTDataModule, batches
from cnnlab.model import CNNClassifier, probabilities

log = logging.getLogger(__name__)


def class_names(cfg: dict) -> list[str]:
    if cfg["model"]["head"] == "sigmoid":
        return ["negative", "positive"]
    return [str(n) for n in cfg["data"]["class_names"]]


@torch.inference_mode()
def predict(module: CNNClassifier, datamodule: MNISTDataModule, batch_size: int):
    """Targets, predicted classes, probabilities and mean loss over the test set."""
    module.eval()
    targets, preds, probs, loss_sum = [], [], [], 0.0
    for x, labels in batches(datamodule.test, batch_size, shuffle=False):
        t = module.targets(labels)
        logits = module(x)
        loss, p = module.loss_and_predictions(logits, t)
        loss_sum += float(loss) * len(x)
        targets.append(t)
        preds.append(p)
        probs.append(probabilities(logits, module.head))
    n = len(datamodule.test)
    return torch.cat(targets), torch.cat(preds), torch.cat(probs), loss_sum / n


def _figures(images, targets, preds, probs, confusion, names, count):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = torch.nonzero(preds != targets).flatten()[:count]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig_wrong, axes = plt.subplots(rows, cols, figsize=(cols * 1.8, rows * 2.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        ax.imshow(images[i, 0].numpy(), cmap="gray")
        confidence = probs[i].max() if probs.shape[1] > 1 else max(probs[i, 0], 1 - probs[i, 0])
        ax.set_title(f"true {names[targets[i]]}\npred {names[preds[i]]} ({confidence:.0%})", fontsize=7)
    fig_wrong.suptitle(f"{len(wrong)} misclassified test images (of {int((preds != targets).sum())})")
    fig_wrong.tight_layout()

    fig_cm, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="actual",
           title="confusion matrix (test set)")
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    for (r, c), v in zip(torch.cartesian_prod(torch.arange(len(names)), torch.arange(len(names))).tolist(),
                         confusion.flatten().tolist()):
        ax.text(c, r, str(v), ha="center", va="center", fontsize=7, color="white" if v > confusion.max() / 2 else "black")
    fig_cm.tight_layout()
    return fig_wrong, fig_cm


def evaluate(checkpoint: str | Path, output_dir: str | Path = ".", run_pointer: str | Path | None = None,
             settings: dict | None = None) -> dict:
    """Evaluate a checkpoint on its test set; write DVC metrics/plots; log into its MLflow run.

    Model and data come from the config stored in the checkpoint; `settings` (the `evaluate`
    config section: batch size, how many misclassified images to draw) defaults to that too.
    """
    checkpoint, out = Path(checkpoint), Path(output_dir)
    if not checkpoint.is_file():
        raise CnnlabError(f"{checkpoint} not found: train a model first (`dvc repro train` or `python -m cnnlab.train`)")
    module = CNNClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    cfg = module.hparams["cfg"]
    datamodule = MNISTDataModule(cfg["data"], cfg["paths"]["data_dir"], seed=cfg["seed"])
    datamodule.setup("test")
    settings = {**cfg["evaluate"], **(settings or {})}
    validate_evaluate(settings)
    targets, preds, probs, loss = predict(module, datamodule, settings["batch_size"])
    names = class_names(cfg)
    k = len(names)
    precision = MulticlassPrecision(k, average=None, zero_division=0)(preds, targets)
    recall = MulticlassRecall(k, average=None, zero_division=0)(preds, targets)
    f1 = MulticlassF1Score(k, average=None, zero_division=0)(preds, targets)
    confusion = MulticlassConfusionMatrix(k)(preds, targets)
    accuracy = float((preds == targets).float().mean())
    per_class = {name: {"precision": round(float(p), 6), "recall": round(float(r), 6), "f1": round(float(f), 6)}
                 for name, p, r, f in zip(names, precision, recall, f1)}
    metrics = {"test": {"loss": round(loss, 6), "acc": round(accuracy, 6), "macro_f1": round(float(f1.mean()), 6)},
               "per_class": per_class}

    write_atomic(out / "metrics" / "eval.json", json.dumps(metrics, indent=2) + "\n")
    write_atomic(out / "metrics" / "predictions.csv", csv_text(
        ["actual", "predicted"],
        ({"actual": names[t], "predicted": names[p]} for t, p in zip(targets.tolist(), preds.tolist()))))
    write_atomic(out / "metrics" / "per_class.csv", csv_text(
        ["class", "precision", "recall", "f1"], ({"class": n, **v} for n, v in per_class.items())))

    images = datamodule.test.images * cfg["data"]["normalize"]["std"] + cfg["data"]["normalize"]["mean"]
    fig_wrong, fig_cm = _figures(images, targets, preds, probs, confusion, names, settings["num_misclassified"])
    for fig, name in ((fig_wrong, "misclassified.png"), (fig_cm, "confusion_matrix.png")):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        write_atomic(out / "plots" / name, buf.getvalue())

    pointer = Path(run_pointer) if run_pointer else checkpoint.parent / "mlflow_run.json"
    if pointer.is_file():
        info = json.loads(pointer.read_text())
        # Log through the client rather than reopening the run: a failure here must not mark the
        # training run FAILED.
        client, run_id = MlflowClient(info["tracking_uri"]), info["run_id"]
        flat = {"test/loss": loss, "test/acc": accuracy, "test/macro_f1": float(f1.mean())}
        flat.update({f"test/{m}/{n}": v[m] for n, v in per_class.items() for m in ("precision", "recall", "f1")})
        stamp = int(time.time() * 1000)
        tracking._retry(client.log_batch, run_id, metrics=[Metric(_metric_key(k), float(v), stamp, 0) for k, v in flat.items()])
        for path in (out / "metrics" / "eval.json", out / "metrics" / "per_class.csv"):
            tracking._retry(client.log_artifact, run_id, str(path), "evaluation")
        for name in ("misclassified.png", "confusion_matrix.png"):
            tracking._retry(client.log_artifact, run_id, str(out / "plots" / name), "plots")
        tracking._retry(client.set_tag, run_id, "cnnlab.evaluated", "true")
        metrics["mlflow_run_id"] = info["run_id"]
    else:
        log.warning("%s not found: metrics written, nothing logged to MLflow", pointer)
    return metrics


def _metric_key(key: str) -> str:
    """MLflow metric names allow letters, digits and _-./ and spaces; class names may hold others."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in key)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnlab evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/model.ckpt", help="trained model (default: models/model.ckpt)")
    parser.add_argument("--output-dir", default=".", help="where metrics/ and plots/ go (default: .)")
    parser.add_argument("--params", default=None,
                        help="take the `evaluate` settings from this file (the DVC stage passes params.yaml)")
    args = parser.parse_args(argv)
    settings = None
    if args.params:
        if not Path(args.params).is_file():
            raise CnnlabError(f"{args.params} not found")
        settings = OmegaConf.to_container(OmegaConf.load(args.params), resolve=True).get("evaluate")
    metrics = evaluate(args.checkpoint, args.output_dir, settings=settings)
    print(f"test accuracy {metrics['test']['acc']:.4f}, loss {metrics['test']['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
