"""What `dvc plots show` and `dvc exp show` show of this project: the real DVC commands in a
temporary git repository holding the project's dvc.yaml and params.yaml and the outputs an
evaluated pipeline leaves (written here, so that nothing trains)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cnnlab.core import keys
from cnnlab.core.files import csv_text
from cnnlab.training.callbacks import CURVE_FIELDS

from conftest import REPO, compose_cfg

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
CLASSES = [str(i) for i in range(10)]
PLOTS = {"learning curves (accuracy)", "learning curves (loss)", "confusion matrix (test)", "per-class F1 (test)",
         keys.MISCLASSIFIED_PNG, keys.CONFUSION_PNG}


def sh(*cmd: str, cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def write_outputs(repo: Path, n_test: int = 300, seed: int = 0) -> None:
    """The files the train and evaluate stages write, in their formats."""
    rng = np.random.default_rng(seed)
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "plots").mkdir(exist_ok=True)
    rows = [{"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 0.5 / e, "val_loss": 1.1 / e, "val_acc": 1 - 0.6 / e,
             "epoch_time_s": 10.0, "train_images_per_s": 5000.0} for e in range(1, 4)]
    (repo / keys.CURVES_CSV).write_text(csv_text(CURVE_FIELDS, rows))
    actual = rng.integers(0, 10, n_test)
    predicted = np.where(rng.random(n_test) < 0.9, actual, rng.integers(0, 10, n_test))
    (repo / keys.PREDICTIONS_CSV).write_text(csv_text(["actual", "predicted"], (
        {"actual": CLASSES[a], "predicted": CLASSES[p]} for a, p in zip(actual, predicted))))
    (repo / keys.PER_CLASS_CSV).write_text(csv_text(["class", "precision", "recall", "f1"], (
        {"class": c, "precision": 0.9, "recall": 0.9, "f1": 0.9} for c in CLASSES)))
    (repo / keys.EVAL_METRICS).write_text(json.dumps(
        {"macro_f1": rng.random(), "misclassified": int((actual != predicted).sum()), "test_size": n_test}))
    (repo / keys.TRAIN_METRICS).write_text(json.dumps(
        {keys.TEST_LOSS: rng.random(), keys.TEST_ACC: rng.random(), keys.BEST_VAL_ACC: rng.random(),
         keys.BEST_VAL_EPOCH: 3, keys.PARAMS: 225034, keys.MACS: 2631040, keys.MEDIAN_EPOCH_TIME: 10 * rng.random(),
         keys.LATENCY.format(batch=1): rng.random(), keys.PEAK_MEMORY: 1000 * rng.random()}))
    for name in (keys.MISCLASSIFIED_PNG, keys.CONFUSION_PNG):
        Image.new("L", (40, 30), 128).save(repo / name)


def write_params(repo: Path, *overrides: str) -> None:
    """params.yaml as `cnnlab params` (and `dvc exp run -S`) compose it from conf/."""
    (repo / "params.yaml").write_text(yaml.safe_dump(compose_cfg(*overrides), sort_keys=False))


def make_repo(repo: Path) -> Path:
    """A git and DVC repository with the project's pipeline, committed after a (pretend) run."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy2(REPO / name, repo / name)
    write_params(repo)
    sh("git", "init", "-q", cwd=repo)
    sh(str(BIN / "dvc"), "init", "-q", cwd=repo)
    write_outputs(repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "outputs", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("dvc-views"))


def test_dvc_yaml_defines_each_plot_once_and_only_at_the_top_level():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert all("plots" not in stage for stage in pipeline["stages"].values())
    ids = [next(iter(p)) if isinstance(p, dict) else p for p in pipeline["plots"]]
    assert sorted(ids) == sorted(PLOTS)
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in pipeline["stages"].values() for o in s.get("outs", [])]
    for path in (keys.CURVES_CSV, keys.PREDICTIONS_CSV, keys.PER_CLASS_CSV, keys.MISCLASSIFIED_PNG, keys.CONFUSION_PNG):
        assert outs.count(path) == 1, path  # still a stage's output, so `dvc repro` knows who writes it


