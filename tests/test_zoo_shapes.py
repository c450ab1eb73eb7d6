"""Every model of the zoo (conf/model/*.yaml) on every input cnnlab trains on: 1 or 3 channels,
28 or 32 pixels. Each builds, runs forward, and has the parameters and multiply-accumulates that
the layer formulas give; a model that cannot fit an input says so in one line when the config is
loaded, before any data is fetched or any MLflow run is opened.

The expected numbers come from hand-written arithmetic per layer (ZOO below transcribes each
conf/model/*.yaml; `expected_costs` applies the formulas), and are pinned again as a literal
table checked against that arithmetic: a change to a network or to conf/model/ fails here.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab.core.config import CONF_DIR, parse
from cnnlab.core.errors import CnnlabError
from cnnlab.training.config import load
from cnnlab.training.costs import count_macs, count_parameters
from cnnlab.training.heads import build_head
from cnnlab.training.network import ModelSpec, build_network, conv_output_size, fit_problem

from conftest import compose_cfg

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
INPUTS = [(1, 28), (1, 32), (3, 28), (3, 32)]


# --- the zoo, transcribed by hand from conf/model/*.yaml ---------------------------------------------
# conv: (filters, kernel, stride, padding, pool, batch_norm); dense: (units, batch_norm); outputs:
# the output layer's units with 10 labels (a sigmoid head has one logit).

def conv(filters, kernel=3, stride=1, padding=0, pool=None, batch_norm=False):
    return filters, kernel, stride, padding, pool, batch_norm


DOCUMENTED = {"convs": [conv(32, pool=2), conv(64, pool=2)], "dense": [(128, False)], "outputs": 10}
ZOO = {
    "cnn": DOCUMENTED,
    "cnn_sigmoid": {**DOCUMENTED, "outputs": 1},
    "cnn_wide": {"convs": [conv(64, pool=2), conv(128, pool=2)], "dense": [(256, False)], "outputs": 10},
    "cnn_same": {"convs": [conv(32, padding="same", pool=2), conv(64, padding="same", pool=2)],
                 "dense": [(128, False)], "outputs": 10},
    "cnn_strided": {"convs": [conv(32, stride=2, padding=1), conv(64, stride=2, padding=1)],
                    "dense": [(128, False)], "outputs": 10},
    "cnn_deep": {"convs": [conv(32, padding="same"), conv(32, padding="same", pool=2),
                           conv(64, padding="same"), conv(64, padding="same", pool=2)],
                 "dense": [(128, False)], "outputs": 10},
    "cnn_regularized": {"convs": [conv(32, padding="same", batch_norm=True),
                                  conv(32, padding="same", pool=2, batch_norm=True),
                                  conv(64, padding="same", batch_norm=True),
                                  conv(64, padding="same", pool=2, batch_norm=True)],
                        "dense": [(128, True)], "outputs": 10},
}


def expected_costs(model: str, channels: int, size: int) -> tuple[int, int]:
    """(parameters, MACs per image) by the formulas: a k x k conv from c_in to c_out channels has
    k*k*c_in*c_out + c_out parameters and k*k*c_in*c_out MACs per output pixel; its output side is
    floor((side + 2*padding - k) / stride) + 1 ('same' keeps it), a p x p pool floors it by p; a
    dense layer has in*out + out parameters and in*out MACs; batch norm has 2 parameters (scale,
    shift) per channel and, like pooling, activations and dropout, no counted MACs."""
    arch = ZOO[model]
    params = macs = 0
    c, side = channels, size
    for filters, k, stride, padding, pool, batch_norm in arch["convs"]:
        out = side if padding == "same" else (side + 2 * padding - k) // stride + 1
        params += k * k * c * filters + filters + (2 * filters if batch_norm else 0)
        macs += k * k * c * filters * out * out
        side, c = (out // pool if pool else out), filters
    features = c * side * side
    for units, batch_norm in arch["dense"]:
        params += features * units + units + (2 * units if batch_norm else 0)
        macs += features * units
        features = units
    params += features * arch["outputs"] + arch["outputs"]
    macs += features * arch["outputs"]
    return params, macs


# The same numbers as a literal table: {model: {(channels, size): (parameters, MACs)}}, for the
# inputs the brief pins (MNIST's 1x28x28, CIFAR-10's 3x32x32), with 10 labels. Worked by hand for
# the documented CNN on 1x28x28: conv 1->32 (3x3): 320 params, 26*26*32*9 = 194,688 MACs; pool
# -> 13; conv 32->64: 18,496 params, 11*11*64*288 = 2,230,272 MACs; pool -> 5; dense 1600->128:
# 204,928 params, 204,800 MACs; output 128->10: 1,290 params, 1,280 MACs: 225,034 and 2,631,040.
PINNED = {
    "cnn": {(1, 28): (225_034, 2_631_040), (3, 32): (315_722, 4_188_800)},
    "cnn_sigmoid": {(1, 28): (223_873, 2_629_888), (3, 32): (314_561, 4_187_648)},
    "cnn_wide": {(1, 28): (896_522, 10_132_224), (3, 32): (1_258_122, 15_197_440)},
    "cnn_same": {(1, 28): (421_642, 4_241_152), (3, 32): (545_098, 6_128_896)},
    "cnn_strided": {(1, 28): (421_642, 1_362_304), (3, 32): (545_098, 1_926_400)},
    "cnn_deep": {(1, 28): (467_818, 18_691_840), (3, 32): (591_274, 25_003_264)},
    "cnn_regularized": {(1, 28): (468_458, 18_691_840), (3, 32): (591_914, 25_003_264)},
}


def zoo_net(model: str, channels: int, size: int, *overrides: str) -> nn.Sequential:
    """conf/model/<model>.yaml's network for a channels x size x size input and 10 labels, built as train() does."""
    config = load(compose_cfg(f"model={model}", *overrides))
    head = build_head(config.model, 10)
    torch.manual_seed(0)
    return build_network(config.model, channels, size, head.num_outputs)


