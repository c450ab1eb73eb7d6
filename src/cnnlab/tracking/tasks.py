"""What task a run solves, so that accuracies are only ever put on one scale.

A run's test accuracy means something only against runs of the same task: the same data (by
name and by the checksum of the files read, which fixes the test set), and the same question
asked of it. A softmax head answers "which of the K classes" (`10-class`); the sigmoid head
answers "is it one of model.positive_classes" (`0,2,4,6,8-vs-rest`), where always answering
the larger side already scores about half. The task is recorded on every training run as the
tag keys.TASK (`fashion_mnist/10-class@3f2a9b1c`); `task_id` derives the same text from the
params and the data.checksum tag of a run older than the tag.

A softmax model answers the binary question too: the probabilities of the positive classes
summed are the probability of "positive". Every training run logs that accuracy as
keys.TEST_BINARY_ACC (cnnlab.training.module), so that `cnnlab compare` can put a ten-class model on the
scale of a sigmoid head trained for that binary question (`binary_view`).
"""

from __future__ import annotations

from collections.abc import Mapping

from cnnlab.core import keys

UNKNOWN = "unknown"


def positive_classes(params: Mapping[str, object]) -> list[int]:
    """model.positive_classes from a run's flattened params (`model.positive_classes.0` ...)."""
    prefix = "model.positive_classes."
    found = sorted((int(k[len(prefix):]), int(str(v))) for k, v in params.items()
                   if k.startswith(prefix) and k[len(prefix):].isdigit())
    return sorted({v for _, v in found})


def question(head: str, num_classes: object, positives: list[int]) -> str:
    """The question a head asks of the data: `10-class`, or `0,2,4,6,8-vs-rest`."""
    if head == "sigmoid":
        return f"{','.join(map(str, positives)) or '?'}-vs-rest"
    return f"{num_classes or '?'}-class"


def make_id(data: str, question_: str, checksum: str | None) -> str:
    return f"{data or UNKNOWN}/{question_}@{(checksum or UNKNOWN)[:8]}"


def task_id(params: Mapping[str, object], checksum: str | None) -> str:
    """The task of a run, from its flattened config (or MLflow params) and its data's checksum."""
    head = str(params.get("model.head") or "softmax")
    return make_id(str(params.get("data.name") or ""), question(head, params.get("data.num_classes"),
                                                                positive_classes(params)), checksum)


def run_task(params: Mapping[str, str], tags: Mapping[str, str]) -> str:
    """A run's task: its tag, or for a run older than the tag, derived from what it logged."""
    return tags.get(keys.TASK) or task_id({keys.DATA_NAME: tags.get(keys.DATA_NAME), **params},
                                          tags.get(keys.DATA_CHECKSUM))


def binary_view(params: Mapping[str, str], tags: Mapping[str, str]) -> str | None:
    """The binary task a softmax run's summed probabilities answer (its model.positive_classes
    against the rest), or None for a run that is binary already or has no positive classes."""
    if str(params.get("model.head") or "softmax") != "softmax":
        return None
    positives, labels = positive_classes(params), str(params.get("data.num_classes", ""))
    # As heads.SoftmaxHead: positive classes that do not fit the labels, or all of them, ask nothing.
    if not positives or not labels.isdigit() or max(positives) >= int(labels) or len(positives) == int(labels):
        return None
    data, _, checksum = split(run_task(params, tags))
    return f"{data}/{question('sigmoid', None, positives)}@{checksum}"


def split(task: str) -> tuple[str, str, str]:
    """`data/question@checksum` -> (data, question, checksum)."""
    data, _, rest = task.partition("/")
    question_, _, checksum = rest.rpartition("@")
    return data, question_, checksum


def difference(task: str, other: str) -> str:
    """Which part of `other` differs from `task`, in words naming the keys: the reason a run of
    `other` is not compared with runs of `task`."""
    mine, theirs = split(task), split(other)
    parts = []
    if mine[0] != theirs[0]:
        parts.append(f"data.name {theirs[0]}, not {mine[0]}")
    if mine[1] != theirs[1]:
        parts.append(f"model.head asks {describe(theirs[1])}, not {describe(mine[1])}")
    if mine[0] == theirs[0] and mine[2] != theirs[2]:
        # the files, or (an image folder) how they were prepared: channels, size, split
        parts.append(f"other data (data.checksum {theirs[2]}, not {mine[2]}: other files, or prepared "
                     f"otherwise)")
    return "; ".join(parts) or "same task"


def describe(question_: str) -> str:
    """`10-class` -> `10 classes (softmax)`; `0,2-vs-rest` -> `classes 0,2 vs the rest (binary)`."""
    if question_.endswith("-vs-rest"):
        return f"classes {question_.removesuffix('-vs-rest')} vs the rest (binary)"
    count = question_.removesuffix("-class")
    return f"{count} classes" if count.isdigit() else "classes (their number not recorded)"


def matches(task: str, wanted: str) -> bool:
    """Does `--task wanted` name `task`: the whole id, the id without its checksum, or the question."""
    data, question_, _ = split(task)
    return wanted in (task, f"{data}/{question_}", question_)
