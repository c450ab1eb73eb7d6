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
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
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
