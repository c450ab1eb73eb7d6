"""Shared fixtures: a tiny, learnable MNIST-format dataset written as real gzip IDX files, and
composed configs pointing at it. Nothing here touches the network or /usr/share/datasets.

Tiers (README, Tests): every test is `fast` (no training in a subprocess, no server: the edit
loop, `make test-fast`) unless marked `train` (in-process trainings on tiny data) or `e2e` (real
`dvc repro`, sweeps, kills, servers, clusters, DDP, a browser). `make test` runs them in that
order. `@pytest.mark.needs(...)` names what a test needs besides Python packages of the project;
a machine without it skips the test and says why. `@pytest.mark.gpu` marks a test that needs a CUDA
GPU (its tier still applies): skipped, with the reason, where torch finds none, but failed when
CNNLAB_REQUIRE_GPU=1 (a GPU machine whose torch cannot use its GPU must not pass by skipping)."""

from __future__ import annotations

import contextlib
import glob
import gzip
import importlib.util
import io
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cnnlab.core.config import CONF_DIR
from cnnlab.training.idx import write_idx

REPO = CONF_DIR.parent
TIERS = ("fast", "train", "e2e")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# What a test may need, how to tell whether this machine has it, and how to get it.
CLUSTER_EXTRA = "the cluster extra (pip install -e '.[cluster]')"
NEEDS = {
    "chromium": (lambda: shutil.which("chromium") is not None, "Chromium (apt-get install chromium)"),
    "playwright": (lambda: _importable("playwright"), "playwright (pip install -e '.[ui]')"),
    "postgresql": (lambda: bool(glob.glob("/usr/lib/postgresql/*/bin/initdb")),
                   "PostgreSQL (apt-get install postgresql)"),
    "server": (lambda: _importable("psycopg2") and _importable("flask_wtf"),
               "the server extra (pip install -e '.[server]')"),
    "slurm": (lambda: all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")),
              "SLURM (apt-get install slurmctld slurmd slurm-client munge)"),
    "submitit": (lambda: _importable("hydra_plugins.hydra_submitit_launcher"), CLUSTER_EXTRA),
    "ray": (lambda: _importable("ray") and _importable("hydra_plugins.hydra_ray_launcher"), CLUSTER_EXTRA),
}
REQUIRE_GPU = "CNNLAB_REQUIRE_GPU"  # =1: a `gpu` test fails, not skips, where torch finds no CUDA GPU


def _gpu_required() -> bool:
    return os.environ.get(REQUIRE_GPU) == "1"


def _no_gpu_reason() -> str:
    import torch

    return (f"torch {torch.__version__} finds no CUDA GPU (built for CUDA {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r})")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*what): skipped, with the reason, on a machine without it: "
                                       + ", ".join(NEEDS))


def pytest_collection_modifyitems(config, items):
    """Unmarked tests are `fast`; the run goes fast, train, e2e (file order kept within each)."""
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS[1:]):
            item.add_marker(pytest.mark.fast)
    items.sort(key=lambda item: next(i for i, tier in enumerate(TIERS) if item.get_closest_marker(tier)))


