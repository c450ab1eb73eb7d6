"""The model is the design notes' CNN, and its layers compute the notes' formulas.

The NumPy references below are written from the formulas in shared/design-notes
(cnn-operations-and-keras-example.md, cnns-101.md), not from PyTorch's documentation, so these
tests pin what the notes say rather than what the library happens to do.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from cnnlab.core.config import instantiate, parse
from cnnlab.core.errors import CnnlabError
from cnnlab.training.config import load
from cnnlab.training.costs import count_macs, count_parameters
from cnnlab.training.heads import HEADS, FromPixels, SigmoidHead, SoftmaxHead, WithProbabilities, build_head
from cnnlab.training.module import Classifier
from cnnlab.training.network import INITS, ModelSpec, build_network

from conftest import compose_cfg

DOCUMENTED_PARAMS = 225_034  # Keras summary of the documented network with a 10-class Dense head
MNIST_SHAPE = (1, 28, 28)


# --- NumPy references, one per formula in the design notes ---------------------------------------

def doc_conv_full(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Full discrete 2-D convolution, literally S(i,j) = (I*K)(i,j) = sum_m sum_n I(m,n) K(i-m, j-n).

    Every (i, j) where some term is non-zero is computed; the (m, n) loops only skip the terms
    where K(i-m, j-n) falls outside the kernel (those are zero).
    """
    (h, w), (kh, kw) = image.shape, kernel.shape
    out = np.zeros((h + kh - 1, w + kw - 1))
    for i in range(h + kh - 1):
        for j in range(w + kw - 1):
            total = 0.0
            for m in range(max(0, i - kh + 1), min(h, i + 1)):
                for n in range(max(0, j - kw + 1), min(w, j + 1)):
                    total += image[m, n] * kernel[i - m, j - n]
            out[i, j] = total
    return out


