"""The reference a tracked training is measured against: a plain PyTorch loop, nothing else.

Same network (built by cnnlab.network from conf/model/), same data (the IDX files of a fetched
dataset, normalised the same way, the same 55,000/5,000 split size), same optimizer, batch size
and precision as `cnnlab train`; but no Lightning, no logging, no callbacks, no checkpoint. Each
epoch trains, then measures validation accuracy, as cnnlab's epochs do; the test set is scored
once at the end. Prints one JSON line with the per-epoch times and throughput.

    python benchmarks/plain_loop.py [--data fashion_mnist] [--epochs 2] [--precision bf16-mixed]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from cnnlab.config import CONF_DIR, load
from cnnlab.heads import build_head
from cnnlab.idx import read_idx
from cnnlab.network import build_network
from cnnlab.runtime import keep_freed_memory


def tensors(folder: Path, split: str, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.copy()).float().div_(255).sub_(mean).div_(std).unsqueeze(1)
    return x, torch.from_numpy(labels.astype("int64"))


def accuracy(net, x, y, batch_size: int, autocast) -> float:
    net.eval()
    correct = 0
    with torch.no_grad(), autocast:
        for i in range(0, len(y), batch_size):
            correct += (net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    net.train()
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist", help="a dataset of conf/data/, fetched")
    parser.add_argument("--data-dir", default="data", help="where datasets are fetched (paths.data_dir)")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: PyTorch's default)")
    parser.add_argument("--malloc-keep-memory", action="store_true", help="glibc tuning, as cnnlab's runtime")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_keep_memory:
        keep_freed_memory()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = load(compose("config", overrides=[f"data={args.data}", f"model={args.model}",
                                                          "model.head=softmax"]))
    spec = config.data
    torch.manual_seed(args.seed)
    folder, norm = Path(args.data_dir) / spec.name, spec.normalize
    x, y = tensors(folder, "train", norm.mean, norm.std)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(spec.split_seed))
    val, train = order[:spec.val_size], order[spec.val_size:]
    (x_val, y_val), (x_train, y_train) = (x[val], y[val]), (x[train], y[train])
    x_test, y_test = tensors(folder, "test", norm.mean, norm.std)

    # On a GPU everything lives there, as in cnnlab: the data, the model and each epoch's order.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x_train, y_train, x_val, y_val, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_val, y_val,
                                                                              x_test, y_test))
    head = build_head(config.model, spec.num_classes)
    net = build_network(config.model, 1, spec.image_size, head.num_outputs)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.optimizer["lr"])
    bf16 = args.precision == "bf16-mixed"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    epochs = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(y_train), device=device)
        steps = 0
        for i in range(0, len(perm), spec.batch_size):
            idx = perm[i:i + spec.batch_size]
            xb = x_train[idx].contiguous(memory_format=memory_format)
            with autocast:
                loss = head.loss(net(xb), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == args.max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()  # the only sync of the epoch: its steps were queued without one
        train_s = time.perf_counter() - start
        val_acc = accuracy(net, x_val, y_val, spec.eval_batch_size, autocast)
        epochs.append({"train_images_per_s": min(len(perm), steps * spec.batch_size) / train_s,
                       "epoch_time_s": time.perf_counter() - start, "val_acc": val_acc, "train_loss": loss.item()})
    result = {"epochs": epochs, "test_acc": accuracy(net, x_test, y_test, spec.eval_batch_size, autocast),
              "threads": torch.get_num_threads(), "device": str(device),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
