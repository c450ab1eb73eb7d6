"""`cnnlab evaluate` on what users hand it: every kind of bad checkpoint is one line naming the file,
status 1 and nothing overwritten; a good one evaluates from any folder, its data found from the
checkpoint's project or given with --data-dir."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab import cli
from cnnlab.core import keys
from cnnlab.training.train import train

from conftest import compose_cfg, tiny_overrides

pytestmark = pytest.mark.train  # one in-process training, shared


@pytest.fixture(scope="module")
def project(tiny_dataset, tmp_path_factory) -> Path:
    """A trained model in a project folder (dvc.yaml at its root, data in data/, run in run/)."""
    root = tmp_path_factory.mktemp("project")
    (root / "dvc.yaml").write_text("stages: {}\n")
    overrides = [o for o in tiny_overrides(tiny_dataset, root) if not o.startswith("paths.data_dir=")]
    cwd = Path.cwd()
    os.chdir(root)  # the checkpoint records the data folder as given: relative, `data`
    try:
        train(compose_cfg(*overrides, "paths.data_dir=data", f"tracking.uri=sqlite:///{root / 'mlflow.db'}"))
    finally:
        os.chdir(cwd)
    return root


class Exploit:
    """Unpickling this would run a command: a weights-only load must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/cnnlab-pwned",))


def _bad_checkpoints(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its error line must say)."""
    state = torch.load(good, weights_only=True)
    made = {}

    def put(name, data, says):
        path = folder / f"{name}.ckpt"
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            torch.save(data, path)
        made[name] = (path, says)

    put("empty", b"", "not a complete checkpoint")
    put("truncated", good.read_bytes()[: good.stat().st_size // 2], "not a complete checkpoint")
    put("random bytes", os.urandom(4096), "not a PyTorch checkpoint")
    # Bytes that random data hits now and then (about 7% of 1000-byte files): pickle opcodes that
    # pop an empty stack (IndexError inside the unpickler) or read a memo entry never stored (KeyError).
    put("pickle ops on an empty stack", b"Nt.", "not a PyTorch checkpoint")
    put("a missing pickle memo entry", b"h\x01.", "not a PyTorch checkpoint")
    put("a pickle header, then no pickle", b"\x80\x02\xff\xfe" + os.urandom(64), "not a PyTorch checkpoint")
    put("bare state dict", state["state_dict"], "not a cnnlab checkpoint")
    put("a list", [1, 2, 3], "not a checkpoint")
    mismatched = {**state, "hyper_parameters": {"architecture": {
        **state["hyper_parameters"]["architecture"],
        "model": {**state["hyper_parameters"]["architecture"]["model"], "width": 2.0}}}}
    put("weights not matching the architecture", mismatched, "weights do not match")
    first = next(iter(state["state_dict"]))
    missing = {**state, "state_dict": {k: v for k, v in state["state_dict"].items() if k != first}}
    put("weights missing", missing, "weights do not match")
    no_data = {k: v for k, v in state.items() if k != "datamodule_hyper_parameters"}
    put("no data recorded", no_data, "records no dataset")
    put("malicious pickle", {**state, "state_dict": Exploit()}, "refused")
    path = folder / "raw-pickle.ckpt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Exploit()}, fh, protocol=4)
    made["raw pickle"] = (path, "not a PyTorch checkpoint")
    directory = folder / "directory.ckpt"
    directory.mkdir()
    made["a directory"] = (directory, "cannot read it")
    return made


BAD = ["empty", "truncated", "random bytes", "pickle ops on an empty stack", "a missing pickle memo entry",
       "bare state dict", "a list", "weights not matching the architecture",
       "weights missing", "no data recorded", "malicious pickle", "raw pickle", "a directory",
       "a pickle header, then no pickle"]


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_checkpoint_is_one_line_and_overwrites_nothing(project, tmp_path, capsys, kind):
    out = tmp_path / "out"
    (out / "metrics").mkdir(parents=True)
    (out / keys.EVAL_METRICS).write_text("previous results\n")
    path, says = _bad_checkpoints(project / "run" / keys.CHECKPOINT, tmp_path)[kind]
    code = cli.main(["evaluate", "--checkpoint", str(path), "--output-dir", str(out)])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and line.startswith(f"error: {path}") and says in line, err
    assert (out / keys.EVAL_METRICS).read_text() == "previous results\n"  # nothing overwritten
    assert sorted(p.name for p in out.rglob("*")) == ["eval.json", "metrics"]
    assert not Path("/tmp/cnnlab-pwned").exists()


@pytest.fixture
def evaluate_command(monkeypatch, capsys):
    """`cnnlab evaluate ARGS` run in folder `cwd`, in this process (the DVC stage in test_pipeline.py
    runs the real command), as a CompletedProcess."""
    def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        status = cli.main(["evaluate", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["cnnlab", "evaluate", *args], status, out, err)
    return run


def test_a_bad_checkpoint_gives_no_traceback_from_the_command(project, tmp_path, evaluate_command):
    path = tmp_path / "random.ckpt"
    path.write_bytes(os.urandom(1000))
    result = evaluate_command(tmp_path, "--checkpoint", str(path), "--output-dir", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path}: not a PyTorch checkpoint")


def test_evaluate_works_from_another_folder(project, tmp_path, evaluate_command):
    """Run from elsewhere: the checkpoint's relative data folder is found in its project."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkpoint = project / "run" / keys.CHECKPOINT
    result = evaluate_command(elsewhere, "--checkpoint", str(checkpoint), "--output-dir", str(elsewhere))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (elsewhere / keys.EVAL_METRICS).is_file() and "macro F1" in result.stdout


