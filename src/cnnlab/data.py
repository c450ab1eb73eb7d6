"""In-memory MNIST-style data: IDX gzip -> tensors -> batches drawn by index.

The whole dataset (60k 28x28 images is ~190 MB as float32) lives in one tensor, and each batch
is a single fancy-index `x[idx]`: no per-sample __getitem__, no collate, no worker processes.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from cnnlab import CnnlabError


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX ubyte file (gzip or plain) into a uint8 array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise CnnlabError(f"{path}: not an IDX ubyte file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(shape):
        raise CnnlabError(f"{path}: IDX header says {shape} but holds {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file (tests and custom datasets use it)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


class IndexedTensors(Dataset):
    """Dataset whose items are whole batches: __getitem__ takes a list of indices."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx):
        idx = torch.as_tensor(idx)
        return self.images[idx], self.labels[idx]


def batches(data: IndexedTensors, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader whose sampler yields index batches, so each step is one tensor gather."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(data, generator=generator) if shuffle else SequentialSampler(data)
    return DataLoader(data, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)


def random_shift_rotate(images: torch.Tensor, max_shift: float, max_rotation: float, generator=None) -> torch.Tensor:
    """Per-image random translation (fraction of size) and rotation (degrees), on any device."""
    n = images.shape[0]
    opts = {"device": images.device, "dtype": torch.float32}
    angle = (torch.rand(n, generator=generator, **opts) * 2 - 1) * math.radians(max_rotation)
    shift = (torch.rand(n, 2, generator=generator, **opts) * 2 - 1) * (2 * max_shift)  # grid units span 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    background = images.amin(dim=(1, 2, 3), keepdim=True)  # black after normalisation
    out = F.grid_sample(images - background, grid, align_corners=False, padding_mode="zeros")
    return out + background


class MNISTDataModule(pl.LightningDataModule):
    """Train/val/test tensors for one dataset of data/<name>/ (see cnnlab.fetch).

    The validation set is a seeded random split of the official training set (data.val_size,
    data.split_seed); the official test set is only used for testing.
    """

    def __init__(self, data_cfg: dict, data_dir: str | Path, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = data_cfg, seed
        self.folder = Path(data_dir) / data_cfg["name"]
        self.train = self.val = self.test = None
        self.split: dict = {}

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        files = self.cfg["files"]
        paths = [self.folder / files[f"{split}_{kind}"]["name"] for kind in ("images", "labels")]
        for path in paths:
            if not path.is_file():
                raise CnnlabError(f"{path} not found: fetch the data first (`cnnlab fetch` or `dvc repro fetch`)")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        size, channels = self.cfg["image_size"], self.cfg["channels"]
        if images.shape[0] != labels.shape[0]:
            raise CnnlabError(f"{self.folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
        if images.shape[1:] != (size, size):
            raise CnnlabError(f"{paths[0]}: images are {images.shape[1:]}, config data.image_size says {size}")
        if labels.max() >= self.cfg["num_classes"]:
            raise CnnlabError(f"{paths[1]}: label {labels.max()} >= data.num_classes={self.cfg['num_classes']}")
        norm = self.cfg["normalize"]
        x = torch.from_numpy(images.copy()).float().div_(255).sub_(norm["mean"]).div_(norm["std"])
        return x.reshape(-1, channels, size, size), torch.from_numpy(labels.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        x, y = self._load("train")
        val_size = self.cfg["val_size"]
        if val_size >= len(y):
            raise CnnlabError(f"data.val_size={val_size} leaves no training images (the training set has {len(y)})")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.cfg["split_seed"]))
        val_idx, train_idx = order[:val_size], order[val_size:]
        self.train = IndexedTensors(x[train_idx], y[train_idx])
        self.val = IndexedTensors(x[val_idx], y[val_idx])
        self.test = IndexedTensors(*self._load("test"))
        self.split = {"train_size": len(train_idx), "val_size": val_size, "test_size": len(self.test),
                      "split_seed": self.cfg["split_seed"]}

    def train_dataloader(self):
        return batches(self.train, self.cfg["batch_size"], shuffle=True, seed=self.seed)

    def val_dataloader(self):
        return batches(self.val, self.cfg["eval_batch_size"], shuffle=False)

    def test_dataloader(self):
        return batches(self.test, self.cfg["eval_batch_size"], shuffle=False)
