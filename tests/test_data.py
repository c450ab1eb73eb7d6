"""The data module: fetch on prepare, seeded split, official test set, normalisation, whole
batches by index, hyperparameters that rebuild it, and batch transforms after transfer."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import TensorDataset

from cnnlab.core.config import DataSpec, parse
from cnnlab.core.errors import CnnlabError
from cnnlab.training import fetch as fetch_module
from cnnlab.training.data import Batches, EpochOrder, ImageDataModule, random_shift_rotate
from cnnlab.training.fetch import MANIFEST, fetch_dataset, read_manifest, verified_cache_path
from cnnlab.training.idx import read_idx, write_idx

from conftest import FILE_NAMES, compose_cfg, write_dataset


@pytest.fixture
def data_cfg(tiny_dataset, tmp_path):
    cfg = compose_cfg("data=custom", f"data.path={tiny_dataset}", "data.val_size=100", f"paths.data_dir={tmp_path}")
    fetch_dataset(cfg["data"], tmp_path)
    return cfg["data"], tmp_path


def images(dataset) -> torch.Tensor:
    return dataset.tensors[0]


def labels(dataset) -> torch.Tensor:
    return dataset.tensors[1]


def test_idx_round_trip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7)).astype(np.uint8)
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), array)


# ----------------------------------------------------------------------------- prepare_data


def test_prepare_data_fetches_from_the_configured_sources(tiny_dataset, tmp_path):
    """prepare_data() puts the verified files and the manifest in <data_dir>/<name>/; setup()
    then reports the manifest's checksum. A second prepare_data() leaves the files alone."""
    cfg = compose_cfg("data=custom", f"data.path={tiny_dataset}", "data.val_size=100")["data"]
    data_dir = tmp_path / "data"
    dm = ImageDataModule(cfg, data_dir)
    assert not (data_dir / "custom").exists()

    dm.prepare_data()
    folder = data_dir / "custom"
    for name in FILE_NAMES.values():
        assert (folder / name).read_bytes() == (tiny_dataset / name).read_bytes(), name
    manifest = read_manifest(data_dir, "custom")
    assert manifest is not None and manifest["sources"] == [str(tiny_dataset)]

    dm.setup()
    assert dm.checksum == manifest["checksum"]
    assert dm.split == {"train_size": 300, "val_size": 100, "test_size": 100, "split_seed": cfg["split_seed"]}

    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    ImageDataModule(cfg, data_dir).prepare_data()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_prepare_data_refetches_when_the_manifest_is_stale(tiny_dataset, tmp_path):
    """A manifest written for other sources does not count: the module fetches the new data."""
    other = write_dataset(tmp_path / "other", n_train=200, n_test=50, seed=5)
    data_dir = tmp_path / "data"
    ImageDataModule(compose_cfg("data=custom", f"data.path={tiny_dataset}")["data"], data_dir).prepare_data()
    first = read_manifest(data_dir, "custom")

    cfg = compose_cfg("data=custom", f"data.path={other}", "data.val_size=20")["data"]
    dm = ImageDataModule(cfg, data_dir)
    dm.prepare_data()
    dm.setup()
    manifest = read_manifest(data_dir, "custom")
    assert manifest["sources"] == [str(other)] and manifest["checksum"] != first["checksum"]
    assert dm.checksum == manifest["checksum"]
    assert len(dm.test) == 50 and dm.split["train_size"] == 180


def test_prepare_data_failure_names_the_dataset_and_sources(tmp_path):
    missing = tmp_path / "nowhere"
    dm = ImageDataModule(compose_cfg("data=custom", f"data.path={missing}")["data"], tmp_path / "data")
    with pytest.raises(CnnlabError, match="custom") as info:
        dm.prepare_data()
    assert str(missing) in str(info.value)
    assert not (tmp_path / "data" / "custom" / MANIFEST).exists()


# ----------------------------------------------------------------------------- setup


def test_split_sizes_seeded_and_disjoint(data_cfg):
    cfg, folder = data_cfg
    first, second = ImageDataModule(cfg, folder), ImageDataModule(parse(DataSpec, cfg, "data"), folder)
    first.setup(), second.setup()
    assert first.split == {"train_size": 300, "val_size": 100, "test_size": 100, "split_seed": cfg["split_seed"]}
    assert first.checksum == read_manifest(folder, "custom")["checksum"]
    assert torch.equal(images(first.val), images(second.val))  # same seed, same split
    other = ImageDataModule({**cfg, "split_seed": cfg["split_seed"] + 1}, folder)
    other.setup()
    assert not torch.equal(images(first.val), images(other.val))
    # validation images are a subset of the training file, never the test file
    all_train = torch.cat([images(first.train), images(first.val)]).flatten(1)
    assert len(torch.unique(all_train, dim=0)) == 400


