"""The data module: seeded split, official test set, normalisation, whole batches by index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnlab import CnnlabError
from cnnlab.data import MNISTDataModule, random_shift_rotate, read_idx, write_idx
from cnnlab.fetch import fetch_dataset

from conftest import compose_cfg, write_dataset


@pytest.fixture
def data_cfg(tiny_dataset, tmp_path):
    cfg = compose_cfg("data=custom", f"data.path={tiny_dataset}", "data.val_size=100", f"paths.data_dir={tmp_path}")
    fetch_dataset(cfg["data"], tmp_path)
    return cfg["data"], tmp_path


def test_idx_round_trip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7)).astype(np.uint8)
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), array)


def test_split_sizes_seeded_and_disjoint(data_cfg):
    cfg, folder = data_cfg
    first, second = MNISTDataModule(cfg, folder), MNISTDataModule(cfg, folder)
    first.setup(), second.setup()
    assert first.split == {"train_size": 300, "val_size": 100, "test_size": 100, "split_seed": cfg["split_seed"]}
    assert torch.equal(first.val.images, second.val.images)  # same seed, same split
    other = MNISTDataModule({**cfg, "split_seed": cfg["split_seed"] + 1}, folder)
    other.setup()
    assert not torch.equal(first.val.images, other.val.images)
    # validation images are a subset of the training file, never the test file
    all_train = torch.cat([first.train.images, first.val.images]).flatten(1)
    assert len(torch.unique(all_train, dim=0)) == 400


def test_normalisation_from_config(data_cfg):
    cfg, folder = data_cfg
    dm = MNISTDataModule({**cfg, "normalize": {"mean": 0.5, "std": 0.25}}, folder)
    dm.setup()
    raw = read_idx(folder / "custom" / cfg["files"]["test_images"]["name"])
    expected = (torch.from_numpy(raw.copy()).float() / 255 - 0.5) / 0.25
    assert torch.allclose(dm.test.images[:, 0], expected)
    assert dm.test.images.shape == (100, 1, 28, 28) and dm.test.labels.dtype == torch.int64


def test_batches_are_whole_tensors_drawn_by_index(data_cfg):
    cfg, folder = data_cfg
    dm = MNISTDataModule({**cfg, "batch_size": 32}, folder, seed=7)
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 10  # ceil(300 / 32)
    x, y = batches[0]
    assert x.shape == (32, 1, 28, 28) and y.shape == (32,)
    seen = torch.cat([b[1] for b in batches])
    assert len(seen) == 300 and sorted(seen.tolist()) == sorted(dm.train.labels.tolist())
    # the seed fixes the order
    again = MNISTDataModule({**cfg, "batch_size": 32}, folder, seed=7)
    again.setup()
    assert torch.equal(next(iter(again.train_dataloader()))[1], y)


def test_missing_files_give_a_clear_error(tmp_path):
    cfg = compose_cfg("data=custom", f"data.path={tmp_path}")["data"]
    with pytest.raises(CnnlabError, match="fetch the data first"):
        MNISTDataModule(cfg, tmp_path).setup()


def test_val_size_larger_than_training_set_is_rejected(data_cfg):
    cfg, folder = data_cfg
    with pytest.raises(CnnlabError, match="data.val_size"):
        MNISTDataModule({**cfg, "val_size": 400}, folder).setup()


def test_augmentation_moves_pixels_but_keeps_shape_and_background():
    torch.manual_seed(0)
    images = torch.full((8, 1, 28, 28), -1.0)
    images[:, :, 10:18, 10:18] = 2.0
    out = random_shift_rotate(images, max_shift=0.1, max_rotation=10)
    assert out.shape == images.shape
    assert not torch.allclose(out, images)
    assert torch.isclose(out[:, :, 0, 0], torch.tensor(-1.0)).all()  # corners stay background
    unchanged = random_shift_rotate(images, max_shift=0.0, max_rotation=0.0)
    assert torch.allclose(unchanged, images, atol=1e-5)


def test_pointing_a_custom_dataset_elsewhere_fetches_the_new_files(tiny_dataset, tmp_path):
    """data/custom/ is reused across custom datasets; a new data.path must not train on stale files."""
    other = write_dataset(tmp_path / "other", n_train=200, n_test=50, seed=5)
    first = compose_cfg("data=custom", f"data.path={tiny_dataset}")["data"]
    second = compose_cfg("data=custom", f"data.path={other}")["data"]
    fetch_dataset(first, tmp_path / "data")
    manifest = fetch_dataset(second, tmp_path / "data")
    assert manifest["sources"] == [str(other)]
    dm = MNISTDataModule({**second, "val_size": 20}, tmp_path / "data")
    dm.setup()
    assert len(dm.test) == 50