def doc_conv_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The 'valid' part of doc_conv_full: the positions where the kernel lies wholly on the image
    (no padding, as in the notes' Keras Conv2D); (H-kh+1) x (W-kw+1)."""
    (h, w), (kh, kw) = image.shape, kernel.shape
    return doc_conv_full(image, kernel)[kh - 1:h, kw - 1:w]


def doc_conv_valid_fast(x: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Vectorised doc_conv_valid summed over input channels, for the whole-network reference.

    x: (C, H, W), kernels K: (O, C, kh, kw). Output row i is S at full row i+kh-1, so
    out[o,i,j] = sum_c sum_{p,q} K[o,c,p,q] * x[c, i+kh-1-p, j+kw-1-q]   (p = i-m, q = j-n).
    Checked against the literal loops in test_fast_reference_equals_the_literal_formula.
    """
    _, h, w = x.shape
    _, _, kh, kw = kernels.shape
    ho, wo = h - kh + 1, w - kw + 1
    out = np.zeros((kernels.shape[0], ho, wo))
    for p in range(kh):
        for q in range(kw):
            window = x[:, kh - 1 - p:kh - 1 - p + ho, kw - 1 - q:kw - 1 - q + wo]
            out += np.einsum("oc,chw->ohw", kernels[:, :, p, q], window)
    return out


def flip(kernel: np.ndarray) -> np.ndarray:
    """K(p, q) -> K(kh-1-p, kw-1-q) over the last two axes: turns a true convolution kernel into
    the cross-correlation weights PyTorch (and Keras) store, and back."""
    return kernel[..., ::-1, ::-1]


def doc_conv_layer(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int = 1, padding: int = 0,
                   fast: bool = False) -> np.ndarray:
    """A conv layer as the notes describe it: zero padding, then for every output channel o
    sum_c (x_c * K_oc) + b_o with the documented convolution and K = flip(W), then keep every
    `stride`-th position (the kernel's starting point moves `stride` pixels).

    x: (C, H, W); weight W: (O, C, kh, kw) as stored by nn.Conv2d; bias: (O,).
    """
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding)))
    kernels = flip(weight)
    if fast:
        out = doc_conv_valid_fast(x, kernels)
    else:
        out = np.stack([sum(doc_conv_valid(x[c], kernels[o, c]) for c in range(x.shape[0]))
                        for o in range(weight.shape[0])])
    out = out + bias[:, None, None]
    return out[:, ::stride, ::stride]


def doc_maxpool(s: np.ndarray, size: int = 2) -> np.ndarray:
    """M(i,j) = max_{(m,n) in R_ij} S(m,n), R_ij the non-overlapping size x size region at
    (size*i, size*j). Rows/columns that do not fill a whole region are dropped (floor), as in the
    notes' Keras MaxPooling2D. s: (C, H, W)."""
    c, h, w = s.shape
    ho, wo = h // size, w // size
    return s[:, :ho * size, :wo * size].reshape(c, ho, size, wo, size).max(axis=(2, 4))


def doc_relu(x: np.ndarray) -> np.ndarray:
    """f(x) = max(0, x)."""
    return np.maximum(0.0, x)


def doc_softmax(z: np.ndarray) -> np.ndarray:
    """P(y=j|x) = exp(z_j) / sum_k exp(z_k), over the last axis (float64; z is small here)."""
    e = np.exp(z.astype(np.float64))
    return e / e.sum(axis=-1, keepdims=True)


def doc_forward(net: nn.Sequential, image: np.ndarray) -> np.ndarray:
    """The documented network composed from the references above and `net`'s weights:
    conv+ReLU -> pool -> conv+ReLU -> pool -> flatten -> dense+ReLU -> dense (logits).
    Flatten follows PyTorch's (C, H, W) order, which is what nn.Linear's weights expect."""
    w = {i: {k: v.detach().double().numpy() for k, v in net[i].state_dict().items()} for i in (0, 3, 7, 9)}
    a = doc_maxpool(doc_relu(doc_conv_layer(image, w[0]["weight"], w[0]["bias"], fast=True)))
    a = doc_maxpool(doc_relu(doc_conv_layer(a, w[3]["weight"], w[3]["bias"], fast=True)))
    a = a.reshape(-1)
    a = doc_relu(w[7]["weight"] @ a + w[7]["bias"])
    return w[9]["weight"] @ a + w[9]["bias"]


def doc_sigmoid(z: np.ndarray) -> np.ndarray:
    """sigma(z) = 1 / (1 + exp(-z)): the single output unit of the notes' Keras example."""
    return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))


def doc_cross_entropy(z: np.ndarray, labels: np.ndarray) -> float:
    """-1/N sum_i log P(y=y_i|x_i), with P the softmax of the logits z: (N, K)."""
    return float(-np.mean(np.log(doc_softmax(z)[np.arange(len(labels)), labels])))


def doc_binary_cross_entropy(p: np.ndarray, y: np.ndarray) -> float:
    """-1/N sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)], p the sigmoid output, y in {0, 1}."""
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def keras_fans(weight: torch.Tensor) -> tuple[int, int]:
    """Keras' fan_in and fan_out: input and output channels (units) times the receptive field
    (kh*kw for a conv kernel, 1 for a dense layer). Weights are PyTorch's (out, in, kh, kw)."""
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


# --- helpers ---------------------------------------------------------------------------------------

def build(*overrides: str, seed: int = 0):
    """The typed config, network and head that a run of conf/ with `overrides` trains, built as train() does."""
    config = load(compose_cfg(*overrides))
    head = build_head(config.model, config.data.num_classes)
    torch.manual_seed(seed)
    net = build_network(config.model, config.data.channels, config.data.image_size, head.num_outputs)
    return config, net, head


def default_net(seed: int = 0, *overrides: str) -> nn.Sequential:
    return build(*overrides, seed=seed)[1]


def classifier(*overrides: str) -> Classifier:
    config, net, head = build(*overrides)
    return Classifier(net, head, optimizer=instantiate("optimizer", config.optimizer))


def block_net(block: dict, image_size: int = 28, channels: int = 1) -> nn.Sequential:
    """A one-conv-block network (no dense layers) built from a model spec, to probe a single conv layer."""
    spec = parse(ModelSpec, {"name": "probe", "head": "softmax", "positive_classes": [], "init": "torch",
                             "conv_blocks": [block], "dense": [], "width": 1.0, "dropout": 0.0}, "model")
    torch.manual_seed(0)
    return build_network(spec, channels, image_size, 10)


def weighted_layers(net: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def run_layer(layer: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return layer(torch.from_numpy(x).float()[None])[0].double().numpy()


# --- 1-3: the documented architecture, its size and its cost ------------------------------------------

def test_default_config_builds_the_documented_cnn():
    net = default_net()
    expected = [
        (nn.Conv2d, dict(in_channels=1, out_channels=32, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0))),
        (nn.ReLU, {}),
        (nn.MaxPool2d, dict(kernel_size=2, stride=2)),
        (nn.Conv2d, dict(in_channels=32, out_channels=64, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0))),
        (nn.ReLU, {}),
        (nn.MaxPool2d, dict(kernel_size=2, stride=2)),
        (nn.Flatten, {}),
        (nn.Linear, dict(in_features=1600, out_features=128)),
        (nn.ReLU, {}),
        (nn.Linear, dict(in_features=128, out_features=10)),
    ]
    assert [type(layer) for layer in net] == [kind for kind, _ in expected]
    for layer, (_, attrs) in zip(net, expected):
        assert {k: getattr(layer, k) for k in attrs} == attrs, layer
    assert count_parameters(net) == DOCUMENTED_PARAMS
    assert net(torch.zeros(5, *MNIST_SHAPE)).shape == (5, 10)


def test_classifier_wraps_the_same_network():
    model = classifier()
    assert count_parameters(model.net) == DOCUMENTED_PARAMS
    assert count_parameters(model) == DOCUMENTED_PARAMS  # the head and the metrics add no parameters
    assert model(torch.randn(3, *MNIST_SHAPE)).shape == (3, 10)


def test_sigmoid_head_has_one_logit_and_probabilities_in_0_1():
    _, net, head = build("model=cnn_sigmoid")
    assert isinstance(head, SigmoidHead) and head.num_outputs == 1 and head.num_classes == 2
    assert isinstance(net[-1], nn.Linear) and net[-1].out_features == 1
    assert count_parameters(net) == DOCUMENTED_PARAMS - 9 * 129 == 223_873
    model = classifier("model=cnn_sigmoid")
    torch.manual_seed(1)
    with torch.no_grad():
        p = model.probability_model().eval()(torch.randn(8, *MNIST_SHAPE))
    assert p.shape == (8, 1)
    assert ((p > 0) & (p < 1)).all()


def test_softmax_head_probabilities_sum_to_one():
    model = classifier()
    probabilities = model.probability_model()
    assert isinstance(probabilities, WithProbabilities) and probabilities.net is model.net
    torch.manual_seed(1)
    with torch.no_grad():
        p = probabilities.eval()(torch.randn(8, *MNIST_SHAPE))
    assert p.shape == (8, 10) and (p >= 0).all()
    torch.testing.assert_close(p.sum(dim=1), torch.ones(8))


def test_macs_per_image_of_the_documented_cnn():
    macs = count_macs(default_net(), MNIST_SHAPE)
    # keys are the nn.Sequential indices of the Conv2d/Linear layers
    assert macs == {
        "0": 26 * 26 * 32 * (1 * 3 * 3),     # conv1: 194,688
        "3": 11 * 11 * 64 * (32 * 3 * 3),    # conv2: 2,230,272
        "7": 128 * 1600,                     # dense: 204,800
        "9": 10 * 128,                       # output: 1,280
        "total": 2_631_040,
    }
    assert (macs["0"], macs["3"], macs["7"], macs["9"]) == (194_688, 2_230_272, 204_800, 1_280)


# --- 4: fidelity to the documented formulas ----------------------------------------------------------

def test_fast_reference_equals_the_literal_formula():
    x, k = rand(0, 3, 7, 9), rand(1, 4, 3, 2, 3)
    literal = np.stack([sum(doc_conv_valid(x[c], k[o, c]) for c in range(3)) for o in range(4)])
    np.testing.assert_allclose(doc_conv_valid_fast(x, k), literal, atol=1e-12)


def test_doc_conv_full_on_a_hand_example():
    # [1 2] * [1 10 100]: S(0,j) = sum_n I(0,n) K(0,j-n)
    np.testing.assert_array_equal(doc_conv_full(np.array([[1.0, 2.0]]), np.array([[1.0, 10.0, 100.0]])),
                                  [[1.0, 12.0, 120.0, 200.0]])


def test_first_conv_layer_is_the_documented_convolution_with_the_flipped_kernel():
    conv = default_net()[0]
    w, b = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    x = rand(2, 1, 10, 12)  # not square, so a transposed index would show
    expected = doc_conv_layer(x, w, b)
    assert expected.shape == (32, 8, 10)
    np.testing.assert_allclose(run_layer(conv, x), expected, atol=1e-5)


def test_second_conv_layer_sums_the_documented_convolution_over_input_channels():
    conv = default_net()[3]
    w, b = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    x = rand(3, 32, 6, 5)
    np.testing.assert_allclose(run_layer(conv, x), doc_conv_layer(x, w, b), atol=1e-5)


def test_unflipped_kernel_does_not_match_so_convolution_is_told_from_correlation():
    conv = nn.Conv2d(1, 1, 3)
    kernel = np.arange(9.0).reshape(1, 1, 3, 3) - 4.0  # no symmetry: flip(kernel) != kernel
    assert not np.allclose(flip(kernel), kernel)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel))
        conv.bias.zero_()
    x, b = rand(4, 1, 9, 9), np.zeros(1)
    out = run_layer(conv, x)
    np.testing.assert_allclose(out, doc_conv_layer(x, kernel, b), atol=1e-5)
    # the same kernel used as the convolution's K directly (no flip) is a different operation
    unflipped = np.stack([doc_conv_valid(x[0], kernel[0, 0])])
    assert np.abs(out - unflipped).max() > 1.0