def test_a_checkpoint_of_other_data_is_refused(data_cfg):
    """The data module's state (kept in every checkpoint) is the checksum of the data it read; a
    training resumed after the data changed would be one run on two datasets, so it is refused in
    one line, and resuming on the same data goes on."""
    cfg, folder = data_cfg
    module = ImageDataModule(cfg, folder)
    module.setup("fit")
    state = module.state_dict()
    assert state == {"checksum": module.checksum} and len(module.checksum) == 32
    module.load_state_dict(state)  # the same data: nothing to say
    module.load_state_dict({})     # a checkpoint from before the state was kept
    with pytest.raises(CnnlabError, match=r"^dataset 'custom' changed since its checkpoint was written "
                                          r"\(data.checksum 00000000, now [0-9a-f]{8}\).*start afresh$"):
        module.load_state_dict({"checksum": "0" * 32})


def test_setup_stages_load_only_what_they_need(data_cfg):
    cfg, folder = data_cfg
    fit = ImageDataModule(cfg, folder)
    fit.setup("fit")
    assert len(fit.train) == 300 and len(fit.val) == 100 and fit.test is None
    validate = ImageDataModule(cfg, folder)
    validate.setup("validate")
    assert len(validate.val) == 100 and validate.test is None
    test = ImageDataModule(cfg, folder)
    test.setup("test")
    assert test.train is None and test.val is None and len(test.test) == 100
    assert test.split == {"test_size": 100}


def test_normalisation_from_config(data_cfg):
    cfg, folder = data_cfg
    dm = ImageDataModule({**cfg, "normalize": {"mean": 0.5, "std": 0.25}}, folder)
    dm.setup()
    raw = read_idx(folder / "custom" / cfg["files"]["test_images"]["name"])
    pixels = torch.from_numpy(raw.copy()).float() / 255
    assert torch.allclose(images(dm.test)[:, 0], (pixels - 0.5) / 0.25)
    assert images(dm.test).shape == (100, 1, 28, 28) and labels(dm.test).dtype == torch.int64
    assert dm.input_shape == (1, 28, 28)
    assert torch.allclose(dm.original_images(images(dm.test))[:, 0], pixels, atol=1e-6)


def test_batches_are_whole_tensors_drawn_by_index(data_cfg):
    cfg, folder = data_cfg
    dm = ImageDataModule({**cfg, "batch_size": 32}, folder, seed=7)
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 10  # ceil(300 / 32)
    x, y = batches[0]
    assert x.shape == (32, 1, 28, 28) and y.shape == (32,)
    seen = torch.cat([b[1] for b in batches])
    assert len(seen) == 300 and sorted(seen.tolist()) == sorted(labels(dm.train).tolist())
    # the seed fixes the order
    again = ImageDataModule({**cfg, "batch_size": 32}, folder, seed=7)
    again.setup()
    assert torch.equal(next(iter(again.train_dataloader()))[1], y)
    # evaluation batches come in file order
    val = list(dm.val_dataloader())
    assert torch.equal(torch.cat([b[0] for b in val]), images(dm.val))


def test_missing_files_give_a_clear_error(tmp_path):
    cfg = compose_cfg("data=custom", f"data.path={tmp_path}")["data"]
    with pytest.raises(CnnlabError, match="fetch the data first"):
        ImageDataModule(cfg, tmp_path).setup()


def test_val_size_larger_than_training_set_is_rejected(data_cfg):
    cfg, folder = data_cfg
    with pytest.raises(CnnlabError, match="data.val_size"):
        ImageDataModule({**cfg, "val_size": 400}, folder).setup()


