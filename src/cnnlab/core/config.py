"""Typed config: the sections every wing reads, each knob's type and allowed range declared once,
and the loader that checks them before any work.

`conf/` (composed by Hydra, or by DVC into params.yaml) gives the values; the dataclasses below
give each section's types, the range checks beside them, and the defaults of the fields that
repeat. `parse(cls, value, where)` turns a section into its dataclass or raises one CnnlabError
line naming the key, the bad value and what is allowed. The model's spec lives beside the code
that builds it (cnnlab.training.network), and a training run's whole config, with `load()`, in
cnnlab.training.config.

Why a small loader instead of OmegaConf's structured merge: OmegaConf reports an error inside a
list element without its path (`full_key: filters`), and cnnlab promises errors that name the key
to fix (`model.conv_blocks[1].filters`). The sections that Hydra instantiates (optimizer,
scheduler, trainer, callbacks, logger) stay free-form; their values are checked by building them.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnlab.core.errors import CnnlabError, one_line

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"  # src/cnnlab/core/config.py -> conf/
# `${pid:}` in conf/config.yaml's hydra.run.dir and hydra.sweep.dir: the process id, so that
# processes started in the same second never share an output folder. Cached like Hydra's `now`,
# so that the joblib launcher's worker processes see the sweep folder the launcher made.
OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True, replace=True)
# `${project_path:outputs}` in conf/config.yaml's hydra.run.dir and hydra.sweep.dir (see project_path).
OmegaConf.register_new_resolver("project_path", lambda path: str(project_path(path)), replace=True)


# --- distributed launches (conf/trainer/ddp.yaml, conf/config.yaml's hydra.run.dir) ------------------
# torchrun and SLURM's srun start every process of a training themselves, each running the whole
# command; these name what the processes of one launch share.

def launch_id() -> str | None:
    """The id every process of one distributed launch shares: torchrun's run id (or, without
    rendezvous, its agent's pid: the processes' parent), or SLURM's job and step; None otherwise."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None and "LOCAL_RANK" in os.environ:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        return f"torchrun-{run_id if run_id not in ('', 'none') else os.getppid()}"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    return None


def run_folder_name(model: str) -> str:
    """`<time>_<model>_<pid>` (processes started in the same second get their own folders); for a
    distributed launch `<model>_<launch id>`, one folder for all its processes (their clocks, read
    as each one starts, may differ by seconds)."""
    shared = launch_id()
    return f"{model}_{shared}" if shared else f"{time.strftime('%H-%M-%S')}_{model}_{os.getpid()}"


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "").split("(")[0]  # SLURM writes "2(x3)" for 2 tasks on each of 3 nodes
        if value.isdigit():
            return int(value)
    return None


def _cuda_devices() -> int:
    """The CUDA GPUs this process sees: what Lightning's devices=auto counts (CUDA_VISIBLE_DEVICES
    applies; torch asks NVML first, so no CUDA context is made). torch is imported only when a
    config asks (trainer=ddp): commands that only read config must not pay its import."""
    import torch

    return torch.cuda.device_count()


def trains_on_cuda(accelerator: Any) -> bool:
    """Does `trainer.accelerator` train on CUDA GPUs on this machine: gpu or cuda, or auto with one here?"""
    return str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and _cuda_devices() > 0)


def ddp_devices(accelerator: Any = "auto") -> int:
    """Processes per node (conf/trainer/ddp.yaml): as torchrun or SLURM started them; else one per
    visible GPU when `accelerator` trains on CUDA; else 2 CPU processes."""
    started = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")
    if started:
        return started
    return max(1, _cuda_devices()) if trains_on_cuda(accelerator) else 2


def ddp_sync_batchnorm(accelerator: Any = "auto") -> bool:
    """conf/trainer/ddp.yaml's sync_batchnorm: on where the training runs on CUDA; torch's
    SyncBatchNorm refuses CPU tensors (also under gloo), so off on CPUs."""
    return trains_on_cuda(accelerator)


