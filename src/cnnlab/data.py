"""The data module: any MNIST-style IDX dataset, in memory, batched by index.

`prepare_data()` makes sure <data_dir>/<name>/ holds the verified files (fetching them when
needed; Lightning runs it once per node), `setup()` loads them: the whole dataset (60k 28x28
images is ~190 MB as float32) lives in one tensor and each batch is a single fancy-index gather,
with no per-sample __getitem__, collate or worker processes (Batches). On a GPU the whole dataset
is moved to the device once and batches are drawn there. Augmentation and the
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
from torch.utils.data import TensorDataset

from cnnlab.config import DataSpec, parse
from cnnlab.errors import CnnlabError
from cnnlab.fetch import fetch_dataset, is_current, local_checksum, read_manifest, unchanged_since_fetch
from cnnlab.idx import read_idx


class EpochOrder:
    """The order of one epoch's samples: a permutation drawn from (seed, epoch), or file order.

    Seeding by epoch, not by a generator that advances, means a run resumed at epoch e trains on
    the batches an uninterrupted run would have. Lightning calls `set_epoch` at each epoch's start
    (on a loader's `sampler`); iterated without Lightning, each full pass moves to the next epoch.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0):
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, device: torch.device) -> torch.Tensor | None:
        """This epoch's permutation, made on `device`; None for file order (batches are slices)."""
        if not self.shuffle:
            return None
        # SeedSequence mixes seed and epoch, so seed 1's second epoch is not seed 2's first.
        state = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0])
        generator = torch.Generator(device=device).manual_seed(state)
        return torch.randperm(self.size, generator=generator, device=device)


class Batches:
    """Batches of in-memory tensors, each one gather by index, on the tensors' own device: on a GPU
    the order is drawn and sliced there, so a step needs no host work and no host-device sync (a
    DataLoader would index with a host-side list, copied to the device every step).

    `start` skips the first batches of the first pass: a run resumed mid-epoch goes on with the
    batches it had not trained on yet (see IDXDataModule.state_dict).

    In distributed training (`shard` = (rank, world size)) each process takes every world-size-th
    sample of the epoch's permutation, which every process draws alike from (seed, epoch), as
    Lightning's DistributedSampler would do for a DataLoader (Lightning only shards DataLoaders).
    All shards have the same length (the last few samples of an epoch's order, fewer than the
    world size, are left out): a process with one batch more would wait forever for the others.
    """

    batch_sampler = None  # Lightning inspects a loader with a `sampler` as it would a DataLoader

    def __init__(self, data: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0, start: int = 0,
                 shard: tuple[int, int] = (0, 1)):
        self.tensors, self.batch_size, self.start = data.tensors, batch_size, start
        self.sampler = EpochOrder(len(self.tensors[0]), shuffle or shard[1] > 1, seed)
        self.rank, self.world = shard
        self.size = len(self.tensors[0]) // self.world  # samples per process and epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self):
        order = self.sampler.indices(self.tensors[0].device)
        if self.world > 1:
            order = order[self.rank::self.world][:self.size]
        first, self.start = self.start, 0
        for begin in range(first * self.batch_size, self.size, self.batch_size):
            index = slice(begin, begin + self.batch_size) if order is None else order[begin:begin + self.batch_size]
            yield tuple(t[index] for t in self.tensors)
        self.sampler.set_epoch(self.sampler.epoch + 1)


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
        self._resume_batches = 0  # set from a checkpoint written mid-epoch (load_state_dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.channels, self.spec.image_size, self.spec.image_size

    def prepare_data(self) -> None:
        """Fetch and verify the dataset unless its manifest says it is here, unchanged.

        The common case writes nothing (a read-only data folder works): the manifest matches the
        config and every file has the size and mtime it had when verified. Otherwise, under a lock
        (parallel sweep jobs share the folder), fetch_dataset verifies each file in full and
        fetches again what does not verify.
        """
        data_dir = Path(self.hparams.data_dir)
        spec = dataclasses.asdict(self.spec)
        manifest = read_manifest(data_dir, self.spec.name)
        if manifest is not None and is_current(manifest, spec) and unchanged_since_fetch(data_dir, manifest):
            return
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(data_dir / f".{self.spec.name}.lock")
            with lock:
                manifest = read_manifest(data_dir, self.spec.name)
                if manifest is None or not is_current(manifest, spec) or not unchanged_since_fetch(data_dir, manifest):
                    fetch_dataset(spec, data_dir, self.hparams.fetch_timeout_s)
        except PermissionError as exc:
            raise CnnlabError(f"{data_dir}: dataset '{self.spec.name}' must be fetched or checked again, and this "
                              f"folder is not writable ({exc.strerror}); fetch it where you can write "
                              f"(paths.data_dir) or ask its owner to run `cnnlab fetch`") from None

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
        # The checksum of the files as they are now (what this run reads), not as they were fetched.
        self.checksum = local_checksum(self.hparams.data_dir, dataclasses.asdict(self.spec))
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

    def train_dataloader(self):
        start, self._resume_batches = self._resume_batches, 0
        trainer = self.trainer
        shard = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return Batches(self.train, self.spec.batch_size, shuffle=True, seed=self.hparams.seed, start=start,
                       shard=shard)

    # Validation and test are not sharded: in distributed training every process evaluates the whole
    # set (torchmetrics then syncs identical counts), so the metrics are exactly a single process's;
    # these passes are small next to training.
    def val_dataloader(self):
        return Batches(self.val, self.spec.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return Batches(self.test, self.spec.eval_batch_size, shuffle=False)

    def state_dict(self) -> dict:
        """Saved in every checkpoint: how many batches of the current epoch were trained (Lightning
        counts them; a checkpoint written mid-epoch, on SIGTERM or every N steps, resumes after them)."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        # `processed`: a checkpoint written in on_train_batch_end (every N steps) comes before
        # Lightning counts that batch as completed, but it has been trained on.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch_batches_done": done if done < trainer.num_training_batches else 0}

    def load_state_dict(self, state: dict) -> None:
        self._resume_batches = int(state.get("epoch_batches_done", 0))

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
