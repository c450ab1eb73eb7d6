"""The data module: any dataset cnnlab reads (IDX files, an image folder, CIFAR-10), in memory,
batched by index.

`prepare_data()` makes sure <data_dir>/<name>/ holds the verified data (fetching or converting it
when needed, cnnlab.training.datasets; Lightning runs it once per node), `setup()` loads it: the
whole dataset (60k 28x28 images is ~190 MB as float32) lives in one tensor and each batch is a
single fancy-index gather, with no per-sample __getitem__, collate or worker processes (Batches).
On a GPU the whole dataset is moved to the device once and batches are drawn there. Augmentation
and the channels_last memory format are applied to whole batches after they reach the device.

Everything random about an epoch (its order, each image's augmentation) is drawn on the CPU from
(seed, epoch) and copied to the device once per epoch: one seed is one run on a CPU and on a GPU
(their generators differ), a resumed epoch goes on as it began, whichever device it resumes on, and
every process of a distributed training augments its own images differently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from cnnlab.core.config import DataSpec, parse, project_path
from cnnlab.core.errors import CnnlabError
from cnnlab.core.internals import batches_done_this_epoch
from cnnlab.training.datasets import FORMATS, ensure, skipped_files

AUGMENT_DRAWS = 3  # per image and epoch: a rotation and two shifts (random_shift_rotate)


class EpochOrder:
    """The order of one epoch's samples: a permutation drawn from (seed, epoch), or file order; and,
    for augmentation, uniform draws for every sample of the epoch.

    Seeding by epoch, not by a generator that advances, means a run resumed at epoch e trains on
    the batches an uninterrupted run would have. Lightning calls `set_epoch` at each epoch's start
    (on a loader's `sampler`); iterated without Lightning, each full pass moves to the next epoch.
    Both are drawn with a CPU generator whatever the training device: a CUDA generator draws a
    different permutation from the same seed, so a GPU run would train on other batches than a CPU
    run, and a run resumed on the other kind of device would skip the wrong samples.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0):
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, stream: int) -> torch.Generator:
        # SeedSequence mixes seed and epoch, so seed 1's second epoch is not seed 2's first; the
        # order (stream 0) and the augmentation (stream 1) are independent draws.
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint64)[stream]
        return torch.Generator().manual_seed(int(state))

    def indices(self) -> torch.Tensor | None:
        """This epoch's permutation, on the CPU; None for file order (batches are slices)."""
        if not self.shuffle:
            return None
        return torch.randperm(self.size, generator=self._generator(0))

    def augment_draws(self) -> torch.Tensor:
        """This epoch's uniform [0, 1) draws for augmenting each sample (row i: sample i), on the CPU.
        By sample, not by position: each process of a distributed training augments its own
        samples, and a resumed epoch augments each sample as it would have."""
        return torch.rand(self.size, AUGMENT_DRAWS, generator=self._generator(1))


