"""conf/ is the interface: params.yaml is its composed snapshot, and every bad value fails before
any work, with one line naming the key, the bad value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from dvc.utils.hydra import compose_and_dump

from cnnlab.core.config import flatten
from cnnlab.core.errors import CnnlabError
from cnnlab.training.config import load
from cnnlab.training.network import ConvBlock

from conftest import REPO, compose_cfg


def test_params_yaml_is_conf_composed_with_no_overrides(tmp_path):
    """`dvc repro` runs params.yaml; it must say exactly what conf/ says, as DVC composes it
    (DVC's own composition is the oracle here: it is what `dvc exp run -S` writes)."""
    composed = tmp_path / "params.yaml"
    compose_and_dump(str(composed), str(REPO / "conf"), None, "config", str(REPO), [])
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == yaml.safe_load(composed.read_text()), (
        "params.yaml differs from conf/: run `cnnlab params` (or `git checkout params.yaml` after an experiment)")


def test_cnnlab_params_writes_what_dvc_composes(tmp_path):
    from cnnlab import cli

    assert cli.main(["params", "--output", str(tmp_path / "ours.yaml"), "data=fashion_mnist", "model=cnn_strided"]) == 0
    compose_and_dump(str(tmp_path / "dvc.yaml"), str(REPO / "conf"), None, "config", str(REPO),
                     ["data=fashion_mnist", "model=cnn_strided"])
    assert yaml.safe_load((tmp_path / "ours.yaml").read_text()) == yaml.safe_load((tmp_path / "dvc.yaml").read_text())


def test_block_defaults_are_declared_once_and_filled_in():
    """conf/model/cnn_strided.yaml names only filters, stride and padding; the rest comes from ConvBlock."""
    config = load(compose_cfg("model=cnn_strided"))
    block = config.model.conv_blocks[0]
    written = ("filters", "stride", "padding")
    defaults = {f.name: f.default for f in dataclasses.fields(ConvBlock) if f.name not in written}
    assert {k: getattr(block, k) for k in defaults} == defaults
    assert (block.filters, block.stride, block.padding) == (32, 2, 1)
    assert config.as_dict()["model"]["conv_blocks"][0]["activation"] == "relu"  # what MLflow records


def test_flatten_gives_resolved_dotted_keys():
    flat = flatten(load(compose_cfg()).as_dict())
    assert flat["model.conv_blocks.0.filters"] == 32 and flat["model.conv_blocks.0.kernel_size"] == 3
    assert flat["tracking.run_name"] == "cnn" and flat["model.init"] == "glorot"
    assert not any(isinstance(v, str) and "${" in v for v in flat.values())


# (overrides, the key the error must name, a word of what is allowed). A block field that its
# file does not write is added with `+` (its default comes from ConvBlock / DenseLayer).
BAD = [
    (["trainer.precision=8"], "trainer.precision", "bf16-mixed"),
    (["trainer.max_epochs=0"], "trainer.max_epochs", ">= 1"),
    (["trainer.max_epochs=ten"], "trainer.max_epochs", "integer"),
    (["trainer.limit_val_batches=0"], "trainer.limit_val_batches", "> 0"),
    (["optimizer.lr=-1"], "optimizer.lr", "> 0"),
    (["optimizer.lr=0"], "optimizer.lr", "> 0"),
    (["optimizer.lr=fast"], "optimizer.lr", "> 0"),
    (["optimizer.betas=[2.0,0.999]"], "optimizer", "beta"),
    (["data.batch_size=0"], "data.batch_size", ">= 1"),
    (["data.batch_size=abc"], "data.batch_size", "integer"),
    (["data.val_size=0"], "data.val_size", ">= 1"),
    (["data.eval_batch_size=-5"], "data.eval_batch_size", ">= 1"),
    (["data.normalize.std=0"], "data.normalize.std", "> 0"),
    (["data.class_names=[a,b]"], "data.class_names", "10 names"),
    (["data.augment.max_rotation=400"], "data.augment.max_rotation", "[0, 180]"),
    (["data.sources=[]"], "data.sources", "at least one"),
    (["model.head=tanh"], "model.head", "softmax"),
    (["model.init=he"], "model.init", "glorot"),
    (["model.width=0"], "model.width", "> 0"),
    (["model.dropout=1.0"], "model.dropout", "[0, 1)"),
    (["model.conv_blocks=[]"], "model.conv_blocks", "at least one"),
    (["model.conv_blocks.0.filters=abc"], "model.conv_blocks[0].filters", "integer"),
    (["model.conv_blocks.0.kernel_size=0"], "model.conv_blocks[0].kernel_size", ">= 1"),
    (["model=cnn_same", "model.conv_blocks.0.padding=wide"], "model.conv_blocks[0].padding", "'same'"),
    (["model=cnn_same", "+model.conv_blocks.0.stride=2"], "model.conv_blocks[0].padding", "stride 1"),
    (["+model.conv_blocks.1.activation=swish"], "model.conv_blocks[1].activation", "relu"),
    (["+model.conv_blocks.1.bogus=1"], "model.conv_blocks[1].bogus", "unknown key"),
    (["+model.dense.0.dropout=1.5"], "model.dense[0].dropout", "[0, 1)"),
    (["+model.depth=3"], "model.depth", "unknown key"),
    (["+typo_section.x=1"], "typo_section", "unknown key"),
    (["data.normalize.mean=[0.1,0.2]"], "data.normalize.mean:", "or 1 (data.channels)"),
    (["data=cifar10", "data.image_size=28"], "data.image_size:", "expected 32, got 28"),
    (["data=cifar10", "data.channels=1", "data.normalize.mean=0.5", "data.normalize.std=0.25"],
     "data.channels:", "expected 3, got 1"),
    (["model=cnn_sigmoid", "model.positive_classes=[12]"], "model.positive_classes", "[0, 10)"),
    (["model=cnn_sigmoid", "model.positive_classes=[0,1,2,3,4,5,6,7,8,9]"], "model.positive_classes", "every class"),
    (["runtime.num_threads=-2"], "runtime.num_threads", "auto' or an integer >= 1"),
    (["runtime.num_threads=many"], "runtime.num_threads", "int or 'auto'"),
    (["runtime.malloc_keep_memory=sometimes"], "runtime.malloc_keep_memory", "bool"),
    (["runtime.matmul_precision=bogus"], "runtime.matmul_precision", "highest"),
    (["runtime.channels_last=maybe"], "runtime.channels_last", "bool"),
    (["fetch.timeout_s=-1"], "fetch.timeout_s", "> 0"),
    (["evaluate.batch_size=0"], "evaluate.batch_size", ">= 1"),
    (["tracking.experiment_name=' '"], "tracking.experiment_name", "non-empty"),
    (["tracking.timeout_s=0"], "tracking.timeout_s", ">= 1"),
    (["tracking.timeout_s=2.5"], "tracking.timeout_s", "integer"),
    (["tracking.max_retries=-1"], "tracking.max_retries", "[0, 10]"),
    (["tracking.max_retries=11"], "tracking.max_retries", "[0, 10]"),
    (["tracking.max_retries=many"], "tracking.max_retries", "integer"),
    (["seed=-1"], "seed", ">= 0"),
    (["optimized_metric=test/acc"], "optimized_metric", "val/"),
    (["callbacks=[early_stopping]"], "callbacks.model_checkpoint", "required"),
    (["scheduler=cosine", "+scheduler.warmup=3"], "scheduler", "warmup"),
    (["trainer.accelerator=cpu", "trainer.precision=16-mixed"], "trainer.precision", "GPU only"),
    pytest.param(["trainer.accelerator=gpu"], "trainer.accelerator", "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
]


@pytest.mark.parametrize("overrides, key, allowed", BAD, ids=[" ".join(getattr(b, "values", b)[0]) for b in BAD])
def test_every_bad_value_is_one_line_naming_the_key(overrides, key, allowed):
    with pytest.raises(CnnlabError) as error:
        load(compose_cfg(*overrides))
    message = str(error.value)
    assert message.startswith(f"config {key}") and allowed in message and "\n" not in message, message


def test_custom_dataset_requires_a_path():
    with pytest.raises(CnnlabError, match="data.path"):
        load(compose_cfg("data=custom", resolve=False))


@pytest.mark.parametrize("overrides", [[], ["model=cnn_sigmoid", "data=fashion_mnist"], ["scheduler=cosine"],
                                       ["callbacks=[default,early_stopping,lr_monitor]"], ["logger=none"]])
def test_good_configs_load(overrides):
    load(compose_cfg(*overrides))


def test_an_image_folder_with_train_but_no_test_fails_when_composed(tmp_path):
    from cnnlab.core.config import folder_splits

    root = tmp_path / "pets"
    for name in ("train/cat", "train/dog", "val/cat", "val/dog"):
        (root / name).mkdir(parents=True)
    with pytest.raises(CnnlabError) as error:
        load(compose_cfg("data=folder", f"data.path={root}", resolve=False))
    message = str(error.value)
    assert f"{root} has train/ but no test/" in message and "\n" not in message, message
    (root / "test").mkdir()
    with pytest.raises(CnnlabError, match="val/ beside train/ and test/"):
        folder_splits(root)
    (root / "val").rename(tmp_path / "val")
    assert folder_splits(root) == [("train", root / "train"), ("test", root / "test")]
    assert folder_splits(root / "train") == [(None, root / "train")]