def ddp_nodes() -> int:
    """Nodes of the training: torchrun's world size over its local world size, SLURM's node count, else 1."""
    world, local = _env_int("WORLD_SIZE"), _env_int("LOCAL_WORLD_SIZE")
    if world and local and "TORCHELASTIC_RUN_ID" in os.environ:
        return max(1, world // local)
    return _env_int("SLURM_NNODES", "SLURM_JOB_NUM_NODES") or 1


OmegaConf.register_new_resolver("run_folder", run_folder_name, use_cache=True, replace=True)
OmegaConf.register_new_resolver("ddp_devices", ddp_devices, replace=True)
OmegaConf.register_new_resolver("ddp_nodes", ddp_nodes, replace=True)
OmegaConf.register_new_resolver("ddp_sync_batchnorm", ddp_sync_batchnorm, replace=True)
# DDP's buffer broadcast before each forward is needed only where BatchNorm statistics are not synced.
OmegaConf.register_new_resolver("ddp_broadcast_buffers", lambda sync_batchnorm: not sync_batchnorm, replace=True)


def image_folder_root(path: str) -> Path:
    """data.path of an image folder, from the project root when relative (as paths.data_dir)."""
    if path is None or not str(path).strip():
        raise CnnlabError("config data.path: needs a value: add data.path=<folder> (one sub-folder of images "
                          "per class) to the command")
    return project_path(os.path.expanduser(str(path)))


SPLIT_FOLDERS = ("train", "test")
VALIDATION_FOLDERS = ("val", "valid", "validation")
# Files the operating system leaves in folders of pictures: never images of a class (as dotfiles).
OS_METADATA_FILES = ("thumbs.db", "desktop.ini")


def is_metadata_file(name: str) -> bool:
    """A dotfile (.DS_Store, ._x.png) or an OS's thumbnail or settings file: no image of any class."""
    return name.startswith(".") or name.lower() in OS_METADATA_FILES


def sub_folders(folder: Path) -> list[str]:
    """The names of a folder's sub-folders, sorted; hidden ones left out. One line if it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except PermissionError as exc:
        raise CnnlabError(f"{folder}: cannot list it ({exc.strerror}); make it readable (chmod a+rx)") from None
    except (FileNotFoundError, NotADirectoryError):  # moved or unmounted since the config was composed
        raise CnnlabError(f"config data.path: {folder} is not a folder; point it at a folder holding one "
                          f"sub-folder of images per class") from None


def folder_splits(root: Path) -> list[tuple[str | None, Path]]:
    """(split, folder of class folders) of an image folder: [("train", DIR/train), ("test", DIR/test)]
    when DIR has a sub-folder named train or test (then it must have both, and nothing else), else
    [(None, DIR)]. One line naming the folder and what to do when the layout is neither."""
    found = sub_folders(root)
    if not set(SPLIT_FOLDERS) & set(found):
        return [(None, root)]
    for have, lacks, what in (("train", "test", "test images"), ("test", "train", "training images")):
        if lacks not in found:
            raise CnnlabError(f"{root} has {have}/ but no {lacks}/: put the {what} in {root / lacks}/<class>/, "
                              f"or move the class folders up to {root} to have a test part held out "
                              f"(data.test_fraction)")
    others = [name for name in found if name not in SPLIT_FOLDERS]
    validation = [name for name in others if name in VALIDATION_FOLDERS]
    if validation:
        raise CnnlabError(f"{root} has {validation[0]}/ beside train/ and test/: cnnlab draws validation images "
                          f"from train/ (data.val_size): move {validation[0]}/'s class folders' images into "
                          f"train/, or remove it")
    if others:
        raise CnnlabError(f"{root} has train/ and test/ and also {', '.join(f'{n}/' for n in others)}: with "
                          f"train/ and test/ it holds nothing else; move {others[0]}/ into them or out of {root}")
    return [(split, root / split) for split in SPLIT_FOLDERS]


def loose_files(root: Path) -> list[str]:
    """Files directly in an image folder (or in its train/ and test/) beside the class folders,
    relative to it, sorted: images of no class, left out (as torchvision's ImageFolder does)."""
    found = []
    for split, base in folder_splits(root):
        try:
            with os.scandir(base) as entries:
                found += [f"{split}/{e.name}" if split else e.name for e in entries
                          if not is_metadata_file(e.name) and not e.is_dir() and e.is_file()]
        except OSError:
            continue  # listing it again fails, in one line, where its classes are read
    return sorted(found)


def class_folders(path: str) -> list[str]:
    """The classes of an image folder: its sub-folders' names, sorted (as torchvision's ImageFolder
    numbers them), those of DIR/train when the folder holds train/ and test/ (folder_splits). Hidden
    folders are not classes. Read when the config is resolved, so that the network's output layer
    and every run's class names are known before any work; one line when the folder cannot be a
    dataset."""
    base = folder_splits(image_folder_root(path))[0][1]
    names = sub_folders(base)
    if len(names) < 2:
        found = f"one class folder ({names[0]})" if names else "no class folders"
        raise CnnlabError(f"config data.path: {base} has {found}; a classifier needs at least two: put each "
                          f"class's images in a sub-folder of its own ({base}/<class>/<image>)")
    return names


def folder_dataset_name(path: str) -> str:
    """data.name of an image folder: the folder's own name, as a file name (its prepared arrays
    live in <data_dir>/<name>/)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", image_folder_root(path).name).strip("._")
    return name or "folder"


OmegaConf.register_new_resolver("class_folders", lambda path: ListConfig(class_folders(path)), replace=True)
OmegaConf.register_new_resolver("count", len, replace=True)
OmegaConf.register_new_resolver("folder_dataset_name", folder_dataset_name, replace=True)


# --- range checks, attached to fields as metadata ---------------------------------------------------

def at_least(minimum: float, **kw):
    return field(metadata={"check": lambda v: v >= minimum, "allowed": f">= {minimum}"}, **kw)


def positive(**kw):
    return field(metadata={"check": lambda v: v > 0, "allowed": "a number > 0"}, **kw)


def fraction(**kw):
    return field(metadata={"check": lambda v: 0 <= v < 1, "allowed": "a number in [0, 1)"}, **kw)


def one_of(choices, **kw):
    return field(metadata={"check": lambda v: v in choices, "allowed": f"one of {', '.join(map(str, choices))}"}, **kw)


def key_of(module: str, table: str, **kw):
    """A key of `module.table` (the network's activations, the heads...). The table is looked up
    when a value is checked, not when this module is imported: the tables hold torch classes, and
    commands that only read config (params, fetch, compare) must not pay torch's import."""
    def choices():
        return tuple(getattr(importlib.import_module(module), table))
    return field(metadata={"check": lambda v: v in choices(), "allowed": lambda: f"one of {', '.join(choices())}"},
                 **kw)


def non_empty(**kw):
    return field(metadata={"check": lambda v: len(v) > 0, "allowed": "at least one entry"}, **kw)


# --- the sections ------------------------------------------------------------------------------------

@dataclass
class IdxFile:
    name: str
    md5: str | None = None          # published MD5 of the .gz file
    content_md5: str | None = None  # MD5 of the decompressed IDX bytes (repackaged copies)


@dataclass
class Archive:
    name: str                        # the file's name at each source (a folder or a URL's folder)
    md5: str | None = None           # its published MD5


@dataclass
class DataFiles:
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile


@dataclass
class Normalize:
    """Subtracted and divided, per channel: one number for every channel, or one per channel."""
    mean: float | list[float]
    std: float | list[float]

    def per_channel(self, channels: int) -> tuple[list[float], list[float]]:
        return [_channel(self.mean, c) for c in range(channels)], [_channel(self.std, c) for c in range(channels)]

    def problems(self):
        stds = self.std if isinstance(self.std, list) else [self.std]
        if not stds or not all(s > 0 for s in stds):
            yield "std", f"expected numbers > 0, got {self.std!r}"


def _channel(value: float | list[float], channel: int) -> float:
    return float(value[channel] if isinstance(value, list) else value)


@dataclass
class Augment:
    enabled: bool
    max_shift: float = fraction()       # fraction of the image size
    max_rotation: float = field(metadata={"check": lambda v: 0 <= v <= 180, "allowed": "degrees in [0, 180]"})


DATA_FORMATS = ("idx", "folder", "cifar10")  # cnnlab.training.datasets.FORMATS reads and prepares each


@dataclass
class DataSpec:
    """conf/data/: one dataset (its format and where it comes from), its split, batches,
    normalisation and augmentation."""
    name: str
    num_classes: int = at_least(2)
    channels: int = field(metadata={"check": lambda v: v in (1, 3), "allowed": "1 (grayscale) or 3 (RGB)"})
    image_size: int = at_least(1)
    class_names: list[str]
    sources: list[str] = non_empty()
    # images held out of the training set for validation: a number, or a fraction of it (0.1)
    val_size: int | float = field(metadata={"check": lambda v: v >= 1 if is_int(v) else 0 < v < 1,
                                            "allowed": "an integer >= 1 or a fraction in (0, 1)"})
    split_seed: int = at_least(0)
    batch_size: int = at_least(1)
    eval_batch_size: int = at_least(1)
    normalize: Normalize
    augment: Augment
    format: str = one_of(DATA_FORMATS, default="idx")
    files: DataFiles | None = None   # format idx: the four files and their checksums
    archive: Archive | None = None   # format cifar10: the archive and its checksum
    path: str | None = None          # data=custom (IDX files) and data=folder: the directory to read
    # format folder: the part of each class held out as the test set when the folder has no
    # train/ and test/ of its own (stratified, seeded by split_seed)
    test_fraction: float = field(default=0.2, metadata={"check": lambda v: 0 < v < 1, "allowed": "a number in (0, 1)"})
    # format folder: leave out images that cannot be read (each listed in the run) instead of stopping
    skip_bad_files: bool = False
    # format folder: images with more pixels are refused (Pillow's guard against decompression bombs)
    max_image_pixels: int = at_least(1, default=100_000_000)

    def problems(self):
        if len(self.class_names) != self.num_classes:
            yield "class_names", f"expected {self.num_classes} names (data.num_classes), got {len(self.class_names)}"
        if not all(s.strip() for s in self.sources):
            yield "sources", f"expected directories or URLs, got {self.sources!r}"
        if self.format == "idx" and self.files is None:
            yield "files", "format idx needs its four files (train_images, train_labels, test_images, test_labels)"
        if self.format == "idx" and self.channels != 1:
            yield "channels", f"IDX images are one grayscale channel: expected 1, got {self.channels}"
        if self.format == "folder" and not (self.path or "").strip():
            yield "path", "format folder reads a directory of class folders: set data.path=<folder>"
        if self.format == "cifar10" and self.archive is None:
            yield "archive", "format cifar10 needs its archive's name (and md5)"
        if self.format == "cifar10" and self.channels != 3:
            yield "channels", f"CIFAR-10 images are 3x32x32 (RGB): expected 3, got {self.channels}"
        if self.format == "cifar10" and self.image_size != 32:
            yield "image_size", f"CIFAR-10 images are 3x32x32: expected 32, got {self.image_size}"
        for key in ("mean", "std"):
            value = getattr(self.normalize, key)
            if isinstance(value, list) and len(value) != self.channels:
                # A dotted name is taken as complete (parse does not prefix it with "data."): say it all.
                yield f"data.normalize.{key}", f"expected one number, or {self.channels} (data.channels), got {value!r}"


@dataclass
class Paths:
    data_dir: str                       # each dataset lives in <data_dir>/<data.name>/
    output_dir: str                     # checkpoint, metrics, curves (a Hydra run sets its run folder)


@dataclass
class Runtime:
    channels_last: bool | Literal["auto"]  # see cnnlab.training.runtime.resolve_channels_last
    matmul_precision: str = one_of(("highest", "high", "medium"))
    num_threads: int | Literal["auto"] = "auto"  # see cnnlab.training.runtime
    malloc_keep_memory: bool = True

    def problems(self):
        if isinstance(self.num_threads, int) and self.num_threads < 1:
            yield "num_threads", f"expected 'auto' or an integer >= 1, got {self.num_threads!r}"


@dataclass
class Evaluate:
    batch_size: int = at_least(1)
    num_misclassified: int = at_least(0)


@dataclass
class Fetch:
    timeout_s: float = positive()


@dataclass
class Tracking:
    uri: str | None                  # null: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    experiment_name: str = field(metadata={"check": lambda v: bool(v.strip()), "allowed": "a non-empty name"})
    run_name: str
    # A tracking server that does not answer (see cnnlab.tracking.store): seconds per HTTP request, and
    # retries of a write while training (the start-up check asks once). MLflow takes whole seconds
    # and at most 10 retries.
    timeout_s: int = at_least(1, default=10)
    max_retries: int = field(default=3, metadata={"check": lambda v: 0 <= v <= 10, "allowed": "an integer in [0, 10]"})
    system_metrics_interval_s: float | None = positive(default=10)  # null: no system metrics


# --- loading -----------------------------------------------------------------------------------------

def fail(where: str, problem: str):
    raise CnnlabError(f"config {where}: {problem}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(kind) -> str:
    """How an error names a type: `int`, `null`, or a Literal's values (`'auto'`)."""
    if kind is type(None):
        return "null"
    if typing.get_origin(kind) is Literal:
        return " or ".join(map(repr, typing.get_args(kind)))
    return getattr(kind, "__name__", str(kind))


def _coerce(kind, value, where: str):
    """`value` as type `kind`, or a CnnlabError naming `where`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except CnnlabError:
                continue
        names = " or ".join(_type_name(a) for a in args)
        fail(where, f"expected {names}, got {value!r}")
    if origin is Literal:
        return value if value in args else fail(where, f"expected one of {', '.join(map(str, args))}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail(where, f"expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        return parse(kind, value, where)
    if kind is Any:
        return value
    if kind is dict:
        return value if isinstance(value, dict) else fail(where, f"expected a mapping, got {value!r}")
    if kind is int and is_int(value):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (str, bool) and isinstance(value, kind):
        return value
    fail(where, f"expected {'a number' if kind is float else 'an integer' if kind is int else 'a ' + kind.__name__}, "
                 f"got {value!r}")


def parse(cls, value, where: str):
    """Build dataclass `cls` from a plain mapping: unknown keys, types, ranges and cross-field rules."""
    if not isinstance(value, dict):
        fail(where, f"expected a mapping, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            fail(f"{where}.{key}".lstrip("."), f"unknown key; {where or 'the config'} takes {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}".lstrip(".")
        if name in value:
            kwargs[name] = _coerce(hints[name], value[name], key)
        elif f.default is not dataclasses.MISSING:
            kwargs[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs[name] = f.default_factory()
        else:
            fail(key, "missing value")
        check = f.metadata.get("check")
        if check and kwargs[name] is not None and not check(kwargs[name]):
            allowed = f.metadata["allowed"]
            fail(key, f"expected {allowed() if callable(allowed) else allowed}, got {kwargs[name]!r}")
    obj = cls(**kwargs)
    for name, problem in getattr(obj, "problems", lambda: ())():
        fail(name if "." in name else f"{where}.{name}".lstrip("."), problem)
    return obj


def _raise_resolver_error(exc: BaseException) -> None:
    """A resolver of ours (class_folders) that refused a value said so in one line: say that line,
    not OmegaConf's wrapping of it."""
    while exc is not None:
        if isinstance(exc, CnnlabError):
            raise CnnlabError(str(exc)) from None
        exc = exc.__cause__ or exc.__context__


def to_container(cfg: DictConfig | dict) -> dict:
    """Plain, fully resolved dict (no ${...} left); a missing or unresolvable value is one line."""
    if isinstance(cfg, dict):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except Exception as exc:  # omegaconf's MissingMandatoryValue, InterpolationResolutionError...
        _raise_resolver_error(exc)
        missing = re.search(r"Missing mandatory value: ([\w.]+)", str(exc))
        if missing:  # a `???` in conf/, such as data=custom's data.path
            key = missing.group(1)
            raise CnnlabError(f"config {key}: needs a value (it is ??? in conf/): add {key}=... to the "
                              f"command") from None
        raise CnnlabError(f"config: {exc}".splitlines()[0]) from None


def instantiate(key: str, node: dict, **kwargs):
    """hydra.utils.instantiate, with a failure reported as one line naming the config key."""
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except CnnlabError:
        raise
    except Exception as exc:
        cause = exc.__cause__ or exc  # Hydra wraps the real error in an InstantiationException
        if isinstance(cause, CnnlabError):  # the class checked its own arguments and said so
            raise cause from None
        raise CnnlabError(f"config {key}: {one_line(cause)}") from None


def instantiate_all(key: str, group: dict | None) -> list:
    """Each entry of a config group such as `callbacks` or `logger` (entries set to null are off)."""
    return [instantiate(f"{key}.{name}", node) for name, node in (group or {}).items() if node]


# --- helpers for the rest of cnnlab ------------------------------------------------------------------

def project_root() -> Path:
    """The cnnlab checkout runs belong to: where its MLflow store and unfinished trainings are.

    DVC runs queued experiments in temporary copies and points DVC_ROOT at the real repository,
    so the tracking store stays in one place.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    return workspace_root()


def workspace_root() -> Path:
    """The folder of the dvc.yaml at or above the current folder (the current folder if none):
    the workspace whose data and outputs a command reads and writes. In a queued DVC experiment
    that is DVC's temporary copy, where the stage's outputs must be."""
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file():
            return candidate
    return here


def project_path(path: str | os.PathLike) -> Path:
    """A config path (paths.data_dir, the Hydra run folders) as an absolute path: a relative one
    belongs to the workspace root, whatever folder a command starts in (a training started in
    conf/ must not fetch data into the `data` config group's folder)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else workspace_root() / path


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


def compose_params(overrides: list[str] | None = None) -> str:
    """conf/ composed with `overrides` and resolved, as YAML: what `dvc exp run -S` writes to params.yaml."""
    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except Exception as exc:  # Hydra's ConfigCompositionException, MissingMandatoryValue...
        _raise_resolver_error(exc)
        raise CnnlabError(f"cannot compose conf/: {exc}".splitlines()[0]) from None
    return yaml.safe_dump(OmegaConf.to_container(cfg), sort_keys=False)

