"""Shared fixtures: a tiny, learnable MNIST-format dataset written as real gzip IDX files, and
composed configs pointing at it. Nothing here touches the network or /usr/share/datasets."""

from __future__ import annotations

import contextlib
import os
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

from cnnlab.config import CONF_DIR
from cnnlab.idx import write_idx

REPO = CONF_DIR.parent
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


def tiny_overrides(dataset: Path, workdir: Path) -> list[str]:
    """Overrides that train on the tiny dataset quickly, keeping data under `workdir`."""
    return ["data=custom", f"data.path={dataset}", "data.val_size=100", f"paths.data_dir={workdir / 'data'}",
            f"paths.output_dir={workdir / 'run'}", "trainer.max_epochs=1", "trainer.accelerator=cpu",
            "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false",
            "callbacks.model_profile.latency_min_run_time_s=0.01"]


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch):
    """Every test gets its own SQLite store, so runs never leak into the developer's mlflow.db."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # MLflow's in-process setting outranks the variable
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
    with http_server(cmd, base_url, workdir / f"mlflow-server-{port}.log", cwd=workdir, startup_s=startup_s,
                     name="mlflow server") as server:
        yield base_url, server