def test_pointing_a_custom_dataset_elsewhere_fetches_the_new_files(tiny_dataset, tmp_path):
    """data/custom/ is reused across custom datasets; a new data.path must not train on stale files."""
    other = write_dataset(tmp_path / "other", n_train=200, n_test=50, seed=5)
    first = compose_cfg("data=custom", f"data.path={tiny_dataset}")["data"]
    second = compose_cfg("data=custom", f"data.path={other}")["data"]
    fetch_dataset(first, tmp_path / "data")
    manifest = fetch_dataset(second, tmp_path / "data")
    assert manifest["sources"] == [str(other)]
    dm = ImageDataModule({**second, "val_size": 20}, tmp_path / "data")
    dm.setup()
    assert len(dm.test) == 50


# ----------------------------------------------------------------------------- hyperparameters


def test_hyperparameters_rebuild_the_same_module(data_cfg, tmp_path):
    """What a checkpoint keeps (`datamodule_hyper_parameters`) rebuilds an equal module, also
    through Lightning's load_from_checkpoint with weights_only=True (plain types only)."""
    cfg, folder = data_cfg
    custom = {**cfg, "normalize": {"mean": 0.25, "std": 0.5}, "val_size": 50}
    dm = ImageDataModule(custom, folder, seed=3, channels_last=True, fetch_timeout_s=7.0)
    assert dict(dm.hparams) == {"data": dataclasses.asdict(parse(DataSpec, custom, "data")), "data_dir": str(folder),
                                "seed": 3, "channels_last": True, "fetch_timeout_s": 7.0}

    rebuilt = ImageDataModule(**dm.hparams)
    assert rebuilt.spec == dm.spec and rebuilt.spec.normalize.mean == 0.25 and rebuilt.spec.val_size == 50
    assert dict(rebuilt.hparams) == dict(dm.hparams)

    checkpoint = tmp_path / "dm.ckpt"
    torch.save({"pytorch-lightning_version": pl.__version__,
                ImageDataModule.CHECKPOINT_HYPER_PARAMS_KEY: dict(dm.hparams)}, checkpoint)
    loaded = ImageDataModule.load_from_checkpoint(checkpoint, weights_only=True)
    assert loaded.spec == dm.spec and dict(loaded.hparams) == dict(dm.hparams)
    loaded.setup()
    assert loaded.split["val_size"] == 50 and loaded.hparams.seed == 3
    raw = read_idx(folder / "custom" / cfg["files"]["test_images"]["name"])
    assert torch.allclose(images(loaded.test)[:, 0], (torch.from_numpy(raw.copy()).float() / 255 - 0.25) / 0.5)


# ----------------------------------------------------------------------------- after batch transfer