def test_same_padding_keeps_the_image_size():
    net = block_net({"filters": 4, "kernel_size": 3, "padding": "same", "pool": None})
    x = rand(5, 1, 28, 28)
    out = run_layer(net[0], x)
    assert out.shape == (4, 28, 28)
    assert net[-1].in_features == 4 * 28 * 28
    w, b = net[0].weight.detach().double().numpy(), net[0].bias.detach().double().numpy()
    np.testing.assert_allclose(out, doc_conv_layer(x, w, b, padding=1), atol=1e-5)


@pytest.mark.parametrize("size, kernel, stride, padding", [(28, 3, 2, 1), (28, 5, 2, 1), (27, 3, 2, 0), (11, 4, 3, 2)])
def test_stride_and_padding_give_the_documented_size_and_values(size, kernel, stride, padding):
    block = {"filters": 3, "kernel_size": kernel, "stride": stride, "padding": padding, "pool": None}
    net = block_net(block, image_size=size, channels=2)
    expected_size = (size + 2 * padding - kernel) // stride + 1
    x = rand(6, 2, size, size)
    out = run_layer(net[0], x)
    assert out.shape == (3, expected_size, expected_size)
    assert net[-1].in_features == 3 * expected_size ** 2  # build_network's own size bookkeeping agrees
    w, b = net[0].weight.detach().double().numpy(), net[0].bias.detach().double().numpy()
    np.testing.assert_allclose(out, doc_conv_layer(x, w, b, stride=stride, padding=padding), atol=1e-5)


