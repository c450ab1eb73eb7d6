"""The DVC remote (.dvc/config, docs/dvc-remote.md): one checkout runs the pipeline and `dvc push`es;
a teammate's fresh `git clone` runs `dvc pull` and gets the same data and checkpoint, and its
`dvc repro` has nothing to do."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from test_pipeline import BIN, copy_repo, run, train_outside_dvc

from conftest import tiny_overrides

pytestmark = pytest.mark.e2e
DVC = str(BIN / "dvc")
# What a user commits after `dvc repro`: the lock, the params it ran, and the stages' uncached outs.
COMMITTED = ["dvc.lock", "params.yaml", "metrics", "plots", "models/.gitignore", "models/mlflow_run.json"]


def git(*args: str, cwd: Path) -> str:
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd, dict(os.environ)).stdout


def project_env(repo: Path) -> dict:
    """What the stages need in `repo`: its own code (so bytecode caches land where DVC hashes the
    code, and .dvcignore is what keeps them out), and MLflow's project default store."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo / "src")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("MLFLOW_TRACKING_URI")
    return env


def remote_url(repo: Path, env: dict) -> str:
    """The default remote's url, as DVC resolves it (relative urls are relative to .dvc/)."""
    assert run([DVC, "config", "core.remote"], repo, env).stdout.strip() == "storage"
    return run([DVC, "config", "remote.storage.url"], repo, env).stdout.strip()


def remote_object(storage: Path, md5: str) -> Path:
    return storage / "files" / "md5" / md5[:2] / md5[2:]  # DVC 3's layout of a local remote


def test_push_then_pull_in_a_fresh_clone(tiny_dataset, tmp_path, train_command):
    # Checkouts side by side on one file server: the committed default remote is the folder next to them.
    share = tmp_path / "share"
    share.mkdir()
    repo = copy_repo(share / "cnnlab")
    env = project_env(repo)
    storage = share / "cnnlab-dvc-storage"
    assert remote_url(repo, env) == str(storage)

    overrides = [o for o in tiny_overrides(tiny_dataset, repo) if not o.startswith("paths.")]
    run([str(BIN / "cnnlab"), "params", *overrides], repo, env)
    first = run([DVC, "repro"], repo, env)
    for stage in ("fetch", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    git("add", *COMMITTED, cwd=repo)
    git("commit", "-qm", "tiny run", cwd=repo)
    # Everything else the run wrote is git-ignored: the DVC-cached outs, the MLflow store, bytecode.
    assert git("status", "--porcelain", "--untracked-files=all", cwd=repo) == ""
    tracked = git("ls-files", cwd=repo).split()
    assert "models/model.ckpt" not in tracked and not [f for f in tracked if f.startswith("data/")]
    run([DVC, "push"], repo, env)

    # The remote holds each data file and the checkpoint, under the md5 dvc.lock records.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    (data_out,) = lock["fetch"]["outs"]
    assert data_out["path"] == "data/custom" and data_out["md5"].endswith(".dir")
    listing = json.loads(remote_object(storage, data_out["md5"]).read_text())
    data_files = sorted(p.relative_to(repo / "data/custom").as_posix()
                        for p in (repo / "data/custom").rglob("*") if p.is_file())
    assert sorted(entry["relpath"] for entry in listing) == data_files
    assert {"manifest.json", "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"} <= set(data_files)
    for entry in listing:
        pushed = remote_object(storage, entry["md5"]).read_bytes()
        assert pushed == (repo / "data/custom" / entry["relpath"]).read_bytes()
    (ckpt_out,) = [o for o in lock["train"]["outs"] if o["path"] == "models/model.ckpt"]
    assert remote_object(storage, ckpt_out["md5"]).read_bytes() == (repo / "models/model.ckpt").read_bytes()

    # A teammate whose checkout is elsewhere: clone, point the remote at the share for themselves
    # (.dvc/config.local, which git ignores and a clone never gets), pull.
    clone = tmp_path / "laptop" / "cnnlab"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    clone_env = project_env(clone)
    assert not (clone / ".dvc" / "config.local").exists()
    assert remote_url(clone, clone_env) == str(tmp_path / "laptop" / "cnnlab-dvc-storage")  # the default, here
    assert not (clone / "models/model.ckpt").exists() and not (clone / "data").exists()
    run([DVC, "remote", "modify", "--local", "storage", "url", str(storage)], clone, clone_env)
    assert remote_url(clone, clone_env) == str(storage)
    run([DVC, "pull"], clone, clone_env)

    for name in [*(f"data/custom/{f}" for f in data_files), "models/model.ckpt"]:
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name
    assert "up to date" in run([DVC, "status"], clone, clone_env).stdout
    # The pulled files have new mtimes; a training outside DVC on them writes nothing into data/.
    train_outside_dvc(train_command, tiny_dataset, clone, tmp_path / "outside")
    assert "Data and pipelines are up to date." in run([DVC, "status"], clone, clone_env).stdout
    assert "in sync" in run([DVC, "status", "--cloud"], clone, clone_env).stdout
    again = run([DVC, "repro"], clone, clone_env)
    assert "Running stage" not in again.stdout
    # Nothing was rerun: no stage opened MLflow (the clone has no store; mlflow.db is not in git),
    # nothing tracked changed, and the local remote setting stayed out of git.
    assert not (clone / "mlflow.db").exists()
    assert git("status", "--porcelain", "--untracked-files=all", cwd=clone) == ""