def trainer_in(stage: str) -> pl.Trainer:
    """A real (unused) Trainer whose state says it is in `stage`: training, validating, testing..."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    setattr(trainer, stage, True)
    return trainer


def some_batch(channels: int = 3):
    x = torch.randn(8, channels, 28, 28, generator=torch.Generator().manual_seed(0))
    x[:, :, 10:18, 10:18] += 3
    return x, torch.arange(8)


def test_channels_last_batches(data_cfg):
    cfg, folder = data_cfg
    x, y = some_batch()
    assert not x.is_contiguous(memory_format=torch.channels_last)

    dm = ImageDataModule(cfg, folder, channels_last=True)
    out_x, out_y = dm.on_after_batch_transfer((x, y), 0)
    assert out_x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_x, x) and torch.equal(out_y, y)

    plain_x, _ = ImageDataModule(cfg, folder).on_after_batch_transfer((x, y), 0)
    assert plain_x.is_contiguous() and torch.equal(plain_x, x)
    # the example input Lightning passes for the model summary is a bare tensor: left as it is
    assert dm.on_after_batch_transfer(x, 0) is x


def test_augmentation_only_while_training(data_cfg):
    cfg, folder = data_cfg
    augmented = {**cfg, "augment": {"enabled": True, "max_shift": 0.1, "max_rotation": 10.0}}
    x, y = some_batch()

    dm = ImageDataModule(augmented, folder, channels_last=True)
    assert torch.equal(dm.on_after_batch_transfer((x, y), 0)[0], x)  # no trainer attached
    dm.trainer = trainer_in("training")
    draws = torch.rand(len(x), 3)  # the training loader's batches carry their augmentation draws
    out_x, out_y = dm.on_after_batch_transfer((x, y, draws), 0)
    assert out_x.shape == x.shape and not torch.allclose(out_x, x)
    assert torch.equal(out_y, y)
    assert torch.equal(dm.on_after_batch_transfer((x, y, draws), 0)[0], out_x)  # the draws decide, nothing else
    for stage in ("validating", "testing", "sanity_checking", "predicting"):
        dm.trainer = trainer_in(stage)
        assert not dm.trainer.training
        assert torch.equal(dm.on_after_batch_transfer((x, y), 0)[0], x), stage

    disabled = ImageDataModule(cfg, folder)
    assert cfg["augment"]["enabled"] is False
    disabled.trainer = trainer_in("training")
    out_x, out_y = disabled.on_after_batch_transfer((x, y), 0)
    assert torch.equal(out_x, x) and torch.equal(out_y, y)


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


# ----------------------------------------------------------------------------- integrity


def _fetched(tiny_dataset, tmp_path, *overrides):
    cfg = compose_cfg("data=custom", f"data.path={tiny_dataset}", "data.val_size=100", *overrides)["data"]
    data_dir = tmp_path / "data"
    ImageDataModule(cfg, data_dir).prepare_data()
    return cfg, data_dir, data_dir / "custom"


def _replace_labels_with_shuffled(folder):
    """A valid IDX file with other content, as a careless edit or a bad copy would leave."""
    path = folder / FILE_NAMES["train_labels"]
    shuffled = np.random.default_rng(1).permutation(read_idx(path))
    write_idx(path, shuffled)
    return path


def _content_md5(path) -> str:
    return hashlib.md5(gzip.open(path).read()).hexdigest()


def test_unchanged_files_are_not_hashed_again(tiny_dataset, tmp_path, monkeypatch):
    cfg, data_dir, _ = _fetched(tiny_dataset, tmp_path)
    calls = []
    monkeypatch.setattr("cnnlab.training.fetch._content_md5_and_check", lambda *a: calls.append(a))
    dm = ImageDataModule(cfg, data_dir)
    dm.prepare_data()
    dm.setup()
    assert calls == [] and dm.checksum == read_manifest(data_dir, "custom")["checksum"]


def test_a_replaced_file_without_a_checksum_is_read_and_recorded_as_it_is(tiny_dataset, tmp_path):
    cfg, data_dir, folder = _fetched(tiny_dataset, tmp_path)
    original = read_manifest(data_dir, "custom")["checksum"]
    _replace_labels_with_shuffled(folder)
    dm = ImageDataModule(cfg, data_dir)
    dm.prepare_data()
    dm.setup()
    contents = [_content_md5(folder / FILE_NAMES[k]) for k in ("train_images", "train_labels", "test_images",
                                                                "test_labels")]
    assert dm.checksum != original and dm.checksum == hashlib.md5("".join(contents).encode()).hexdigest()
    assert read_manifest(data_dir, "custom")["checksum"] == dm.checksum  # verified again and written down


def test_a_replaced_file_that_fails_its_checksum_is_fetched_again(tiny_dataset, tmp_path, caplog):
    labels_md5 = _content_md5(tiny_dataset / FILE_NAMES["train_labels"])
    cfg, data_dir, folder = _fetched(tiny_dataset, tmp_path, f"+data.files.train_labels.content_md5={labels_md5}")
    original = read_manifest(data_dir, "custom")["checksum"]
    path = _replace_labels_with_shuffled(folder)
    with pytest.raises(CnnlabError, match="changed since it was fetched and no longer verifies"):
        ImageDataModule(cfg, data_dir).setup()  # read without the check prepare_data makes: refused
    dm = ImageDataModule(cfg, data_dir)
    dm.prepare_data()
    dm.setup()
    assert path.read_bytes() == (tiny_dataset / FILE_NAMES["train_labels"]).read_bytes()  # the verified copy again
    assert dm.checksum == original and "does not verify" in caplog.text


def test_an_already_fetched_dataset_in_a_read_only_folder_works_and_nothing_is_written(tiny_dataset, tmp_path):
    cfg, data_dir, folder = _fetched(tiny_dataset, tmp_path)
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    for path in (folder, data_dir):
        path.chmod(0o555)
    try:
        dm = ImageDataModule(cfg, data_dir)
        dm.prepare_data()
        dm.setup()
        assert len(dm.train) == 300
    finally:
        for path in (data_dir, folder):
            path.chmod(0o755)
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before  # no lock file, nothing


def touch_every_file(folder) -> None:
    """New mtimes, the same bytes: what `dvc pull`, `dvc checkout`, a copy or a restore leave."""
    for path in folder.iterdir():
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def _state(folder) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("where", ["writable", "read-only data", "unwritable cache"])
def test_touched_files_are_hashed_once_and_nothing_is_written_into_the_data_folder(tiny_dataset, tmp_path,
                                                                                   monkeypatch, where):
    """The data folder is the fetch stage's DVC output: a run that finds its files touched but
    unchanged hashes them, notes that in the user's cache (a second run does not hash them again)
    and leaves the folder, manifest.json included, as it was, or DVC would fetch and train again."""
    cfg, data_dir, folder = _fetched(tiny_dataset, tmp_path)
    touch_every_file(folder)
    before, listing = _state(folder), sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    if where == "unwritable cache":
        (tmp_path / "not-a-folder").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    hashed = []
    content_md5 = fetch_module._content_md5_and_check
    monkeypatch.setattr(fetch_module, "_content_md5_and_check", lambda *a: hashed.append(a[0]) or content_md5(*a))
    if where == "read-only data":
        for path in (folder, data_dir):
            path.chmod(0o555)
    try:
        checksums = []
        for _ in range(2):
            dm = ImageDataModule(cfg, data_dir)
            dm.prepare_data()
            dm.setup()
            checksums.append(dm.checksum)
    finally:
        for path in (data_dir, folder):
            path.chmod(0o755)
    assert checksums == [read_manifest(data_dir, "custom")["checksum"]] * 2
    assert _state(folder) == before
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == listing  # no lock file either
    if where == "unwritable cache":  # no error, only slower: each check hashes again
        assert len(hashed) == 16
    else:
        assert sorted(p.name for p in hashed) == sorted(FILE_NAMES.values())  # once, in the first prepare_data
        assert verified_cache_path(data_dir, "custom").is_relative_to(os.environ["XDG_CACHE_HOME"])


def test_fetched_files_are_readable_by_others(tiny_dataset, tmp_path):
    _, _, folder = _fetched(tiny_dataset, tmp_path)
    umask = os.umask(0o022)
    os.umask(umask)
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_a_truncated_gzip_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "labels.gz"
    write_idx(path, np.zeros(1000, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CnnlabError, match=r"labels.gz: not a complete gzip file"):
        read_idx(path)


def test_the_epoch_order_and_augmentation_are_drawn_on_the_cpu_from_seed_and_epoch():
    """Whatever the training device: a CUDA generator would draw another order from the same seed,
    so a GPU run and a CPU run (or a run resumed on the other kind of device) would train differently.
    Pinned here against the draw itself; tests/test_gpu.py compares the two devices."""
    order = EpochOrder(100, shuffle=True, seed=7)
    order.set_epoch(3)
    state = np.random.SeedSequence([7, 3]).generate_state(2, dtype=np.uint64)
    assert torch.equal(order.indices(), torch.randperm(100, generator=torch.Generator().manual_seed(int(state[0]))))
    draws = torch.rand(100, 3, generator=torch.Generator().manual_seed(int(state[1])))
    assert torch.equal(order.augment_draws(), draws)
    assert order.indices().device.type == "cpu" and order.augment_draws().device.type == "cpu"


def test_each_process_augments_its_own_samples_and_a_resumed_epoch_augments_alike():
    x, y = torch.zeros(64, 1, 2, 2), torch.arange(64)

    def draws_by_sample(loader) -> dict[int, torch.Tensor]:
        return {int(label): d for _, labels, draws in loader for label, d in zip(labels, draws)}

    whole = draws_by_sample(Batches(TensorDataset(x, y), 8, shuffle=True, seed=1, augment=True))
    shards = [draws_by_sample(Batches(TensorDataset(x, y), 8, shuffle=True, seed=1, shard=(rank, 2), augment=True))
              for rank in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 32
    for shard in shards:  # each sample's draws are its own, in one process or in two
        assert all(torch.equal(draws, whole[sample]) for sample, draws in shard.items())
    assert len({tuple(d.tolist()) for d in whole.values()}) == 64  # no two samples (or ranks) shifted alike

    resumed = Batches(TensorDataset(x, y), 8, shuffle=True, seed=1, augment=True)
    resumed.load_state_dict({"epoch": 0, "batches": 5})
    rest = draws_by_sample(resumed)
    assert len(rest) == 24 and all(torch.equal(draws, whole[sample]) for sample, draws in rest.items())
    assert len(next(iter(Batches(TensorDataset(x, y), 8, shuffle=True)))) == 2  # no draws unless augmenting
