"""`cnnlab register` and `cnnlab predict --model models:/...` use ONE store, the one named or the
project's, for runs and the model registry alike, from any folder; a command that only reads
never creates a store (probe rows 3 and 7). Fast: a tiny MLflow PyTorch model, no training."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from cnnlab import cli
from cnnlab.analysis.register import register
from cnnlab.core import keys
from cnnlab.core.errors import CnnlabError

CLASSES = [str(i) for i in range(10)]


class Brightest(nn.Module):
    """Pixels (N, 1, 28, 28) -> probabilities of 10 classes: class d is a bright bar on rows 2d, 2d+1
    (digit_png). A deterministic stand-in for a trained network, picklable by MLflow."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        rows = pixels.sum(dim=3)[:, 0, :20]  # (N, 20): two rows per class
        scores = rows.reshape(-1, 10, 2).sum(dim=2)
        return torch.softmax(scores * 10, dim=1)


def project_with_model(root, params: dict | None = None, tags: dict | None = None) -> tuple[str, str]:
    """A cnnlab project folder (dvc.yaml, conf/) whose mlflow.db holds one finished training run that
    logged a model: (store URI, run id)."""
    (root / "conf").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cnnlab", artifact_location=(root / "mlartifacts").as_uri())
    with mlflow.start_run(experiment_id=exp, run_name="cnn",
                          tags={keys.ROLE: keys.ROLE_TRAIN, keys.DATA_NAME: "mnist", **(tags or {})}) as run:
        mlflow.log_params({"model.head": "softmax", "data.name": "mnist", "data.num_classes": 10, "seed": 1,
                           **(params or {})})
        mlflow.log_metrics({keys.BEST_VAL_ACC: 0.9, keys.TEST_ACC: 0.89})
        example = np.zeros((3, 1, 28, 28), "float32")
        # pip_requirements given, as cnnlab's own export does: MLflow would otherwise infer them in a
        # subprocess that imports the model's code (10-20 s here).
        mlflow.pytorch.log_model(Brightest(), name=keys.MODEL_ARTIFACT, input_example=example,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], metadata={
            keys.MODEL_INPUT: keys.MODEL_INPUT_PIXELS, "class_names": CLASSES, "input_shape": [1, 28, 28]})
    return uri, run.info.run_id


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project with a registered-able run, entered from its conf/ sub-folder with no
    MLFLOW_TRACKING_URI: only the project's own mlflow.db is the store. MLflow's in-process
    tracking URI (set by conftest) points elsewhere, so a command that fell back on MLflow's
    defaults for the registry would not find the model."""
    root = tmp_path / "clone"
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    uri, run_id = project_with_model(root)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    return root, uri, run_id


def digit_png(path, digit: int):
    pixels = torch.zeros(28, 28, dtype=torch.uint8)
    pixels[2 * digit:2 * digit + 2, 4:24] = 255
    Image.fromarray(pixels.numpy()).save(path)
    return path


def test_register_from_a_sub_folder_uses_the_projects_store_for_the_registry(project, monkeypatch, capsys):
    root, uri, run_id = project
    monkeypatch.chdir(root / "conf")
    assert cli.main(["register", "--name", "digits", "--alias", "sub"]) == 0
    assert f"registered models:/digits/1 (@sub) from run {run_id}" in capsys.readouterr().out
    version = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("digits", "sub")
    assert version.run_id == run_id
    assert not (root / "conf" / "mlflow.db").exists()


def test_register_and_predict_from_elsewhere_with_tracking_uri(project, tmp_path, monkeypatch, capsys):
    root, uri, run_id = project
    elsewhere = tmp_path / "pictures"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["register", "--name", "digits", "--run", run_id, "--tracking-uri", uri]) == 0
    capsys.readouterr()
    images = [str(digit_png(elsewhere / f"d{d}.png", d)) for d in (3, 7)]
    assert cli.main(["predict", *images, "--model", "models:/digits@champion", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == ["3", "7"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["d3.png", "d7.png"]  # no mlflow.db left here


def test_predict_outside_a_project_without_a_store_is_one_line_and_creates_nothing(project, tmp_path, monkeypatch,
                                                                                    capsys):
    root, uri, run_id = project
    elsewhere = tmp_path / "pictures"
    elsewhere.mkdir()
    image = digit_png(elsewhere / "d3.png", 3)
    monkeypatch.chdir(elsewhere)
    assert cli.main(["predict", str(image), "--model", "models:/digits@champion"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {elsewhere} is not inside a cnnlab project") and err.count("\n") == 1
    assert "--tracking-uri" in err and "MLFLOW_TRACKING_URI" in err
    absent = tmp_path / "nowhere" / "mlflow.db"
    assert cli.main(["predict", str(image), "--model", "models:/digits@champion",
                     "--tracking-uri", f"sqlite:///{absent}"]) == 1
    assert capsys.readouterr().err.startswith(f"error: no MLflow store at {absent}: run from the cnnlab project")
    assert [p.name for p in elsewhere.iterdir()] == ["d3.png"] and not absent.parent.exists()


def test_read_only_commands_outside_a_project_refuse_and_create_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "mlflow.db").unlink()  # the test's own store (conftest): the folder must stay empty
    monkeypatch.chdir(tmp_path)
    for command in (["compare", "--output", str(tmp_path / "r")], ["register", "--name", "digits"]):
        assert cli.main(command) == 1
        err = capsys.readouterr().err
        assert err == f"error: {tmp_path} is not inside a cnnlab project (no dvc.yaml here or above), so there is no " \
                      f"project store: run from the cnnlab project, pass --tracking-uri, or set MLFLOW_TRACKING_URI\n"
    assert list(tmp_path.iterdir()) == []


def test_a_named_store_that_does_not_exist_is_not_created(tmp_path, monkeypatch):
    (tmp_path / "mlflow.db").unlink()  # the test's own store (conftest): the folder must stay empty
    monkeypatch.chdir(tmp_path)
    absent = tmp_path / "typo.db"
    with pytest.raises(CnnlabError, match=f"no MLflow store at {absent}: run from the cnnlab project, pass "
                                          f"--tracking-uri, or set MLFLOW_TRACKING_URI"):
        register("digits", uri=f"sqlite:///{absent}")
    assert list(tmp_path.iterdir()) == []