@pytest.mark.parametrize("size, pooled", [(12, 6), (11, 5), (26, 13)])
def test_max_pooling_is_the_max_over_each_2x2_region(size, pooled):
    pool = default_net()[2]
    x = rand(7, 3, size, size)
    out = run_layer(pool, x)
    assert out.shape == (3, pooled, pooled)
    np.testing.assert_allclose(out, doc_maxpool(x), atol=1e-6)


def test_relu_is_max_0_x():
    relu = default_net()[1]
    x = rand(8, 2, 5, 5)
    np.testing.assert_allclose(run_layer(relu, x), doc_relu(x), atol=1e-6)


def test_softmax_matches_the_formula_on_random_logits():
    z = rand(9, 6, 10)
    with torch.no_grad():
        p = WithProbabilities(nn.Identity(), SoftmaxHead(10))(torch.from_numpy(z))
    np.testing.assert_allclose(p.numpy(), doc_softmax(z), atol=1e-12)


def test_sigmoid_matches_the_formula_on_random_logits():
    z = 4 * rand(9, 6, 1)
    with torch.no_grad():
        p = WithProbabilities(nn.Identity(), SigmoidHead(10, [1]))(torch.from_numpy(z))
    np.testing.assert_allclose(p.numpy(), doc_sigmoid(z), atol=1e-12)


def test_classifier_probabilities_are_the_softmax_of_the_network_logits():
    model = classifier().eval()
    x = torch.from_numpy(rand(10, 4, *MNIST_SHAPE)).float()
    with torch.no_grad():
        logits, p = model(x), model.probability_model()(x)
    np.testing.assert_allclose(p.double().numpy(), doc_softmax(logits.double().numpy()), atol=1e-6)


def test_whole_network_forward_equals_the_documented_computation():
    net = default_net(3).eval()
    x = rand(11, 2, *MNIST_SHAPE)
    with torch.no_grad():
        logits = net(torch.from_numpy(x).float()).double().numpy()
    expected = np.stack([doc_forward(net, image) for image in x])
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert np.abs(expected).max() > 1e-3  # not a vacuous all-zero comparison


# --- heads: targets, loss and predictions against the formulas -------------------------------------------