def pytest_runtest_setup(item):
    for marker in item.iter_markers("needs"):
        for what in marker.args:
            present, source = NEEDS[what]
            if not present():
                pytest.skip(f"needs {source}")
    if item.get_closest_marker("gpu") and not _gpu_required() and not _cuda():
        pytest.skip(f"needs a CUDA GPU: {_no_gpu_reason()} (with {REQUIRE_GPU}=1 this fails instead)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    """A `gpu` test under CNNLAB_REQUIRE_GPU=1 on a machine where torch finds no GPU fails here,
    before its body runs (so it is reported as failed, not as an error in a fixture)."""
    if item.get_closest_marker("gpu") and _gpu_required() and not _cuda():
        pytest.fail(f"{REQUIRE_GPU}=1 but {_no_gpu_reason()}: check the driver (nvidia-smi) "
                    f"and that torch is a CUDA build", pytrace=False)
FILE_NAMES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
              "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}


def make_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """28x28 uint8 images whose class is a bright bar at a class-specific row, plus noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row = 3 + 2 * int(label)
        images[i, row:row + 2, 4:24] = 255
    return images


def write_dataset(folder: Path, n_train: int = 400, n_test: int = 100, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(folder / FILE_NAMES[f"{split}_images"], make_images(labels, seed + n))
        write_idx(folder / FILE_NAMES[f"{split}_labels"], labels)
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A folder with the four IDX gzip files of a 400/100-image, 10-class dataset."""
    return write_dataset(tmp_path_factory.mktemp("tiny-idx"))


def compose_cfg(*overrides: str, resolve: bool = True):
    """conf/ composed with overrides: a resolved dict, or the raw DictConfig with resolve=False."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True) if resolve else cfg


# What conf/debug/smoke.yaml leaves out, put back for the tests that check what it logs: the
# MLflow model, and the model's costs (latency timed briefly).
MODEL = "callbacks.mlflow_model={_target_:cnnlab.training.callbacks.LogMLflowModel}"
PROFILE = ("callbacks.model_profile={_target_:cnnlab.training.callbacks.ModelProfile,latency_batch_sizes:[1,256],"
           "latency_min_run_time_s:0.01}")


def tiny_overrides(dataset: Path, workdir: Path, model: bool = False, profile: bool = False) -> list[str]:
    """Overrides that train on the tiny dataset quickly (conf/debug/smoke.yaml: one fp32 epoch, one
    thread), keeping data under `workdir`; with the MLflow model and the model profile if asked."""
    return ["data=custom", f"data.path={dataset}", "data.val_size=100", f"paths.data_dir={workdir / 'data'}",
            f"paths.output_dir={workdir / 'run'}", "debug=smoke", *([MODEL] if model else []),
            *([PROFILE] if profile else [])]


COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230], [230, 210, 40], [200, 60, 220]], dtype=np.uint8)


def write_image_folder(folder: Path, per_class: int = 60, size: int = 32, seed: int = 0) -> Path:
    """A learnable colour image folder, DIR/<class>/<n>.png: each class is a small square of its own
    colour (tinted at random) anywhere on a noisy background, hard enough that two epochs on it do
    not reach every seed to 100% (PNG files of the real format, as Pillow writes them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = size // 4
    for label, colour in enumerate(COLOURS):
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels = rng.integers(0, 90, size=(size, size, 3)).astype(np.uint8)
            top, left = (int(v) for v in rng.integers(0, size - side, 2))  # anywhere: not learnt in one step
            tint = np.clip(colour.astype(int) + rng.integers(-30, 30, 3), 0, 255)
            pixels[top:top + side, left:left + side] = tint
            Image.fromarray(pixels, "RGB").save(folder / f"class_{label}" / f"{n:03d}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_colour_folder(tmp_path_factory) -> Path:
    """A 5-class folder of 60 RGB 32x32 PNG images per class (no train/test split of its own)."""
    return write_image_folder(tmp_path_factory.mktemp("tiny-colour") / "shapes")


def tiny_colour_overrides(folder: Path, workdir: Path, profile: bool = False) -> list[str]:
    """tiny_overrides for the colour image folder: 3x32x32, 48 images per class to train and
    validate on, 12 to test."""
    return ["data=folder", f"data.path={folder}", "data.val_size=40", f"paths.data_dir={workdir / 'data'}",
            f"paths.output_dir={workdir / 'run'}", "debug=smoke", *([PROFILE] if profile else [])]


@pytest.fixture
def train_command(monkeypatch, capsys):
    """`python -m cnnlab.train ARGS` run in this process, in folder `cwd`, as a CompletedProcess. For the
    command's answers to bad input: a fresh interpreter would spend 10-15 s importing torch and
    Lightning for one line (tests in the e2e tier cross the process boundary)."""
    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        from cnnlab.training import train

        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["cnnlab.training.train", *args])
        capsys.readouterr()
        try:
            train.check_group_choices(list(args))
            train.main()
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["cnnlab.training.train", *args], status, out, err)
    return run


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty SQLite store with MLflow's tables, made once per session: creating them runs MLflow's
    schema migrations (1-2 s), which every test would pay again (MLflow's own suite does the same)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("migrated") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, tmp_path_factory, monkeypatch, migrated_store):
    """Every test gets its own SQLite store (a copy of the migrated one), so runs never leak into
    the developer's mlflow.db, nor from one test into another; and its own user cache (cnnlab's
    record of verified data files), inherited by the processes it starts, never ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    shutil.copyfile(migrated_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # MLflow's in-process setting outranks the variable
    # The registry follows the tracking URI unless set: a test that set it in-process (cnnlab predict's
    # main does, for its one run) must not point the next test's registry at its store.
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_registry_uri(None)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
    """Stop a process started with start_new_session=True and everything in its group (a server's
    workers), nothing else; SIGKILL if it has not ended within timeout_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def http_server(cmd: list[str], url: str, log_path: Path, *, ready: str = "/health", answer: bytes | None = b"OK",
                cwd: Path | None = None, env: dict | None = None, startup_s: float = 90, name: str = "server"):
    """A server process, started in its own process group with its output in `log_path`, waited
    for until GET url+ready answers (with `answer`, if given), given what a loaded 2-core machine
    needs to start it; yields the process; stopped (its whole group) after."""
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if server.poll() is not None:
                raise AssertionError(f"{name} exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}{ready}", timeout=2) as response:
                    if answer is None or response.read().strip() == answer:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not ready after {startup_s} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        if server.poll() is None:
            stop_group(server)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, workdir: Path, startup_s: float = 90):
    """A real `mlflow server` on 127.0.0.1 over `backend_uri`; yields (base URL, process)."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend_uri,
           "--default-artifact-root", (workdir / "mlartifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    base_url = f"http://127.0.0.1:{port}"
    # MLflow 3's job runner (GenAI jobs; cnnlab sends none) would start six more processes that each
    # import MLflow: seconds of both cores at every server start.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with http_server(cmd, base_url, workdir / f"mlflow-server-{port}.log", cwd=workdir, env=env, startup_s=startup_s,
                     name="mlflow server") as server:
        yield base_url, server


# ----------------------------------------------------------------------------- CIFAR-10 archives

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_FOLDER = "cifar-10-batches-py"
# One colour a class: the bar that makes a tiny CIFAR-format image learnable.
CIFAR_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                          [255, 128, 0], [128, 0, 255], [255, 255, 255], [128, 128, 128]], dtype=np.uint8)
_NP_RECONSTRUCT = np.empty(0).__reduce__()[0]


