"""The design notes' Keras example, as written there, trained on the same data as cnnlab.

Conv2D(32, 3x3) + ReLU -> MaxPool 2x2 -> Conv2D(64, 3x3) + ReLU -> MaxPool 2x2 -> Flatten ->
Dense(128) + ReLU -> output; Adam, batch size 32, `model.fit(..., validation_data=...)`. The
output is the multi-class case (10-way softmax, sparse categorical cross-entropy), so that it
trains what cnnlab's default does. Needs TensorFlow: `pip install -e '.[bench]'`. Prints one JSON
line with per-epoch times and throughput, like plain_loop.py.

    python benchmarks/keras_example.py [--data fashion_mnist] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

import keras  # noqa: E402  (after the log level is set)
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from cnnlab.training.idx import read_idx  # noqa: E402  (numpy only: torch and TensorFlow in one process can crash)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class EpochTimes(keras.callbacks.Callback):
    """Training time of each epoch (up to validation) and its whole time (with validation)."""

    def __init__(self):
        super().__init__()
        self.epochs: list[dict] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = self.train_end = time.perf_counter()

    def on_test_begin(self, logs=None):
        self.train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({"train_s": self.train_end - self.start, "epoch_time_s": time.perf_counter() - self.start,
                            "val_acc": float(logs.get("val_accuracy", float("nan")))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist", help="a dataset of conf/data/, fetched")
    parser.add_argument("--data-dir", default="data", help="where datasets are fetched (paths.data_dir)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        spec = OmegaConf.create(OmegaConf.to_container(compose("config", overrides=[f"data={args.data}"]).data))
    folder, norm = Path(args.data_dir) / spec.name, spec.normalize

    def arrays(prefix: str):
        x = (read_idx(folder / f"{prefix}-images-idx3-ubyte.gz").astype("float32") / 255 - norm.mean) / norm.std
        return x[..., None], read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype("int64")

    x, y = arrays("train")
    order = np.random.default_rng(spec.split_seed).permutation(len(y))  # cnnlab's split sizes
    val, train = order[:spec.val_size], order[spec.val_size:]
    x_test, y_test = arrays("t10k")

    keras.utils.set_random_seed(args.seed)
    model = keras.Sequential([
        keras.Input(shape=(spec.image_size, spec.image_size, 1)),
        keras.layers.Conv2D(32, (3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Conv2D(64, (3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(spec.num_classes, activation="softmax"),
    ])
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    times = EpochTimes()
    model.fit(x[train], y[train], batch_size=spec.batch_size, epochs=args.epochs, validation_data=(x[val], y[val]),
              callbacks=[times], verbose=0)
    test_acc = model.evaluate(x_test, y_test, batch_size=spec.eval_batch_size, verbose=0)[1]
    epochs = [{"train_images_per_s": len(train) / e["train_s"], "epoch_time_s": e["epoch_time_s"],
               "val_acc": e["val_acc"]} for e in times.epochs]
    print(json.dumps({"epochs": epochs, "test_acc": test_acc, "keras": keras.__version__,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
