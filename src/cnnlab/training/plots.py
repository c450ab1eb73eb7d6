"""Figures of one run: learning curves, misclassified test images, the confusion matrix.

Bare matplotlib Figures (no pyplot): they render PNGs with Agg, need no GUI backend and keep no
global figure state in a long-running process.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:  # tensors are passed in; the module itself needs no torch (`cnnlab compare` draws without it)
    import torch


def png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def learning_curves(rows: list[dict], title: str) -> Figure:
    """Loss and accuracy per epoch, train against validation (rows as written to curves.csv)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
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
    return fig


def misclassified(images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, probs: torch.Tensor,
                  names: list[str], count: int) -> Figure:
    """A grid of the first `count` misclassified images with true and predicted class. `images`
    are pixel values in [0, 1] shaped (N, C, H, W): drawn in colour with 3 channels, in gray with 1."""
    wrong = (preds != targets).nonzero().flatten()[:count]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig = Figure(figsize=(cols * 1.8, rows * 2.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        draw(ax, images[i])
        confidence = probs[i].max() if probs.shape[1] > 1 else max(probs[i, 0], 1 - probs[i, 0])
        ax.set_title(f"true {names[targets[i]]}\npred {names[preds[i]]} ({confidence:.0%})", fontsize=7)
    fig.suptitle(f"{len(wrong)} misclassified test images (of {int((preds != targets).sum())})")
    return fig


def draw(ax, image: torch.Tensor) -> None:
    """One image, (C, H, W) pixel values in [0, 1]: RGB with 3 channels, gray with 1 (values
    slightly outside [0, 1], from undoing the normalisation in float, are clipped)."""
    pixels = image.detach().float().cpu().clamp(0, 1)
    if pixels.shape[0] == 3:
        ax.imshow(pixels.permute(1, 2, 0).numpy())
    else:
        ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1)


def confusion_matrix(confusion: torch.Tensor, names: list[str]) -> Figure:
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="actual",
           title="confusion matrix (test set)")
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    k = len(names)
    for r in range(k):
        for c in range(k):
            v = int(confusion[r, c])
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > confusion.max() / 2 else "black")
    return fig
