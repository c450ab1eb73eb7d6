"""Output heads: everything that differs between a softmax and a sigmoid classifier, in one place.

A head says how many logits the network ends with, turns dataset labels into the task's targets,
and gives the loss, the predicted classes and the probabilities. `num_labels` is the number of
labels in the dataset; `num_classes` the number of classes of the task the head solves (the
sigmoid head tells two classes apart, however many labels the data has).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from cnnlab.training.network import ModelSpec


class SoftmaxHead(nn.Module):
    """K logits, cross-entropy, argmax: the multi-class case (MNIST's ten digits). It answers the
    binary question of `positive_classes` too (cnnlab.tracking.tasks), with their probabilities summed."""

    def __init__(self, num_labels: int, positive_classes: list[int] = ()):
        super().__init__()
        self.num_outputs = self.num_classes = num_labels
        positive = torch.zeros(num_labels, dtype=torch.bool)
        # model.positive_classes is checked only for the sigmoid head: a list that does not fit
        # these labels (every model config carries the default [0,2,4,6,8]) asks no binary question.
        if all(0 <= p < num_labels for p in positive_classes):
            positive[list(positive_classes)] = True
        self.register_buffer("positive", positive, persistent=False)  # label -> 1/0, on the batch's device

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)

    def class_names(self, label_names: list[str]) -> list[str]:
        return [str(n) for n in label_names]

    def positive_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """P(one of the positive classes): the softmax probabilities of those classes summed."""
        return self.probabilities(logits.float())[:, self.positive].sum(dim=1)


class SigmoidHead(nn.Module):
    """One logit, binary cross-entropy, threshold at 0 (p = 0.5): the design notes' Keras head.
    The task is `positive_classes` against the other labels."""

    def __init__(self, num_labels: int, positive_classes: list[int]):
        super().__init__()
        self.num_outputs, self.num_classes = 1, 2
        positive = torch.zeros(num_labels, dtype=torch.bool)
        positive[list(positive_classes)] = True
        self.register_buffer("positive", positive, persistent=False)  # label -> 1/0, on the batch's device

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return self.positive[labels].long()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.squeeze(1).float(), targets.float())

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.squeeze(1) > 0).long()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def class_names(self, label_names: list[str]) -> list[str]:
        return ["negative", "positive"]

    def positive_probability(self, logits: torch.Tensor) -> torch.Tensor:
        return self.probabilities(logits.float()).squeeze(1)


Head = SoftmaxHead | SigmoidHead

# The heads a model spec may name (model.head), and how each is built from the spec.
HEADS = {
    "softmax": lambda spec, num_labels: SoftmaxHead(num_labels, spec.positive_classes),
    "sigmoid": lambda spec, num_labels: SigmoidHead(num_labels, spec.positive_classes),
}


def build_head(spec: ModelSpec, num_labels: int) -> Head:
    return HEADS[spec.head](spec, num_labels)


class WithProbabilities(nn.Module):
    """The network followed by its head's probabilities: what gets logged as the MLflow model,
    so that a loaded model returns probabilities, and needs no cnnlab code."""

    def __init__(self, net: nn.Module, head: Head):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.probabilities(self.net(x))


class FromPixels(nn.Module):
    """Images as pixel values in [0, 1] in, the probabilities out: the data's normalisation is
    part of the model. This is what gets logged as the MLflow model, so a loaded, registered or
    served model takes images as they are, with no constants to know and no cnnlab code.

    `mean` and `std` are one number for every channel or one per channel (data.normalize, as
    `Normalize.per_channel` gives it); they are buffers shaped (1, C, 1, 1), so they move with the
    model and are saved in its state dict. Models pickled before held them as plain floats under
    the same names, which forward() uses as well."""

    def __init__(self, probabilities: nn.Module, mean: float | list[float], std: float | list[float]):
        super().__init__()
        self.probabilities = probabilities
        self.register_buffer("mean", _per_channel(mean))
        self.register_buffer("std", _per_channel(std))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.probabilities((pixels - self.mean) / self.std)


def _per_channel(value: float | list[float]) -> torch.Tensor:
    """A number or one number per channel, as float32 shaped (1, C, 1, 1) (C = 1 for a number)."""
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