def test_the_zoo_is_transcribed_whole():
    assert MODELS == sorted(ZOO) == sorted(PINNED)


@pytest.mark.parametrize("model", MODELS)
def test_the_pinned_table_is_the_formulas(model):
    for (channels, size), numbers in PINNED[model].items():
        assert expected_costs(model, channels, size) == numbers, (model, channels, size)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("channels, size", INPUTS)
def test_every_model_builds_and_runs_on_every_input(model, channels, size):
    net = zoo_net(model, channels, size).eval()
    outputs = ZOO[model]["outputs"]
    with torch.no_grad():
        assert net(torch.randn(2, channels, size, size)).shape == (2, outputs)
    measured = count_parameters(net), count_macs(net, (channels, size, size))["total"]
    assert measured == expected_costs(model, channels, size)
    if (channels, size) in PINNED[model]:
        assert measured == PINNED[model][channels, size]


@pytest.mark.parametrize("model", MODELS)
def test_every_conv_and_dense_layer_has_the_formulas_shape(model):
    """Layer by layer on CIFAR-10's input: each conv's channels and the first dense layer's
    inputs are those the arithmetic gives (a wrong flatten size would only show as a crash)."""
    net = zoo_net(model, 3, 32)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    arch = ZOO[model]
    assert [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in convs] == [
        (c_in, f, k, s) for (f, k, s, *_), c_in in zip(arch["convs"], [3] + [c[0] for c in arch["convs"]])]
    assert len([m for m in net if isinstance(m, nn.BatchNorm2d)]) == sum(c[5] for c in arch["convs"])
    x = torch.zeros(1, 3, 32, 32)
    for layer in net:
        if isinstance(layer, nn.Linear):
            assert layer.in_features == x.shape[1]
            break
        x = layer.eval()(x)


# --- a block that cannot fit its input: one line when the config is loaded ----------------------------

@pytest.mark.parametrize("model, size, block", [
    ("cnn", 8, 1), ("cnn_wide", 8, 1), ("cnn_sigmoid", 8, 1),  # 8 -conv-> 6 -pool-> 3 -conv-> 1 -pool-> 0
    ("cnn", 5, 1),                                               # 5 -> 3 -> 1; a 3x3 kernel on 1x1: none
    ("cnn_deep", 2, 3), ("cnn_regularized", 2, 3),               # 2 -> 2 -> 1 -> 1 -> pool: 0
    ("cnn_same", 1, 0),  # cnn_strided fits any size: a 3x3 kernel, stride 2, padding 1 keeps at least 1
])
def test_an_input_too_small_for_a_model_is_one_line_at_config_load(model, size, block):
    cfg = compose_cfg(f"model={model}", f"data.image_size={size}")
    with pytest.raises(CnnlabError, match=rf"^config model\.conv_blocks\[{block}\]: the {size}x{size} input "
                                          rf"shrinks to nothing here \(.*data\.image_size={size}\); use ") as error:
        load(cfg)
    assert "\n" not in str(error.value)
    # build_network, which a checkpoint's rebuild uses, says the same
    config = load(compose_cfg(f"model={model}"))
    with pytest.raises(CnnlabError, match=rf"^config model\.conv_blocks\[{block}\]: "):
        build_network(config.model, 3, size, 10)


