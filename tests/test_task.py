"""Tasks (cnnlab.tracking.tasks): accuracies of different tasks are never put on one scale (probe row 2).

A sigmoid head answers a binary question (model.positive_classes vs the rest); a softmax head ten
classes. compare compares within one task and lists the others apart with what differs; a
ten-class model joins a binary comparison with its summed softmax probabilities (test/binary_acc,
measured by the run); register chooses among the runs of one task. Fast: SYNTHETIC runs built
with MlflowClient, and one Lightning test pass on a hand-made network.
"""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cnnlab import cli
from cnnlab.analysis.compare import compare
from cnnlab.analysis.register import one_task
from cnnlab.core import keys
from cnnlab.core.errors import CnnlabError
from cnnlab.tracking import tasks
from cnnlab.training.heads import SigmoidHead, SoftmaxHead
from cnnlab.training.module import Classifier

POSITIVES = {f"model.positive_classes.{i}": str(c) for i, c in enumerate((0, 2, 4, 6, 8))}
CHECKSUM = "3f2a9b1c0d4e5f60"


def params(name: str, head: str = "softmax", **extra) -> dict:
    """The params a training run logs that name its task (flattened config, as MLflow keeps them)."""
    return {"model.name": name, "model.head": head, "data.name": "fashion_mnist", "data.num_classes": "10",
            **POSITIVES, **extra}


def trained_run(client, exp, name, seed, test_acc, binary_acc=None, head="softmax", task_tag=True, **extra) -> str:
    """A SYNTHETIC finished training run: no training, made-up metrics of a known value."""
    p = params(name, head, **extra)
    tags = {keys.ROLE: keys.ROLE_TRAIN, keys.DATA_NAME: "fashion_mnist", keys.DATA_CHECKSUM: CHECKSUM}
    if task_tag:  # runs older than the tag have only their params
        tags[keys.TASK] = tasks.task_id(p, CHECKSUM)
    run = client.create_run(exp, run_name=name, tags=tags)
    for key, value in {**p, "seed": str(seed)}.items():
        client.log_param(run.info.run_id, key, value)
    metrics = {keys.TEST_ACC: test_acc, keys.BEST_VAL_ACC: test_acc + 0.005, keys.PARAMS: 225_034 if "cnn" in name
               else 1000, keys.MEDIAN_EPOCH_TIME: 1.0}
    if binary_acc is not None:
        metrics[keys.TEST_BINARY_ACC] = binary_acc
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.fixture
def client(tmp_path, monkeypatch) -> MlflowClient:
    monkeypatch.chdir(tmp_path)
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_task_ids_from_params_and_what_differs():
    assert tasks.task_id(params("cnn"), CHECKSUM) == "fashion_mnist/10-class@3f2a9b1c"
    sigmoid = tasks.task_id(params("cnn_sigmoid", "sigmoid"), CHECKSUM)
    assert sigmoid == "fashion_mnist/0,2,4,6,8-vs-rest@3f2a9b1c"
    # A run older than the tag: its params and its data.checksum tag give the same id.
    assert tasks.run_task(params("cnn"), {keys.DATA_CHECKSUM: CHECKSUM}) == "fashion_mnist/10-class@3f2a9b1c"
    assert tasks.binary_view(params("cnn"), {keys.DATA_CHECKSUM: CHECKSUM}) == sigmoid
    assert tasks.binary_view(params("cnn_sigmoid", "sigmoid"), {}) is None  # binary already
    assert tasks.binary_view(params("cnn", **{"data.num_classes": "3"}), {}) is None  # positives do not fit
    assert tasks.difference("fashion_mnist/10-class@3f2a9b1c", sigmoid) == \
        "model.head asks classes 0,2,4,6,8 vs the rest (binary), not 10 classes"
    assert tasks.difference("fashion_mnist/10-class@3f2a9b1c", "mnist/10-class@00000000") == \
        "data.name mnist, not fashion_mnist"
    assert tasks.difference("mnist/10-class@3f2a9b1c", "mnist/10-class@00000000") == \
        "other data (data.checksum 00000000, not 3f2a9b1c: other files, or prepared otherwise)"


