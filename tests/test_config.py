"""conf/ is the interface: params.yaml must be its composed snapshot, and bad values fail early."""

from __future__ import annotations

import pytest
import yaml
from dvc.utils.hydra import compose_and_dump

from cnnlab import CnnlabError
from cnnlab.config import flatten, validate

from conftest import REPO, compose_cfg


def test_params_yaml_is_conf_composed_with_no_overrides(tmp_path):
    """`dvc repro` runs params.yaml; it must say exactly what conf/ says (DVC's own composition)."""
    composed = tmp_path / "params.yaml"
    compose_and_dump(str(composed), str(REPO / "conf"), None, "config", str(REPO), [])
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == yaml.safe_load(composed.read_text()), (
        "params.yaml differs from conf/: run `cnnlab params` (or `git checkout params.yaml` after an experiment)")


def test_dvc_hydra_composition_is_enabled():
    assert "enabled = true" in (REPO / ".dvc" / "config").read_text()


def test_default_config_is_the_documented_setup():
    cfg = validate(compose_cfg())
    assert cfg["data"]["name"] == "mnist"
    assert cfg["optimizer"]["_target_"] == "torch.optim.Adam" and cfg["optimizer"]["lr"] == 1e-3
    assert cfg["data"]["batch_size"] == 32 and cfg["trainer"]["max_epochs"] == 10
    assert cfg["model"]["head"] == "softmax"
    assert cfg["trainer"]["accelerator"] == "auto"


def test_flatten_gives_resolved_dotted_keys():
    flat = flatten(compose_cfg())
    assert flat["model.conv_blocks.0.filters"] == 32
    assert flat["tracking.run_name"] == "cnn"
    assert not any(isinstance(v, str) and "${" in v for v in flat.values())


@pytest.mark.parametrize("override, key", [
    ("trainer.precision=64", "trainer.precision"),
    ("optimizer.lr=-1", "optimizer.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("model.head=tanh", "model.head"),
    ("model.conv_blocks.0.padding=wide", "model.conv_blocks[0].padding"),
    ("model.conv_blocks.1.activation=swish", "model.conv_blocks[1].activation"),
    ("model.dense.0.dropout=1.5", "model.dense[0].dropout"),
    ("data.normalize.std=0", "data.normalize.std"),
])
def test_bad_values_are_named(override, key):
    with pytest.raises(CnnlabError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate(compose_cfg(override))


def test_sigmoid_head_needs_sensible_positive_classes():
    with pytest.raises(CnnlabError, match="model.positive_classes"):
        validate(compose_cfg("model=cnn_sigmoid", "model.positive_classes=[12]"))
    with pytest.raises(CnnlabError, match="every class is positive"):
        validate(compose_cfg("model=cnn_sigmoid", "model.positive_classes=[0,1,2,3,4,5,6,7,8,9]"))


def test_custom_dataset_requires_a_path():
    with pytest.raises(CnnlabError, match="data.path"):
        validate(compose_cfg("data=custom", resolve=False))


@pytest.mark.parametrize("override, key", [
    ("benchmark.latency_repeats=0", "benchmark.latency_repeats"),
    ("data.eval_batch_size=0", "data.eval_batch_size"),
    ("evaluate.batch_size=0", "evaluate.batch_size"),
    ("data.val_size=0", "data.val_size"),
    ("runtime.num_threads=-2", "runtime.num_threads"),
    ("runtime.matmul_precision=bogus", "runtime.matmul_precision"),
    ("fetch.timeout_s=-1", "fetch.timeout_s"),
    ("trainer.limit_val_batches=0", "trainer.limit_val_batches"),
])
def test_runtime_and_benchmark_knobs_are_validated_too(override, key):
    with pytest.raises(CnnlabError, match=key):
        validate(compose_cfg(override))
