"""The data module: any MNIST-style IDX dataset, in memory, batched by index.

`prepare_data()` makes sure <data_dir>/<name>/ holds the verified files (fetching them when
needed; Lightning runs it once per node), `setup()` loads them: the whole dataset (60k 28x28
images is ~190 MB as float32) lives in one tensor and each batch is a single fancy-index gather,
with no per-sample __getitem__, collate or worker processes. On a GPU the whole dataset is moved
to the device once and batches are drawn there (DeviceBatches). Augmentation and the
channels_last memory format are applied to whole batches after they reach the device.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from cnnlab.config import DataSpec, parse
from cnnlab.errors import CnnlabError
from cnnlab.fetch import fetch_dataset, is_current, read_manifest
from cnnlab.idx import read_idx


def batches(data: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader whose sampler yields index lists, so each step is one tensor gather."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(data, generator=generator) if shuffle else SequentialSampler(data)
    return DataLoader(data, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)


class DeviceBatches:
    """Batches of tensors that live on a GPU, drawn there: each epoch's shuffled order is made on
    the device and sliced per step, so a step needs no host work and no host-device sync.
    (A DataLoader would index with a host-side list, copied to the device every step.)"""

    def __init__(self, data: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0):
        self.tensors, self.batch_size, self.shuffle = data.tensors, batch_size, shuffle
        self.generator = torch.Generator(device=self.tensors[0].device).manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.tensors[0]) / self.batch_size)

    def __iter__(self):
        n, device = len(self.tensors[0]), self.tensors[0].device
        order = torch.randperm(n, generator=self.generator, device=device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            yield tuple(t[index] for t in self.tensors)


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


class IDXDataModule(pl.LightningDataModule):
    """Train/val/test tensors of one dataset in <data_dir>/<name>/ (see cnnlab.fetch).

    The validation set is a seeded random split of the official training set (data.val_size,
    data.split_seed); the official test set is only ever used for testing. Its hyperparameters go
    into every checkpoint, so evaluation rebuilds exactly this data (`load_from_checkpoint`).
    """

    def __init__(self, data: DataSpec | dict, data_dir: str = "data", seed: int = 0, channels_last: bool = False,
                 fetch_timeout_s: float = 60.0):
        super().__init__()
        self.spec = data if isinstance(data, DataSpec) else parse(DataSpec, data, "data")
        self.save_hyperparameters({"data": dataclasses.asdict(self.spec), "data_dir": str(data_dir), "seed": seed,
                                   "channels_last": channels_last, "fetch_timeout_s": fetch_timeout_s}, logger=False)
        self.folder = Path(data_dir) / self.spec.name
        self.train = self.val = self.test = None
        self.split: dict = {}
        self.checksum: str | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.channels, self.spec.image_size, self.spec.image_size

    def prepare_data(self) -> None:
        """Fetch and verify the dataset unless its manifest says it is already here."""
        data_dir = Path(self.hparams.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        spec = dataclasses.asdict(self.spec)
        with FileLock(data_dir / f".{self.spec.name}.lock"):  # parallel sweep jobs share the folder
            manifest = read_manifest(data_dir, self.spec.name)
            if manifest is None or not is_current(manifest, spec):
                fetch_dataset(spec, data_dir, self.hparams.fetch_timeout_s)

    def _load(self, split: str) -> TensorDataset:
        files = self.spec.files
        paths = [self.folder / getattr(files, f"{split}_{kind}").name for kind in ("images", "labels")]
        for path in paths:
            if not path.is_file():
                raise CnnlabError(f"{path} not found: fetch the data first (`cnnlab fetch` or `dvc repro fetch`)")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        size, channels = self.spec.image_size, self.spec.channels
        if images.shape[0] != labels.shape[0]:
            raise CnnlabError(f"{self.folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
        if images.shape[1:] != (size, size):
            raise CnnlabError(f"{paths[0]}: images are {images.shape[1:]}, config data.image_size says {size}")
        if labels.max() >= self.spec.num_classes:
            raise CnnlabError(f"{paths[1]}: label {labels.max()} >= data.num_classes={self.spec.num_classes}")
        norm = self.spec.normalize
        x = torch.from_numpy(images.copy()).float().div_(255).sub_(norm.mean).div_(norm.std)
        return TensorDataset(x.reshape(-1, channels, size, size), torch.from_numpy(labels.astype(np.int64)))

    def setup(self, stage: str | None = None) -> None:
        manifest = read_manifest(self.hparams.data_dir, self.spec.name)
        self.checksum = manifest["checksum"] if manifest else None
        if stage in (None, "fit", "validate") and self.train is None:
            train = self._load("train")
            x, y = train.tensors
            val_size = self.spec.val_size
            if val_size >= len(y):
                raise CnnlabError(f"config data.val_size: {val_size} leaves no training images "
                                  f"(the training set has {len(y)})")
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.spec.split_seed))
            val_idx, train_idx = order[:val_size], order[val_size:]
            self.train = TensorDataset(x[train_idx], y[train_idx])
            self.val = TensorDataset(x[val_idx], y[val_idx])
            self.split = {"train_size": len(train_idx), "val_size": val_size, "split_seed": self.spec.split_seed}
        if stage in (None, "test", "predict") and self.test is None:
            self.test = self._load("test")
            self.split["test_size"] = len(self.test)
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if device is not None and device.type == "cuda":  # the whole dataset fits: keep it on the GPU
            self.train, self.val, self.test = (TensorDataset(*(t.to(device) for t in d.tensors)) if d else d
                                               for d in (self.train, self.val, self.test))

    def _batches(self, data: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0):
        if data.tensors[0].is_cuda:
            return DeviceBatches(data, batch_size, shuffle, seed)
        return batches(data, batch_size, shuffle, seed)

    def train_dataloader(self):
        return self._batches(self.train, self.spec.batch_size, shuffle=True, seed=self.hparams.seed)

    def val_dataloader(self):
        return self._batches(self.val, self.spec.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._batches(self.test, self.spec.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if isinstance(batch, torch.Tensor):  # the module's example input, for the model summary
            return batch
        x, y = batch
        augment = self.spec.augment
        if augment.enabled and self.trainer is not None and self.trainer.training:
            x = random_shift_rotate(x, augment.max_shift, augment.max_rotation)
        if self.hparams.channels_last:  # after augmenting: grid_sample returns the default layout
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def original_images(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: pixel values in [0, 1], for pictures of the data."""
        return images * self.spec.normalize.std + self.spec.normalize.mean