def test_the_heads_a_config_may_name():
    assert set(HEADS) == {"softmax", "sigmoid"}
    assert isinstance(build_head(load(compose_cfg()).model, 10), SoftmaxHead)
    head = build_head(load(compose_cfg("model=cnn_sigmoid")).model, 10)
    assert isinstance(head, SigmoidHead)
    assert head.targets(torch.arange(10)).tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]  # conf: [0, 2, 4, 6, 8]


def test_softmax_head_targets_loss_and_predictions():
    head = SoftmaxHead(10)
    assert head.num_outputs == head.num_classes == 10
    z, labels = rand(12, 16, 10), np.random.default_rng(13).integers(0, 10, size=16)
    logits, y = torch.from_numpy(z).float(), torch.from_numpy(labels)
    assert torch.equal(head.targets(y), y)  # the labels are the classes
    assert head.loss(logits, head.targets(y)).item() == pytest.approx(doc_cross_entropy(z, labels), rel=1e-5)
    np.testing.assert_array_equal(head.predictions(logits).numpy(), z.argmax(axis=1))
    np.testing.assert_allclose(head.probabilities(logits).double().numpy(), doc_softmax(z), atol=1e-6)
    assert head.class_names(["zero", 1]) == ["zero", "1"]


@pytest.mark.parametrize("positives, labels, targets", [
    ([0, 2, 4, 6, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]),
    ([3, 7], [3, 7, 7, 0, 9, 3, 1], [1, 1, 1, 0, 0, 1, 0]),
    ([9], [9, 8, 0, 9], [1, 0, 0, 1]),
])
def test_sigmoid_head_maps_the_positive_classes_to_1(positives, labels, targets):
    head = SigmoidHead(10, positives)
    assert (head.num_outputs, head.num_classes) == (1, 2)
    out = head.targets(torch.tensor(labels))
    assert out.dtype == torch.long and out.tolist() == targets


def test_sigmoid_head_loss_is_binary_cross_entropy_and_predicts_at_one_half():
    positives = [0, 2, 4, 6, 8]
    head = SigmoidHead(10, positives)
    z, labels = 3 * rand(14, 32, 1), np.random.default_rng(15).integers(0, 10, size=32)
    logits = torch.from_numpy(z).float()
    targets = head.targets(torch.from_numpy(labels))
    y = np.isin(labels, positives).astype(np.float64)
    np.testing.assert_array_equal(targets.numpy(), y)
    p = doc_sigmoid(z[:, 0])
    assert 0 < y.sum() < len(y) and (p > 0.5).any() and (p < 0.5).any()  # both classes, both predictions
    assert head.loss(logits, targets).item() == pytest.approx(doc_binary_cross_entropy(p, y), rel=1e-5)
    np.testing.assert_array_equal(head.predictions(logits).numpy(), (p > 0.5).astype(np.int64))
    np.testing.assert_allclose(head.probabilities(logits).double().numpy(), doc_sigmoid(z), atol=1e-6)
    assert head.class_names([str(i) for i in range(10)]) == ["negative", "positive"]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here; nothing to log to
def test_classifier_trains_on_the_heads_task():
    """A training step's loss is the head's loss on the head's targets, not on the raw labels."""
    _, net, head = build("model=cnn_sigmoid")
    model = Classifier(net, head, optimizer=None)
    x = torch.from_numpy(rand(16, 6, *MNIST_SHAPE)).float()
    labels = torch.tensor([0, 1, 2, 3, 7, 8])
    with torch.no_grad():
        loss = model.training_step((x, labels), 0)
        p = doc_sigmoid(net(x).double().numpy()[:, 0])
    y = np.isin(labels.numpy(), [0, 2, 4, 6, 8]).astype(np.float64)
    assert loss.item() == pytest.approx(doc_binary_cross_entropy(p, y), rel=1e-5)


# --- FromPixels: the data's normalisation, per channel, as part of the logged model ---------------------------

@pytest.mark.parametrize("mean, std", [(0.1307, 0.3081), ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
                                       ([0.5], [0.25])])
