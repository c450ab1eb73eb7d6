"""The CNN, built from config, and the LightningModule that trains it.

Default (conf/model/cnn.yaml) is the design notes' network: Conv(32,3x3)+ReLU -> MaxPool 2x2 ->
Conv(64,3x3)+ReLU -> MaxPool 2x2 -> Flatten -> Dense(128)+ReLU -> head.
"""

from __future__ import annotations

import statistics
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from cnnlab import CnnlabError
from cnnlab.data import random_shift_rotate

ACTIVATION_LAYERS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                     "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "silu": nn.SiLU}


def num_outputs(model_cfg: dict, num_classes: int) -> int:
    return 1 if model_cfg["head"] == "sigmoid" else num_classes


def build_network(model_cfg: dict, channels: int, image_size: int, num_classes: int) -> nn.Sequential:
    """Conv blocks -> Flatten -> dense layers -> [dropout] -> output layer (logits).

    `model.width` scales every conv's filters and every dense layer's units (what a width search
    turns); `model.dropout` is applied right before the output layer. Raises CnnlabError when a
    block would shrink the feature map to nothing.
    """
    width = model_cfg.get("width", 1.0)
    layers: list[nn.Module] = []
    size, in_ch = image_size, channels
    for i, block in enumerate(model_cfg["conv_blocks"]):
        k, stride, pad = block["kernel_size"], block.get("stride", 1), block.get("padding", "valid")
        padding = {"valid": 0, "same": "same"}.get(pad, pad)
        filters = max(1, round(block["filters"] * width))
        layers.append(nn.Conv2d(in_ch, filters, k, stride=stride, padding=padding))
        size = size if pad == "same" else (size + 2 * padding - k) // stride + 1
        if block.get("batch_norm"):
            layers.append(nn.BatchNorm2d(filters))
        layers.append(ACTIVATION_LAYERS[block.get("activation", "relu")]())
        if block.get("pool"):
            layers.append(nn.MaxPool2d(block["pool"]))
            size //= block["pool"]
        if block.get("dropout"):
            layers.append(nn.Dropout2d(block["dropout"]))
        if size < 1:
            raise CnnlabError(f"config model.conv_blocks[{i}]: the {image_size}x{image_size} input shrinks to nothing "
                              "here; use fewer blocks, padding 'same', a smaller pool or stride")
        in_ch = filters
    layers.append(nn.Flatten())
    features = in_ch * size * size
    for layer in model_cfg.get("dense") or []:
        units = max(1, round(layer["units"] * width))
        layers.append(nn.Linear(features, units))
        if layer.get("batch_norm"):
            layers.append(nn.BatchNorm1d(units))
        layers.append(ACTIVATION_LAYERS[layer.get("activation", "relu")]())
        if layer.get("dropout"):
            layers.append(nn.Dropout(layer["dropout"]))
        features = units
    if model_cfg.get("dropout"):
        layers.append(nn.Dropout(model_cfg["dropout"]))
    layers.append(nn.Linear(features, num_outputs(model_cfg, num_classes)))
    return nn.Sequential(*layers)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def count_macs(net: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates per image of every Conv2d and Linear layer, measured with forward hooks.

    Written by hand because the counters on PyPI (thop, fvcore, ptflops) are unmaintained or heavy,
    and two layer types need three lines each.
    """
    macs: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            else:
                per_output = module.in_features
            macs[name] = output[0].numel() * per_output
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *input_shape, device=next(net.parameters()).device))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    macs["total"] = sum(macs.values())
    return macs


def probabilities(logits: torch.Tensor, head: str) -> torch.Tensor:
    """Softmax over K logits, or the sigmoid of one: the head's inference activation."""
    return torch.sigmoid(logits) if head == "sigmoid" else torch.softmax(logits, dim=1)


class ProbabilityModel(nn.Module):
    """The network plus its inference activation: softmax over K classes, or sigmoid of one logit.

    This is what gets logged as the MLflow model, so a loaded model returns probabilities.
    """

    def __init__(self, net: nn.Module, head: str):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return probabilities(self.net(x), self.head)


class CNNClassifier(pl.LightningModule):
    """Trains the configured network; the full resolved config is its hyperparameters.

    Storing the whole config in the checkpoint lets the evaluate stage rebuild exactly the model
    and data that were trained, never recomposed defaults.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg}, logger=False)
        self.cfg = cfg
        data, model = cfg["data"], cfg["model"]
        self.head = model["head"]
        self.num_classes = 2 if self.head == "sigmoid" else data["num_classes"]
        self.net = build_network(model, data["channels"], data["image_size"], data["num_classes"])
        self.register_buffer("positive", torch.zeros(data["num_classes"], dtype=torch.bool), persistent=False)
        if self.head == "sigmoid":
            self.positive[list(model["positive_classes"])] = True
        self.example_input_array = torch.zeros(1, data["channels"], data["image_size"], data["image_size"])
        self.metrics = nn.ModuleDict({
            f"{stage}_acc": MulticlassAccuracy(self.num_classes, average="micro") for stage in ("train", "val", "test")
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Class targets of the task: the labels, or 1/0 for positive/negative with a sigmoid head."""
        return self.positive[labels].long() if self.head == "sigmoid" else labels

    def loss_and_predictions(self, logits: torch.Tensor, targets: torch.Tensor):
        if self.head == "sigmoid":
            logit = logits.squeeze(1).float()
            return F.binary_cross_entropy_with_logits(logit, targets.float()), (logit > 0).long()
        return F.cross_entropy(logits.float(), targets), logits.argmax(dim=1)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if isinstance(batch, torch.Tensor):  # example_input_array, for the model summary
            return batch
        x, y = batch
        if self.cfg["runtime"].get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        aug = self.cfg["data"].get("augment") or {}
        if self.trainer is not None and self.trainer.training and aug.get("enabled"):
            x = random_shift_rotate(x, aug["max_shift"], aug["max_rotation"])
        return x, y

    def _step(self, batch, stage: str):
        x, labels = batch
        targets = self.targets(labels)
        loss, preds = self.loss_and_predictions(self(x), targets)
        metric = self.metrics[f"{stage}_acc"]
        metric(preds, targets)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        opt_cfg = dict(self.cfg["optimizer"])
        opt_cfg["_partial_"] = True
        return instantiate(opt_cfg)(self.parameters())

    def probability_model(self) -> ProbabilityModel:
        return ProbabilityModel(self.net, self.head)


def measure_latency(net: nn.Module, input_shape: tuple[int, ...], batch_size: int, repeats: int = 20) -> float:
    """Median milliseconds per image of a forward pass at `batch_size`, on the network's device."""
    device = next(net.parameters()).device
    x = torch.randn(batch_size, *input_shape, device=device)
    was_training = net.training
    net.eval()
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):  # two warm-up passes
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            net(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    net.train(was_training)
    return 1000.0 * statistics.median(times) / batch_size