def test_the_line_says_what_does_not_fit():
    spec = load(compose_cfg()).model
    key, problem = fit_problem(spec, 8)  # 8 -conv-> 6 -pool-> 3 -conv-> 1 -pool-> nothing
    assert key == "model.conv_blocks[1]" and "its 2x2 pool does not fit the 1x1 map its conv makes" in problem
    key, problem = fit_problem(spec, 5)  # 5 -conv-> 3 -pool-> 1 -conv-> nothing
    assert key == "model.conv_blocks[1]" and "its 3x3 kernel does not fit the 1x1 feature map it gets" in problem
    assert fit_problem(spec, 10) is None  # 10 -> 8 -> 4 -> 2 -> 1


def test_the_models_that_fit_an_8x8_input_build_and_run():
    for model in ("cnn_same", "cnn_strided", "cnn_deep", "cnn_regularized"):
        net = zoo_net(model, 3, 8, "data.image_size=8").eval()
        with torch.no_grad():
            assert net(torch.zeros(2, 3, 8, 8)).shape[0] == 2


def test_train_fails_on_a_model_that_cannot_fit_before_fetching_or_tracking(tmp_path):
    from cnnlab.training.train import train

    data_dir, store = tmp_path / "data", tmp_path / "runs.db"
    cfg = compose_cfg("model=cnn_deep", "data.image_size=2", f"paths.data_dir={data_dir}",
                      f"paths.output_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{store}")
    with pytest.raises(CnnlabError, match=r"^config model\.conv_blocks\[3\]: the 2x2 input shrinks"):
        train(cfg)
    assert not data_dir.exists() and not store.exists() and not (tmp_path / "run").exists()


# --- build_network's size arithmetic against a real forward pass ---------------------------------------

def probe_spec(block: dict) -> ModelSpec:
    return parse(ModelSpec, {"name": "probe", "head": "softmax", "positive_classes": [], "init": "torch",
                             "conv_blocks": [block], "dense": [], "width": 1.0, "dropout": 0.0}, "model")


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")
def test_the_size_arithmetic_is_torchs_for_every_kernel_stride_padding_and_pool():
    """Every combination of kernel 1-5, stride 1-3, padding valid/same/0-2 and pool none/2/3, on
    sides 1-12 and 28, 32: the side build_network computes is the side torch's layers produce,
    and a block said not to fit is one torch cannot run (or would make empty)."""
    checked = 0
    for k, stride, padding, pool in itertools.product(range(1, 6), (1, 2, 3), ("valid", "same", 0, 1, 2),
                                                      (None, 2, 3)):
        if padding == "same" and stride != 1:
            continue
        spec = probe_spec({"filters": 1, "kernel_size": k, "stride": stride, "padding": padding, "pool": pool})
        block = spec.conv_blocks[0]
        layers = nn.Sequential(nn.Conv2d(1, 1, k, stride=stride, padding={"valid": 0}.get(padding, padding)),
                               *([nn.MaxPool2d(pool)] if pool else []))
        for side in (*range(1, 13), 28, 32):
            try:
                with torch.no_grad():
                    real = layers(torch.zeros(1, 1, side, side)).shape[-1]
            except RuntimeError:  # torch: kernel size can't be greater than the input, output size too small
                real = 0
            fits = fit_problem(spec, side) is None
            assert fits == (real >= 1), (k, stride, padding, pool, side, real)
            if fits:
                assert conv_output_size(side, block) == real, (k, stride, padding, pool, side)
            if fits and side in (5, 11, 28):  # the whole network too, on a few sides (each build takes time)
                net = build_network(spec, 1, side, 10)
                assert net[-1].in_features == real * real
                with torch.no_grad():
                    assert net(torch.zeros(2, 1, side, side)).shape == (2, 10)
            checked += 1
    assert checked > 2000


def test_a_zoo_checkpoint_records_what_rebuilds_it(tmp_path: Path):
    """A colour model's recorded input shape rebuilds the same network (cnnlab.training.trained.rebuild)."""
    from cnnlab.training.trained import rebuild

    config = load(compose_cfg("model=cnn_regularized"))
    net = build_network(config.model, 3, 32, 10)
    torch.save({"hyper_parameters": {"architecture": {"model": config.as_dict()["model"], "input_shape": [3, 32, 32],
                                                      "num_labels": 10}},
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "m.ckpt")
    rebuilt, _, _, weights = rebuild(tmp_path / "m.ckpt")
    assert count_parameters(rebuilt) == PINNED["cnn_regularized"][3, 32][0]
    assert {k.removeprefix("net."): v.shape for k, v in weights.items()} == \
        {k: v.shape for k, v in rebuilt.state_dict().items()}