class Batches:
    """Batches of in-memory tensors, each one gather by index, on the tensors' own device: on a GPU
    the epoch's order is copied there once and sliced there, so a step needs no host work and no
    host-device sync (a DataLoader would index with a host-side list, copied to the device every step).

    It is a resumable loader as Lightning defines one (`state_dict`/`load_state_dict`; Lightning
    keeps the state in every checkpoint and restores it before training goes on): a run resumed
    mid-epoch goes on with the batches that epoch had not trained on yet. How many were trained is
    `trained()`, Lightning's own count (ImageDataModule passes it): a stop at a batch's start
    (cnnlab.training.checkpoints) comes after the loader handed that batch out, before it was trained.

    In distributed training (`shard` = (rank, world size)) each process takes every world-size-th
    sample of the epoch's order, which every process draws alike from (seed, epoch), as
    Lightning's DistributedSampler would do for a DataLoader (Lightning only shards DataLoaders).
    All shards have the same length (the last few samples of an epoch's order, fewer than the
    world size, are left out): a process with one batch more would wait forever for the others.
    """

    batch_sampler = None  # Lightning inspects a loader with a `sampler` as it would a DataLoader

    def __init__(self, data: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0,
                 shard: tuple[int, int] = (0, 1), trained: Callable[[], int] | None = None, augment: bool = False):
        # augment: each batch carries a third tensor, its samples' augmentation draws (EpochOrder)
        self.tensors, self.batch_size, self.trained, self.augment = data.tensors, batch_size, trained, augment
        self.sampler = EpochOrder(len(self.tensors[0]), shuffle, seed)
        self.rank, self.world = shard
        self.size = len(self.tensors[0]) // self.world  # samples per process and epoch
        self.handed_out = 0               # batches of the current pass given to the training loop
        self._skip: tuple[int, int] = (-1, 0)  # (epoch, batches) a restored state says were trained

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self.trained() if self.trained else self.handed_out}

    def load_state_dict(self, state: dict) -> None:
        # Applied only if the resumed pass is that epoch: a checkpoint written at an epoch's end
        # (all its batches, or trainer.limit_train_batches of them, handed out) resumes with the next.
        self._skip = (int(state.get("epoch", -1)), int(state.get("batches", 0)))

    def __iter__(self):
        device = self.tensors[0].device
        order = self.sampler.indices()
        if self.world > 1:
            order = order if order is not None else torch.arange(len(self.tensors[0]))
            order = order[self.rank::self.world][:self.size]
        tensors = self.tensors
        if self.augment:
            tensors = (*tensors, to_device(self.sampler.augment_draws(), device))
        order = to_device(order, device) if order is not None else None
        epoch, skip = self._skip
        first, self._skip = (skip if epoch == self.sampler.epoch else 0), (-1, 0)
        self.handed_out = first
        for begin in range(first * self.batch_size, self.size, self.batch_size):
            index = slice(begin, begin + self.batch_size) if order is None else order[begin:begin + self.batch_size]
            self.handed_out += 1
            yield tuple(t[index] for t in tensors)
        self.sampler.set_epoch(self.sampler.epoch + 1)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU from pinned memory, so the copy waits for nothing (a copy
    from pageable memory blocks the host until the GPU has finished its queued work)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def random_shift_rotate(images: torch.Tensor, max_shift: float, max_rotation: float,
                        draws: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image random translation (fraction of size) and rotation (degrees), on any device.
    `draws`: (images, 3) uniform [0, 1) values to use (EpochOrder.augment_draws), else drawn here."""
    n = images.shape[0]
    if draws is None:
        draws = torch.rand(n, AUGMENT_DRAWS, device=images.device)
    draws = draws.to(torch.float32)
    angle = (draws[:, 0] * 2 - 1) * math.radians(max_rotation)
    shift = (draws[:, 1:] * 2 - 1) * (2 * max_shift)  # grid units span 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    background = images.amin(dim=(2, 3), keepdim=True)  # each channel's black after normalisation
    out = F.grid_sample(images - background, grid, align_corners=False, padding_mode="zeros")
    return out + background


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test tensors of one dataset in <data_dir>/<name>/ (see cnnlab.training.datasets).

    The validation set is a seeded random split of the training set (data.val_size,
    data.split_seed); the test set (the official one, or the part of an image folder held out
    when it was prepared) is only ever used for testing. Its hyperparameters go
    into every checkpoint, so evaluation rebuilds exactly this data (`load_from_checkpoint`).
    """

    def __init__(self, data: DataSpec | dict, data_dir: str = "data", seed: int = 0, channels_last: bool = False,
                 fetch_timeout_s: float = 60.0):
        super().__init__()
        self.spec = data if isinstance(data, DataSpec) else parse(DataSpec, data, "data")
        self.spec_dict = dataclasses.asdict(self.spec)  # as the formats' functions take it (training.datasets)
        self.save_hyperparameters({"data": self.spec_dict, "data_dir": str(data_dir), "seed": seed,
                                   "channels_last": channels_last, "fetch_timeout_s": fetch_timeout_s}, logger=False)
        # Recorded as given (checkpoints stay portable: evaluate finds a relative folder from the
        # checkpoint's project), used from the workspace root (cnnlab.core.config.project_path).
        self.data_dir = project_path(data_dir)
        self.folder = self.data_dir / self.spec.name
        self.format = FORMATS[self.spec.format]
        self.train = self.val = self.test = None
        self.split: dict = {}
        self.checksum: str | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.channels, self.spec.image_size, self.spec.image_size

    def prepare_data(self) -> None:
        """Fetch, verify or convert the dataset unless it is here, unchanged.

        The common case writes nothing into the data folder (the fetch stage's DVC output, which
        a run must not change; a read-only one works): the manifest matches the config and every
        file has the size and mtime it had when verified (for IDX files touched but not changed, a
        `dvc pull`, a copy, the content the manifest records, which only the user's cache notes
        down: cnnlab.training.fetch.unchanged_since_fetch). Otherwise, under a lock (parallel
        sweep jobs share the folder), the format prepares it again (cnnlab.training.datasets).
        """
        try:
            ensure(self.spec_dict, self.data_dir, self.hparams.fetch_timeout_s)
        except PermissionError as exc:
            raise CnnlabError(f"{self.data_dir}: dataset '{self.spec.name}' must be fetched or checked again, and this "
                              f"folder is not writable ({exc.strerror}); fetch it where you can write "
                              f"(paths.data_dir) or ask its owner to run `cnnlab fetch`") from None

    def _load(self, split: str) -> TensorDataset:
        images, labels = self.format.load(self.spec_dict, self.data_dir, split)
        size, channels = self.spec.image_size, self.spec.channels
        if images.shape[0] != labels.shape[0]:
            raise CnnlabError(f"{self.folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
        if images.shape[1:] != (channels, size, size):
            raise CnnlabError(f"{self.folder}: {split} images are {'x'.join(map(str, images.shape[1:]))}, the config "
                              f"says {channels}x{size}x{size} (data.channels, data.image_size)")
        if len(labels) and labels.max() >= self.spec.num_classes:
            raise CnnlabError(f"{self.folder}: {split} label {labels.max()} >= "
                              f"data.num_classes={self.spec.num_classes}")
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in self.spec.normalize.per_channel(channels))
        # np.require copies only what torch cannot wrap (IDX bytes read into an immutable buffer)
        x = torch.from_numpy(np.require(images, requirements=["C", "W"])).float().div_(255).sub_(mean).div_(std)
        return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))

    def setup(self, stage: str | None = None) -> None:
        # The checksum of the files as they are now (what this run reads), not as they were fetched.
        self.checksum = self.format.checksum(self.spec_dict, self.data_dir)
        if stage in (None, "fit", "validate") and self.train is None:
            train = self._load("train")
            x, y = train.tensors
            val_size = self.spec.val_size
            if isinstance(val_size, float):  # a fraction of the training set
                val_size = max(1, round(val_size * len(y)))
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

    def state_dict(self) -> dict:
        """Kept in every checkpoint (Lightning saves a data module's state): the checksum of the
        data trained on, so that a resumed training can tell the data changed meanwhile."""
        return {"checksum": self.checksum}

    def load_state_dict(self, state: dict) -> None:
        """A training resumed (or a checkpoint tested) on other data than it began with would be one
        run on two datasets: refused. Lightning calls this after `setup`, so the checksum of the
        data as it is now is known."""
        recorded = state.get("checksum")
        if recorded and self.checksum and recorded != self.checksum:
            where = (self.trainer.ckpt_path if self.trainer is not None else None) or "its checkpoint"
            raise CnnlabError(f"dataset '{self.spec.name}' changed since {where} was written (data.checksum "
                              f"{recorded[:8]}, now {self.checksum[:8]}): resuming would train one run on two "
                              f"datasets; restore the data, or delete {where} to start afresh")

    def train_dataloader(self):
        trainer = self.trainer
        shard = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # trainer.overfit_batches: the same first batches every epoch, in file order, as Lightning
        # makes a DataLoader's sampler sequential for it (it cannot reach into this loader).
        overfit = trainer is not None and trainer.overfit_batches > 0
        return Batches(self.train, self.spec.batch_size, shuffle=not overfit, seed=self.hparams.seed, shard=shard,
                       trained=self._batches_trained, augment=self.spec.augment.enabled)

    def _batches_trained(self) -> int:
        """How many batches of the current epoch were trained, by Lightning's count; 0 at its end."""
        return batches_done_this_epoch(self.trainer)

    # Validation and test are not sharded: in distributed training every process evaluates the whole
    # set (torchmetrics then syncs identical counts), so the metrics are exactly a single process's;
    # these passes are small next to training.
    def val_dataloader(self):
        return Batches(self.val, self.spec.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return Batches(self.test, self.spec.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if isinstance(batch, torch.Tensor):  # the module's example input, for the model summary
            return batch
        x, y, *draws = batch  # training batches carry their augmentation draws when augmenting
        augment = self.spec.augment
        if draws and self.trainer is not None and self.trainer.training:
            x = random_shift_rotate(x, augment.max_shift, augment.max_rotation, draws[0])
        if self.hparams.channels_last:  # after augmenting: grid_sample returns the default layout
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    @property
    def skipped(self) -> list[dict]:
        """Images the preparation left out (data.skip_bad_files), each {"file", "reason"}."""
        return skipped_files(self.spec_dict, self.data_dir)

    @property
    def source(self) -> str:
        """Where the data came from (a folder, an archive), as MLflow's dataset inputs name it."""
        return self.format.source(self.spec_dict, self.data_dir)

    def original_images(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: pixel values in [0, 1], for pictures of the data."""
        mean, std = (torch.tensor(v, device=images.device).view(1, -1, 1, 1)
                     for v in self.spec.normalize.per_channel(images.shape[1]))
        return images * std + mean