def test_dvc_plots_show_draws_each_plot_once(dvc_repo, tmp_path):
    shown = json.loads(sh(str(BIN / "dvc"), "plots", "show", "--json", "-o", str(tmp_path / "json"), cwd=dvc_repo))
    assert set(shown["data"]) == PLOTS and shown.get("errors") is None
    html_dir = tmp_path / "html"
    sh(str(BIN / "dvc"), "plots", "show", "-o", str(html_dir), cwd=dvc_repo)
    page = (html_dir / "index.html").read_text()
    assert page.count("<img") == 2 and page.count("vegaEmbed(") == 4
    # the 300 rows of predictions.csv are in the page once, in the confusion matrix
    assert page.count('"actual": ') == 300


def test_the_offline_template_loads_vega_from_local_files(dvc_repo, tmp_path):
    """README's offline route: `dvc plots show --html-template docs/dvc-plots-offline.html` writes a
    page whose scripts are files beside it, not the CDN of DVC's default page."""
    html_dir = tmp_path / "html"
    sh(str(BIN / "dvc"), "plots", "show", "-o", str(html_dir), "--html-template",
       str(REPO / "docs" / "dvc-plots-offline.html"), cwd=dvc_repo)
    page = (html_dir / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in page and "https://" not in page.split("<body>")[0]
    scripts = re.findall(r'<script src="([^"]+)"', page)
    assert scripts == ["vega/vega.min.js", "vega/vega-lite.min.js", "vega/vega-embed.min.js"]
    assert page.count("vegaEmbed(") == 4 and page.count("<img") == 2
    readme = (REPO / "README.md").read_text()
    assert "--html-template docs/dvc-plots-offline.html" in readme


def readme_exp_show() -> list[str]:
    """The arguments of the `dvc exp show` command that the README recommends."""
    line = next(line for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("dvc exp show --") and "--drop" in line)
    return shlex.split(line.split("  #")[0])[3:]


def test_the_readmes_exp_show_shows_what_an_experiment_changes_next_to_its_metrics(tmp_path):
    """The README's `dvc exp run -S data=fashion_mnist -S optimizer.lr=3e-4` example, in the
    workspace against the committed run (an experiment's row differs from its baseline the same
    way): the recommended `dvc exp show` puts the changed values beside the accuracy."""
    repo = make_repo(tmp_path / "repo")
    write_params(repo, "data=fashion_mnist", "optimizer.lr=3e-4", "trainer.max_epochs=1")
    write_outputs(repo, seed=1)
    table = sh(str(BIN / "dvc"), "exp", "show", "--csv", *readme_exp_show(), cwd=repo)
    columns = table.splitlines()[0].split(",")
    assert columns == ["rev", "Created", keys.TEST_LOSS, keys.TEST_ACC, keys.BEST_VAL_ACC, "macro_f1", "misclassified",
                       "data.name", "optimizer.lr", "trainer.max_epochs"]
    workspace = dict(zip(columns, table.splitlines()[1].split(",")))
    assert (workspace["data.name"], workspace["optimizer.lr"]) == ("fashion_mnist", "0.0003")


def test_dvc_exp_run_composes_an_image_folder_with_its_classes(tiny_colour_folder, tmp_path):
    """`dvc exp run -S data=folder -S data.path=DIR` (README, Image folders): DVC composes conf/ in
    its own process, which knows nothing of cnnlab but the Hydra plugins it loads; the folder's
    classes and name still resolve into params.yaml, and the stages read them from there."""
    out = tmp_path / "params.yaml"
    compose = ("from dvc.utils.hydra import compose_and_dump; import sys; "
               "compose_and_dump(sys.argv[1], sys.argv[2], None, 'config', sys.argv[3], sys.argv[4:])")
    sh(sys.executable, "-c", compose, str(out), str(REPO / "conf"), str(REPO / ".dvc" / "hydra_plugins"),
       "data=folder", f"data.path={tiny_colour_folder}", cwd=tmp_path)
    data = yaml.safe_load(out.read_text())["data"]
    assert data["name"] == "shapes" and data["format"] == "folder" and data["num_classes"] == 5
    assert data["class_names"] == [f"class_{i}" for i in range(5)] and data["sources"] == [str(tiny_colour_folder)]
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["fetch"]
    assert stage["cmd"] == "python -m cnnlab.training.prepare" and "data" in stage["params"]
