"""The reference a tracked training is measured against: a plain PyTorch loop, nothing else.

Same network (built by cnnlab.training.network from conf/model/), same data (the IDX files of a fetched
dataset, normalised the same way, the same 55,000/5,000 split size), same optimizer, batch size
and precision as `cnnlab train`; but no Lightning, no logging, no callbacks, no checkpoint. Each
epoch trains, then measures validation accuracy, as cnnlab's epochs do; the test set is scored
once at the end. Prints one JSON line with the per-epoch times and throughput, peak host memory
(RSS) and, on CUDA, peak device memory (torch.cuda.max_memory_allocated).

On a GPU it also does what cnnlab's defaults do there: cuDNN autotuning (trainer.benchmark: auto),
Adam's fused kernel (optimizer.fused: auto; `--optimizer-fused`), and cuDNN's TF32 following the
matmul precision (runtime.matmul_precision: highest, so off). `--precision 16-mixed` adds a
GradScaler, as Lightning does. `--compile` trains through torch.compile(mode="reduce-overhead")
(CUDA graphs on a GPU); the steps that compile (the first of each batch shape) are timed apart
(`compile_s`) and left out of the epochs' images/s.

    python benchmarks/plain_loop.py [--data fashion_mnist] [--epochs 2] [--precision bf16-mixed] [--compile]
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

from cnnlab.core.config import CONF_DIR
from cnnlab.training.config import load
from cnnlab.training.heads import build_head
from cnnlab.training.idx import read_idx
from cnnlab.training.network import build_network
from cnnlab.training.runtime import keep_freed_memory


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
    parser.add_argument("--data-path", default=None, help="data=custom: the folder its IDX files came from")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"],
                        help="16-mixed: float16 autocast with a GradScaler (a GPU's; slow on a CPU)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: PyTorch's default)")
    parser.add_argument("--malloc-keep-memory", action="store_true", help="glibc tuning, as cnnlab's runtime")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--optimizer-fused", default="auto", choices=["auto", "true", "false"],
                        help="Adam's fused kernel: auto = on CUDA, as cnnlab's optimizer.fused: auto")
    parser.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"],
                        help="as cnnlab's runtime.matmul_precision (cuDNN's TF32 follows it)")
    parser.add_argument("--compile", action="store_true",
                        help='train through torch.compile(mode="reduce-overhead")')
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_keep_memory:
        keep_freed_memory()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = load(compose("config", overrides=[f"data={args.data}", f"model={args.model}", "model.head=softmax",
                                                   *([f"data.path={args.data_path}"] if args.data_path else [])]))
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
    cuda = device.type == "cuda"
    torch.set_float32_matmul_precision(args.matmul_precision)
    if cuda:  # as cnnlab's runtime and trainer.benchmark: auto
        torch.backends.cudnn.allow_tf32 = args.matmul_precision != "highest"
        torch.backends.cudnn.benchmark = True
    x_train, y_train, x_val, y_val, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_val, y_val,
                                                                              x_test, y_test))
    head = build_head(config.model, spec.num_classes)
    net = build_network(config.model, 1, spec.image_size, head.num_outputs)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=memory_format)
    fused = {"auto": cuda, "true": True, "false": False}[args.optimizer_fused]
    optimizer = torch.optim.Adam(net.parameters(), lr=config.optimizer["lr"], **({"fused": True} if fused else {}))
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    # float16 needs its loss scaled; with the fused Adam the scaler's found_inf stays on the device
    # (no host read per step), as under Lightning's 16-mixed with cnnlab's fused optimizer
    scaler = torch.amp.GradScaler(device.type) if args.precision == "16-mixed" else None

    def step_loss(xb, yb):
        return head.loss(net(xb), yb)

    if args.compile:
        step_loss = torch.compile(step_loss, mode="reduce-overhead", dynamic=False)
    shapes_seen: set[int] = set()
    compile_s = 0.0

    epochs = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(y_train), device=device)
        steps = 0
        compiling_s = compiled_images = 0  # this epoch's steps that compiled: timed apart
        for i in range(0, len(perm), spec.batch_size):
            idx = perm[i:i + spec.batch_size]
            xb = x_train[idx].contiguous(memory_format=memory_format)
            first_of_shape = args.compile and len(idx) not in shapes_seen
            if first_of_shape:
                if cuda:
                    torch.cuda.synchronize()
                began = time.perf_counter()
            if args.compile and cuda:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten
            with autocast:
                loss = step_loss(xb, y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if first_of_shape:
                if cuda:
                    torch.cuda.synchronize()
                shapes_seen.add(len(idx))
                compiling_s += time.perf_counter() - began
                compiled_images += len(idx)
            steps += 1
            if steps == args.max_steps:
                break
        if cuda:
            torch.cuda.synchronize()  # the only sync of the epoch: its steps were queued without one
        train_s = time.perf_counter() - start - compiling_s
        compile_s += compiling_s
        val_acc = accuracy(net, x_val, y_val, spec.eval_batch_size, autocast)
        images = min(len(perm), steps * spec.batch_size) - compiled_images
        epochs.append({"train_images_per_s": images / max(train_s, 1e-9),
                       "epoch_time_s": time.perf_counter() - start, "val_acc": val_acc, "train_loss": loss.item()})
    result = {"epochs": epochs, "test_acc": accuracy(net, x_test, y_test, spec.eval_batch_size, autocast),
              "threads": torch.get_num_threads(), "device": str(device), "precision": args.precision,
              "optimizer_fused": fused, "compile": args.compile, "compile_s": round(compile_s, 2),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda:
        result["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