def test_the_heads_experiment_is_compared_on_the_binary_question(client, tmp_path, capsys):
    """experiment=heads: cnn (ten classes) and cnn_sigmoid (0,2,4,6,8 vs rest), two seeds each. The
    sigmoid head's 0.96 is tested against the cnn's summed softmax on the same question, never
    against the cnn's ten-class 0.90."""
    exp = client.create_experiment("heads")
    for seed, (acc, binary) in enumerate(((0.900, 0.951), (0.902, 0.953)), start=1):
        trained_run(client, exp, "cnn", seed, acc, binary)
    for seed, acc in enumerate((0.961, 0.963), start=1):
        trained_run(client, exp, "cnn_sigmoid", seed, acc, acc, head="sigmoid")
    result = compare(experiment="heads", output=tmp_path / "out")
    assert result.task == "fashion_mnist/0,2,4,6,8-vs-rest@3f2a9b1c"
    groups = {g["label"]: g for g in result.groups}
    assert set(groups) == {"cnn_sigmoid", "cnn [softmax summed]"} and result.baseline == "cnn [softmax summed]"
    assert groups["cnn [softmax summed]"]["acc"].mean == pytest.approx(0.952)
    assert groups["cnn_sigmoid"]["diff"] == pytest.approx(0.962 - 0.952)  # not +6 points against 0.901
    [ten_class] = result.other_tasks
    assert ten_class["label"] == "cnn" and ten_class["acc"].mean == pytest.approx(0.901)
    assert ten_class["reason"] == "model.head asks 10 classes, not classes 0,2,4,6,8 vs the rest (binary)"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "- Task: `fashion_mnist/0,2,4,6,8-vs-rest@3f2a9b1c`" in report and "summed" in report
    assert "## Other tasks: not on this accuracy scale" in report
    assert cli.main(["compare", "--experiment", "heads", "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "cnn_sigmoid: +1.00 points vs cnn [softmax summed]" in out
    assert "Other tasks: not on this accuracy scale" in out and "model.head asks 10 classes" in out
    # The ten-class comparison is one flag away, and is the ten-class accuracy.
    result = compare(experiment="heads", output=tmp_path / "ten", task="10-class")
    assert [(g["label"], round(g["acc"].mean, 4)) for g in result.groups] == [("cnn", 0.901)]
    assert {g["label"] for g in result.other_tasks} == {"cnn_sigmoid", "cnn [softmax summed]"}


def test_a_stray_sigmoid_run_is_listed_apart_never_ranked_with_ten_class_models(client, tmp_path):
    """The probe's default experiment: ten-class runs (one older than the task tag) and one
    cnn_sigmoid run whose binary accuracy is the highest number in the store."""
    exp = client.create_experiment("cnnlab")
    for seed, acc in enumerate((0.90, 0.91), start=1):
        trained_run(client, exp, "cnn", seed, acc, acc + 0.05)
    trained_run(client, exp, "cnn_wide", 1, 0.92, 0.97, task_tag=False, **{"model.width": "2"})
    sigmoid = trained_run(client, exp, "cnn_sigmoid", 1, 0.977, 0.977, head="sigmoid")
    result = compare(output=tmp_path / "out")
    assert result.task == "fashion_mnist/10-class@3f2a9b1c"
    assert [g["label"] for g in result.groups] == ["cnn_wide", "cnn"]  # the old run joins by its params
    assert {g["label"]: "params" in g["frontier"] for g in result.groups} == {"cnn_wide": True, "cnn": False}
    assert [(g["label"], g["run_ids"]) for g in result.other_tasks if not g["view"]] == [("cnn_sigmoid", (sigmoid,))]


def test_register_refuses_to_choose_across_tasks_and_chooses_within_one(client, tmp_path, capsys):
    exp = client.create_experiment("cnnlab")
    best_ten = trained_run(client, exp, "cnn_wide", 1, 0.92)
    trained_run(client, exp, "cnn", 1, 0.90)
    trained_run(client, exp, "cnn_sigmoid", 1, 0.977, head="sigmoid")
    assert cli.main(["register", "--name", "fashion-any"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the candidate runs solve 2 different tasks")
    assert "fashion_mnist/10-class@3f2a9b1c (10 classes: 2 runs)" in err and "choose one with --task" in err
    runs = client.search_runs([exp])
    chosen, task = one_task(runs, "10-class")
    assert task == "fashion_mnist/10-class@3f2a9b1c" and len(chosen) == 2
    with pytest.raises(CnnlabError, match="--task 3-class: matches none of the tasks of these runs: fashion_mnist/"):
        one_task(runs, "3-class")
    # Within the ten-class task the best validation accuracy wins (here registering stops at the
    # model: these synthetic runs logged none), never the binary run's higher number.
    assert cli.main(["register", "--name", "fashion-any", "--task", "10-class"]) == 1
    assert f"run {best_ten} (cnn_wide) logged no model to register" in capsys.readouterr().err


def test_every_head_logs_its_binary_accuracy_on_the_test_set():
    """test/binary_acc: a softmax model's positive classes' probabilities summed > 0.5 against
    label in positive_classes; for the sigmoid head, its own accuracy."""
    torch.manual_seed(0)
    logits = torch.randn(64, 10)
    labels = torch.randint(0, 10, (64,))
    positives = [0, 2, 4, 6, 8]
    softmax = SoftmaxHead(10, positives)
    summed = torch.softmax(logits, 1)[:, positives].sum(1)
    expected = ((summed > 0.5) == torch.isin(labels, torch.tensor(positives))).float().mean().item()
    assert torch.allclose(softmax.positive_probability(logits), summed)
    # Not the side of the argmax class: the sum can say "positive" while the likeliest class is negative.
    by_argmax = (torch.isin(logits.argmax(1), torch.tensor(positives)) == torch.isin(labels, torch.tensor(positives)))
    assert by_argmax.float().mean().item() != pytest.approx(expected)

    class Fixed(nn.Module):  # the network: looks the logits up by the image's index
        def __init__(self, table):
            super().__init__()
            self.table = table

        def forward(self, x):
            return self.table[x[:, 0].long()]

    data = DataLoader(TensorDataset(torch.arange(64).float()[:, None], labels), batch_size=16)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    [metrics] = trainer.test(Classifier(Fixed(logits), softmax, optimizer=None), data, verbose=False)
    assert metrics[keys.TEST_BINARY_ACC] == pytest.approx(expected)
    [metrics] = trainer.test(Classifier(Fixed(logits[:, :1]), SigmoidHead(10, positives), optimizer=None), data,
                             verbose=False)
    assert metrics[keys.TEST_BINARY_ACC] == pytest.approx(metrics[keys.TEST_ACC])


def test_runs_on_different_datasets_are_never_pooled(client, tmp_path):
    """Image folders are told apart by their content: two folders of one name (pets) whose files
    differ are two tasks, and so is CIFAR-10; compare ranks one task and lists the others apart."""
    exp = client.create_experiment("cnnlab")

    def run_on(data: str, checksum: str, name: str, seed: int, acc: float) -> str:
        p = {**params(name), "data.name": data, "data.path": f"/somewhere/{checksum}/{data}"}
        tags = {keys.ROLE: keys.ROLE_TRAIN, keys.DATA_NAME: data, keys.DATA_CHECKSUM: checksum,
                keys.TASK: tasks.task_id(p, checksum)}
        run = client.create_run(exp, run_name=name, tags=tags)
        for key, value in {**p, "seed": str(seed)}.items():
            client.log_param(run.info.run_id, key, value)
        for key, value in {keys.TEST_ACC: acc, keys.BEST_VAL_ACC: acc, keys.PARAMS: 1000.0,
                           keys.MEDIAN_EPOCH_TIME: 1.0}.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    pets = [run_on("pets", "aaaa1111bbbb", "cnn", seed, 0.8 + seed / 100) for seed in (1, 2, 3)]
    # The same folder after its files changed, the same seed again: another task, not a newer measurement
    edited = run_on("pets", "cccc2222dddd", "cnn", 1, 0.99)
    cifar = run_on("cifar10", "c58f30108f71", "cnn", 1, 0.6)
    result = compare(output=tmp_path / "out")
    assert result.task == "pets/10-class@aaaa1111"
    assert [sorted(g["run_ids"]) for g in result.groups] == [sorted(pets)]  # none superseded by `edited`
    apart = {r for g in result.other_tasks for r in g["run_ids"]}
    assert apart == {edited, cifar}