def test_data_dir_option_and_a_clear_error_without_data(project, tmp_path, evaluate_command):
    moved = tmp_path / "moved"
    shutil.copytree(project / "data", moved / "data")
    alone = tmp_path / "alone"  # a copy of the checkpoint with no project around it
    alone.mkdir()
    shutil.copy(project / "run" / keys.CHECKPOINT, alone / "model.ckpt")
    result = evaluate_command(alone, "--checkpoint", "model.ckpt", "--output-dir", ".")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "test data of dataset 'custom' not found" in line and "--data-dir" in line, line
    result = evaluate_command(alone, "--checkpoint", "model.ckpt", "--output-dir", ".",
                              "--data-dir", str(moved / "data"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (alone / keys.EVAL_METRICS).is_file()


@pytest.mark.parametrize("channels", [1, 3])
def test_misclassified_images_are_drawn_in_colour_or_gray_as_the_data_is(channels):
    """plots.misclassified draws (N, 3, H, W) pixels as RGB pictures and (N, 1, H, W) in gray."""
    from cnnlab.training import plots

    images = torch.rand(4, channels, 8, 8)
    images[0] += 0.01  # undoing the normalisation in float may step just outside [0, 1]
    targets, preds = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 0, 3])
    probs = torch.softmax(torch.randn(4, 4), dim=1)
    fig = plots.misclassified(images, targets, preds, probs, ["a", "b", "c", "d"], count=6)
    drawn = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(drawn) == 2  # images 0 and 2 are wrong
    for shown, i in zip(drawn, (0, 2)):
        array = np.asarray(shown.get_array())
        expected = images[i].clamp(0, 1)
        if channels == 3:
            assert array.shape == (8, 8, 3)
            np.testing.assert_allclose(array, expected.permute(1, 2, 0).numpy(), atol=1e-6)
        else:
            assert array.shape == (8, 8) and shown.get_cmap().name == "gray" and shown.get_clim() == (0, 1)
            np.testing.assert_allclose(array, expected[0].numpy(), atol=1e-6)
    assert plots.png(fig).startswith(b"\x89PNG")