class _Py2Pickler(pickle._Pickler):
    """Pickles as the official CIFAR-10 archive's were made (Python 2's cPickle, protocol 2): str and
    bytes as Python 2 byte strings (which Python 3 reads as bytes with encoding="bytes"), numpy's
    array rebuilder under its numpy 1 module name."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_string(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string

    def save_global(self, obj, name=None) -> None:
        if obj is _NP_RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """CIFAR-10 rows (N x 3072 uint8: the red 32x32 plane, then green, then blue): noise, and a bar
    of the class's colour at the class's own rows."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), 3, 32, 32)).astype(np.uint8)
    for i, label in enumerate(labels):
        row = 1 + 3 * int(label)
        images[i, :, row:row + 3, 4:28] = CIFAR_COLOURS[label][:, None, None]
    return images.reshape(len(labels), 3072)


def cifar_batches(n_train_per_batch: int = 10, n_test: int = 10, seed: int = 0) -> dict[str, dict]:
    """The dicts of a tiny CIFAR-10 archive, by member name (data_batch_1..5, test_batch,
    batches.meta), with the official archive's keys (bytes)."""
    rng = np.random.default_rng(seed)
    batches = {}
    for index, (member, n) in enumerate([*((f"data_batch_{i}", n_train_per_batch) for i in range(1, 6)),
                                         ("test_batch", n_test)]):
        labels = rng.permutation(np.arange(n) % 10)
        batches[member] = {b"batch_label": f"{member} of 6".encode(), b"labels": [int(v) for v in labels],
                           b"data": cifar_images(labels, seed + 1 + index),
                           b"filenames": [f"{member}_{i:05d}.png".encode() for i in range(n)]}
    batches["batches.meta"] = {b"label_names": [n.encode() for n in CIFAR_CLASSES],
                               b"num_cases_per_batch": n_train_per_batch, b"num_vis": 3072}
    return batches


def pack_cifar_archive(path: Path, members: dict[str, bytes]) -> Path:
    """A gzip tar laid out as the official archive (a cifar-10-batches-py/ folder holding
    `members`, and its readme.html), byte for byte the same for the same members."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        folder = tarfile.TarInfo(CIFAR_FOLDER)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, data in {"readme.html": b"<html></html>\n", **members}.items():
            info = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def write_cifar_archive(path: Path, n_train_per_batch: int = 10, n_test: int = 10, seed: int = 0) -> Path:
    """A tiny, learnable archive of the real CIFAR-10 format at `path` (cifar-10-python.tar.gz):
    5 x n_train_per_batch training and n_test test images, 3x32x32, classes in balance; the same
    bytes (and MD5) for the same arguments. cifar_batches(...) gives what it holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = {name: py2_pickle(batch) for name, batch in cifar_batches(n_train_per_batch, n_test, seed).items()}
    return pack_cifar_archive(path, members)
