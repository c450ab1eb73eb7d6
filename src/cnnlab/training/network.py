"""The CNN, built from its spec (conf/model/), as a plain nn.Sequential that outputs logits.

Default (conf/model/cnn.yaml) is the design notes' network: Conv(32,3x3)+ReLU -> MaxPool 2x2 ->
Conv(64,3x3)+ReLU -> MaxPool 2x2 -> Flatten -> Dense(128)+ReLU -> output layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cnnlab.core.config import at_least, fraction, key_of, non_empty, one_of, positive
from cnnlab.core.errors import CnnlabError

# One table per concept: the activations a block may name, and the weight initialisations.
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
               "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "silu": nn.SiLU}


def _keras_glorot(module: nn.Module) -> None:
    """Keras' defaults for Conv2D and Dense, as in the design notes' example: Glorot-uniform
    kernels (fan in/out include the receptive field, as in Keras) and zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


INITS = {
    "torch": None,           # PyTorch's default (Kaiming-uniform with a=sqrt(5)), applied by each layer
    "glorot": _keras_glorot,
}


# --- the spec (conf/model/): types and ranges, declared once, checked before any work ----------------

@dataclass
class ConvBlock:
    """Conv2d -> [BatchNorm] -> activation -> [MaxPool] -> [Dropout2d]."""
    filters: int = at_least(1)
    kernel_size: int = at_least(1, default=3)
    stride: int = at_least(1, default=1)
    padding: int | str = "valid"   # 'valid' (none), 'same' (keeps the size; stride 1) or pixels >= 0
    pool: int | None = at_least(1, default=None)
    activation: str = one_of(tuple(ACTIVATIONS), default="relu")
    batch_norm: bool = False
    dropout: float = fraction(default=0.0)

    def problems(self):
        if not (self.padding in ("valid", "same") or (isinstance(self.padding, int) and self.padding >= 0)):
            yield "padding", f"expected 'valid', 'same' or an integer >= 0, got {self.padding!r}"
        if self.padding == "same" and self.stride != 1:
            yield "padding", "'same' padding needs stride 1 (use an integer padding with strides)"


@dataclass
class DenseLayer:
    """Linear -> [BatchNorm1d] -> activation -> [Dropout]."""
    units: int = at_least(1)
    activation: str = one_of(tuple(ACTIVATIONS), default="relu")
    batch_norm: bool = False
    dropout: float = fraction(default=0.0)


@dataclass
class ModelSpec:
    """conf/model/: the network and its head. Blocks list only what differs from their defaults."""
    name: str
    head: str = key_of("cnnlab.training.heads", "HEADS")  # heads.py builds from this spec: looked up, not imported
    positive_classes: list[int]        # sigmoid head: labels counted as the positive class
    init: str = one_of(tuple(INITS))
    conv_blocks: list[ConvBlock] = non_empty()
    dense: list[DenseLayer]
    width: float = positive()          # scales every conv's filters and dense layer's units
    dropout: float = fraction()        # right before the output layer


def _padding(block: ConvBlock) -> int | str:
    """The block's padding as nn.Conv2d takes it: pixels, or 'same'."""
    return {"valid": 0, "same": "same"}.get(block.padding, block.padding)


def _conv_size(size: int, block: ConvBlock) -> int:
    """The side of a block's convolution output, as nn.Conv2d computes it: floor((size + 2*padding
    - kernel) / stride) + 1 ('same': size). Below 1 when the kernel does not fit."""
    padding = _padding(block)
    return size if padding == "same" else (size + 2 * padding - block.kernel_size) // block.stride + 1


def conv_output_size(size: int, block: ConvBlock) -> int:
    """The side of a block's output for a `size` x `size` input: its convolution's, then floor(/ pool)
    as nn.MaxPool2d computes it. Below 1 when the kernel (or the pool) does not fit."""
    size = _conv_size(size, block)
    if block.pool and size >= 1:
        size //= block.pool
    return size


def fit_problem(spec: ModelSpec, image_size: int) -> tuple[str, str] | None:
    """(key, problem) naming the first conv block that shrinks an `image_size` input to nothing,
    with what reaches it; None when every block fits. Checked when the config is loaded
    (cnnlab.training.config), and again by build_network."""
    size = image_size
    for i, block in enumerate(spec.conv_blocks):
        out = conv_output_size(size, block)
        if out < 1:
            conv = _conv_size(size, block)
            what = (f"its {block.kernel_size}x{block.kernel_size} kernel does not fit the {size}x{size} feature map "
                    f"it gets" if conv < 1 else
                    f"its {block.pool}x{block.pool} pool does not fit the {conv}x{conv} map its conv makes")
            return (f"model.conv_blocks[{i}]",
                    f"the {image_size}x{image_size} input shrinks to nothing here ({what}; data.image_size="
                    f"{image_size}); use fewer blocks, padding 'same', a smaller kernel, pool or stride, or "
                    f"larger images")
        size = out
    return None


def feature_size(spec: ModelSpec, image_size: int) -> int:
    """The side of the last conv block's output for an `image_size` input (the dense layers see
    channels x side x side features); raises the one-line CnnlabError of fit_problem."""
    problem = fit_problem(spec, image_size)
    if problem:
        raise CnnlabError(f"config {problem[0]}: {problem[1]}")
    size = image_size
    for block in spec.conv_blocks:
        size = conv_output_size(size, block)
    return size


def build_network(spec: ModelSpec, in_channels: int, image_size: int, num_outputs: int) -> nn.Sequential:
    """Conv blocks -> Flatten -> dense layers -> [dropout] -> output layer (logits).

    `spec.width` scales every conv's filters and every dense layer's units (what a width search
    turns); `spec.dropout` is applied right before the output layer. Raises CnnlabError when a
    block would shrink the feature map to nothing.
    """
    size = feature_size(spec, image_size)  # checks every block fits before building any
    layers: list[nn.Module] = []
    channels = in_channels
    for block in spec.conv_blocks:
        filters = max(1, round(block.filters * spec.width))
        layers.append(nn.Conv2d(channels, filters, block.kernel_size, stride=block.stride, padding=_padding(block)))
        if block.batch_norm:
            layers.append(nn.BatchNorm2d(filters))
        layers.append(ACTIVATIONS[block.activation]())
        if block.pool:
            layers.append(nn.MaxPool2d(block.pool))
        if block.dropout:
            layers.append(nn.Dropout2d(block.dropout))
        channels = filters
    layers.append(nn.Flatten())
    features = channels * size * size
    for layer in spec.dense:
        units = max(1, round(layer.units * spec.width))
        layers.append(nn.Linear(features, units))
        if layer.batch_norm:
            layers.append(nn.BatchNorm1d(units))
        layers.append(ACTIVATIONS[layer.activation]())
        if layer.dropout:
            layers.append(nn.Dropout(layer.dropout))
        features = units
    if spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    layers.append(nn.Linear(features, num_outputs))
    net = nn.Sequential(*layers)
    if INITS[spec.init] is not None:
        net.apply(INITS[spec.init])
    return net
