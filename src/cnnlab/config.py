"""Config plumbing: validate before any work starts, flatten for MLflow, find the project root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnlab import CnnlabError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
HEADS = ("softmax", "sigmoid")
PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "leaky_relu", "elu", "silu")


def project_root() -> Path:
    """The cnnlab checkout runs belong to.

    DVC runs queued experiments in temporary copies and points DVC_ROOT at the real repository,
    so the tracking store and data cache stay in one place.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file():
            return candidate
    return here


def to_container(cfg: DictConfig | dict) -> dict:
    """Plain, fully resolved dict (no ${...} left)."""
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"conv_blocks": [{"filters": 32}]}} -> {"model.conv_blocks.0.filters": 32}."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, Any] = {}
    items = cfg.items() if isinstance(cfg, dict) else enumerate(cfg)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _fail(where: str, problem: str) -> None:
    raise CnnlabError(f"config {where}: {problem}")


def _check_int(value: Any, where: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(where, f"expected an integer >= {minimum}, got {value!r}")


def _check_positive(value: Any, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        _fail(where, f"expected a positive number, got {value!r}")


def _check_fraction(value: Any, where: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        _fail(where, f"expected a number in [0, 1), got {value!r}")


def validate_evaluate(section: dict) -> None:
    """The `evaluate` section; the evaluate stage checks it on its own when it reads params.yaml."""
    _check_int(section.get("batch_size"), "evaluate.batch_size")
    _check_int(section.get("num_misclassified"), "evaluate.num_misclassified", 0)


def validate(cfg: DictConfig | dict) -> dict:
    """Check every knob before training starts; return the resolved config as a plain dict.

    Raises CnnlabError naming the key to fix. Shape problems (a network that shrinks the image
    to nothing) are caught when the model is built, see cnnlab.model.build_network.
    """
    try:
        c = to_container(cfg)
    except Exception as exc:  # omegaconf's MissingMandatoryValue, InterpolationResolutionError...
        raise CnnlabError(f"config: {exc}".splitlines()[0]) from None
    for section in ("data", "model", "optimizer", "trainer", "tracking", "paths", "runtime", "fetch", "evaluate", "benchmark"):
        if not isinstance(c.get(section), dict):
            _fail(section, "missing section")

    data, model = c["data"], c["model"]
    _check_int(data.get("num_classes"), "data.num_classes", 2)
    _check_int(data.get("channels"), "data.channels")
    _check_int(data.get("image_size"), "data.image_size")
    _check_int(data.get("batch_size"), "data.batch_size")
    _check_int(data.get("val_size"), "data.val_size")
    _check_int(data.get("eval_batch_size"), "data.eval_batch_size")
    augment = data.get("augment") or {}
    if augment.get("enabled"):
        _check_fraction(augment.get("max_shift"), "data.augment.max_shift")
        if not isinstance(augment.get("max_rotation"), (int, float)) or not 0 <= augment["max_rotation"] <= 180:
            _fail("data.augment.max_rotation", f"expected degrees in [0, 180], got {augment.get('max_rotation')!r}")
    if len(data.get("class_names") or []) != data["num_classes"]:
        _fail("data.class_names", f"expected {data['num_classes']} names (data.num_classes)")
    norm = data.get("normalize") or {}
    _check_positive(norm.get("std"), "data.normalize.std")
    if not data.get("sources") or not all(isinstance(s, str) and s.strip() for s in data["sources"]):
        _fail("data.sources", f"expected a list of directories or URLs, got {data.get('sources')!r}")
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        if not (data.get("files") or {}).get(key, {}).get("name"):
            _fail(f"data.files.{key}.name", "missing file name")

    if model.get("head") not in HEADS:
        _fail("model.head", f"expected one of {', '.join(HEADS)}, got {model.get('head')!r}")
    if model["head"] == "sigmoid":
        positives = model.get("positive_classes") or []
        if not positives or any(not isinstance(p, int) or not 0 <= p < data["num_classes"] for p in positives):
            _fail("model.positive_classes", f"expected class indices in [0, {data['num_classes']}), got {positives!r}")
        if len(set(positives)) == data["num_classes"]:
            _fail("model.positive_classes", "every class is positive: nothing left to tell apart")
    _check_positive(model.get("width", 1.0), "model.width")
    _check_fraction(model.get("dropout", 0.0), "model.dropout")
    if not model.get("conv_blocks"):
        _fail("model.conv_blocks", "expected at least one conv block")
    for i, block in enumerate(model["conv_blocks"]):
        where = f"model.conv_blocks[{i}]"
        _check_int(block.get("filters"), f"{where}.filters")
        _check_int(block.get("kernel_size"), f"{where}.kernel_size")
        _check_int(block.get("stride", 1), f"{where}.stride")
        pad = block.get("padding", "valid")
        if not (pad in ("valid", "same") or (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0)):
            _fail(f"{where}.padding", f"expected 'valid', 'same' or an integer >= 0, got {pad!r}")
        if pad == "same" and block.get("stride", 1) != 1:
            _fail(f"{where}.padding", "'same' padding needs stride 1 (use an integer padding with strides)")
        if block.get("pool") is not None:
            _check_int(block["pool"], f"{where}.pool")
        if block.get("activation", "relu") not in ACTIVATIONS:
            _fail(f"{where}.activation", f"expected one of {', '.join(ACTIVATIONS)}, got {block.get('activation')!r}")
        _check_fraction(block.get("dropout", 0.0), f"{where}.dropout")
    for i, layer in enumerate(model.get("dense") or []):
        where = f"model.dense[{i}]"
        _check_int(layer.get("units"), f"{where}.units")
        if layer.get("activation", "relu") not in ACTIVATIONS:
            _fail(f"{where}.activation", f"expected one of {', '.join(ACTIVATIONS)}, got {layer.get('activation')!r}")
        _check_fraction(layer.get("dropout", 0.0), f"{where}.dropout")

    _check_positive(c["optimizer"].get("lr"), "optimizer.lr")
    trainer = c["trainer"]
    _check_int(trainer.get("max_epochs"), "trainer.max_epochs")
    if str(trainer.get("precision")) not in PRECISIONS:
        _fail("trainer.precision", f"expected one of {', '.join(PRECISIONS)}, got {trainer.get('precision')!r}")
    runtime = c["runtime"]
    if runtime.get("matmul_precision") not in ("highest", "high", "medium"):
        _fail("runtime.matmul_precision", f"expected highest, high or medium, got {runtime.get('matmul_precision')!r}")
    if runtime.get("num_threads") is not None:
        _check_int(runtime["num_threads"], "runtime.num_threads")
    _check_positive(c["fetch"].get("timeout_s"), "fetch.timeout_s")
    validate_evaluate(c["evaluate"])
    _check_int(c["benchmark"].get("latency_repeats"), "benchmark.latency_repeats")
    for i, size in enumerate(c["benchmark"].get("latency_batch_sizes") or []):
        _check_int(size, f"benchmark.latency_batch_sizes[{i}]")
    for key in ("limit_train_batches", "limit_val_batches"):
        if trainer.get(key) is not None:
            _check_positive(trainer[key], f"trainer.{key}")
    if not c["tracking"].get("experiment_name"):
        _fail("tracking.experiment_name", "expected a non-empty name")
    return c