def test_from_pixels_normalises_each_channel_with_buffers(mean, std):
    channels = len(mean) if isinstance(mean, list) else 1
    model = FromPixels(nn.Identity(), mean, std)
    assert set(dict(model.named_buffers())) == {"mean", "std"}  # saved in state dicts, moved with .to()
    assert model.mean.shape == model.std.shape == (1, channels, 1, 1) and model.mean.dtype == torch.float32
    assert set(model.state_dict()) == {"mean", "std"}
    x = torch.rand(2, channels, 5, 5)
    means, stds = (np.resize(np.array(v, dtype=np.float64), channels) for v in (mean, std))
    expected = (x.double().numpy() - means[None, :, None, None]) / stds[None, :, None, None]
    np.testing.assert_allclose(model(x).double().numpy(), expected, atol=1e-5)
    if channels == 1:  # one number for every channel also normalises a 3-channel image
        np.testing.assert_allclose(model(x.expand(2, 3, 5, 5)).numpy(), model(x).expand(2, 3, 5, 5).numpy())
    model.double()
    assert model.mean.dtype == torch.float64  # buffers follow the module


def test_a_from_pixels_pickled_with_float_attributes_still_runs():
    """MLflow models logged before the buffers held mean and std as plain float attributes:
    unpickled, such a model has them in its __dict__, and forward() uses them the same way."""
    new = FromPixels(nn.Identity(), 0.1307, 0.3081)
    state = {**new.__dict__, "_buffers": {}, "mean": 0.1307, "std": 0.3081}
    old = FromPixels.__new__(FromPixels)
    old.__setstate__(state)
    x = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(old(x), new(x))


# --- weight initialisation: PyTorch's default or Keras' Glorot-uniform -------------------------------------

def test_the_initialisations_a_config_may_name():
    assert set(INITS) == {"torch", "glorot"}


@pytest.mark.parametrize("model", ["cnn", "cnn_sigmoid", "cnn_regularized"])
def test_glorot_init_is_keras_glorot_uniform_with_zero_biases(model):
    net = default_net(0, f"model={model}", "model.init=glorot")
    layers = weighted_layers(net)
    assert len(layers) >= 4
    for layer in layers:
        assert torch.count_nonzero(layer.bias) == 0, layer
        fan_in, fan_out = keras_fans(layer.weight)
        limit = math.sqrt(6 / (fan_in + fan_out))
        w = layer.weight.detach().double()
        assert w.abs().max() <= limit, layer
        if w.numel() >= 10_000:  # enough draws to pin the distribution (relative sd of the variance < 1%)
            assert w.var().item() == pytest.approx(2 / (fan_in + fan_out), rel=0.05), layer
            assert abs(w.mean().item()) < 0.05 * limit, layer
            assert w.abs().max() > 0.99 * limit, layer  # fills the whole range, as a uniform does
    for norm in (m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))):
        assert (norm.weight == 1).all() and (norm.bias == 0).all()  # batch norm keeps its identity start


def test_glorot_init_follows_the_seed():
    a, b = default_net(5, "model.init=glorot"), default_net(5, "model.init=glorot")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_torch_init_is_pytorchs_default_with_non_zero_biases():
    net = default_net(0, "model.init=torch")
    for layer in weighted_layers(net):
        assert torch.count_nonzero(layer.bias) == layer.bias.numel(), layer
        fan_in, fan_out = keras_fans(layer.weight)
        w = layer.weight.detach().double()
        assert w.abs().max() <= 1 / math.sqrt(fan_in)  # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), ..)
        if w.numel() >= 10_000:
            assert w.var().item() == pytest.approx(1 / (3 * fan_in), rel=0.05), layer
            assert w.var().item() != pytest.approx(2 / (fan_in + fan_out), rel=0.2), layer  # so not Glorot


# --- 5: config errors name the key to fix -------------------------------------------------------------

def test_network_that_shrinks_the_image_to_nothing_names_the_block():
    spec = load(compose_cfg()).model
    spec = dataclasses.replace(spec, conv_blocks=[spec.conv_blocks[0]] * 5)
    # 28 -conv-> 26 -pool-> 13 -> 11 -> 5 -> 3 -> 1 -> conv of 1x1 with a 3x3 kernel: nothing, in block 3
    with pytest.raises(CnnlabError, match=r"^config model\.conv_blocks\[3\]: the 28x28 input shrinks to nothing "
                                          r"here \(its 3x3 kernel does not fit the 1x1 feature map it gets; "
                                          r"data\.image_size=28\); use ") as error:
        build_network(spec, 1, 28, 10)
    assert "\n" not in str(error.value)
    # the same line when the config is loaded, before any work (tests/test_zoo_shapes.py: every model)
    blocks = [dataclasses.asdict(spec.conv_blocks[0])] * 5
    with pytest.raises(CnnlabError, match=r"^config model\.conv_blocks\[3\]: the 28x28 input shrinks"):
        load({**compose_cfg(), "model": {**dataclasses.asdict(spec), "conv_blocks": blocks}})
