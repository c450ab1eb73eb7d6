"""Image folders (cnnlab.training.folder): the arrays they become, when they are converted again,
and the one-line answer to each kind of bad input, never half-written data."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cnnlab.core.config import DataSpec, class_folders, compose_params, folder_dataset_name, parse
from cnnlab.core.errors import CnnlabError
from cnnlab.training import folder, prepared
from cnnlab.training.datasets import FORMATS
from cnnlab.training.images import to_network_pixels

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def base_data(tmp_path_factory) -> dict:
    """conf/data/folder.yaml as composed (once: a composition costs a fifth of a second)."""
    root = tmp_path_factory.mktemp("template") / "template"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    return yaml.safe_load(compose_params(["data=folder", f"data.path={root}"]))["data"]


@pytest.fixture
def make_spec(base_data):
    """The `spec` a run hands the format: the composed data section for folder `root` (its name and
    class names read from it, as the config's resolvers do), checked by DataSpec, as a dict."""
    def make(root: Path, **overrides) -> dict:
        names = class_folders(str(root))
        data = {**base_data, "path": str(root), "name": folder_dataset_name(str(root)), "class_names": names,
                "num_classes": len(names), "sources": [str(root)], **overrides}
        return dataclasses.asdict(parse(DataSpec, data, "data"))
    return make


def save(path: Path, image: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w)).astype(np.uint16))
    if mode == "P":
        return Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8), "RGB").quantize(16)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 255, (h, w, channels)).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def mixed_folder(root: Path) -> Path:
    """Three classes of images in every mode, size and shape, PNG and JPEG, one in a sub-folder,
    and hidden files that are no images of the dataset."""
    save(root / "cat" / "0.png", noise("L", (20, 30), 0))
    save(root / "cat" / "1.jpg", noise("RGB", (40, 20), 1), quality=90)
    save(root / "cat" / "more" / "2.png", noise("RGBA", (32, 32), 2))
    save(root / "cat" / "3.webp", noise("RGB", (33, 17), 3))
    save(root / "dog" / "0.png", noise("P", (25, 25), 4))
    save(root / "dog" / "1.png", noise("I;16", (16, 16), 5))
    save(root / "dog" / "2", noise("RGB", (64, 64), 6), format="PNG")  # no extension: Pillow decides
    save(root / "dog" / "3.png", noise("L", (8, 50), 7))
    for n in range(4):
        save(root / "owl" / f"{n}.png", noise("RGB", (32, 32), 10 + n))
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1 not an image")
    save(root / "owl" / ".hidden" / "x.png", noise("L", (9, 9), 99))
    return root


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts))


def arrays_of(dest: Path) -> dict[str, np.ndarray]:
    return {key: np.load(dest / prepared.array_file(key)) for key in prepared.ARRAYS}


def stats_of(dest: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(dest.iterdir())}


def one_line_error(excinfo, *words: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert str(word) in message, message
    return message


@pytest.fixture
def mixed(tmp_path, make_spec):
    root = mixed_folder(tmp_path / "pets")
    return root, make_spec(root), tmp_path / "data"


# --- what a folder becomes ---------------------------------------------------------------------------

def test_every_image_becomes_its_network_pixels_with_its_class_label(mixed):
    root, spec, data_dir = mixed
    manifest = folder.prepare(spec, data_dir, 60)
    train_x, train_y = FORMATS["folder"].load(spec, data_dir, "train")
    test_x, test_y = FORMATS["folder"].load(spec, data_dir, "test")
    assert train_x.dtype == np.uint8 and train_x.shape[1:] == (3, 32, 32) and train_y.dtype == np.int64
    assert len(train_y) + len(test_y) == 12 and len(test_y) == 3  # one of each class's four (0.2 of 4, at least 1)
    labels = {"cat": 0, "dog": 1, "owl": 2}
    expected = sorted((to_network_pixels(Image.open(p), 3, 32).tobytes(), labels[p.relative_to(root).parts[0]])
                      for p in image_files(root))
    got = sorted((x.tobytes(), int(y)) for x, y in zip(np.concatenate([train_x, test_x]), np.concatenate([train_y,
                                                                                                            test_y])))
    assert got == expected
    assert manifest["counts"]["test"] == {"cat": 1, "dog": 1, "owl": 1}
    assert manifest["skipped"] == [] and folder.skipped(spec, data_dir) == []
    shaped_by = {"files": manifest["checksum"], "channels": 3, "image_size": 32, "class_names": spec["class_names"],
                 "left_out": [], "test_fraction": 0.2, "split_seed": spec["split_seed"]}
    made_by = json.dumps(shaped_by, sort_keys=True)
    assert folder.checksum(spec, data_dir) == hashlib.md5(made_by.encode()).hexdigest()  # files and how they were split
    assert manifest["data_checksum"] == folder.checksum(spec, data_dir)
    assert folder.source(spec, data_dir) == str(root.resolve()) == manifest["source"]


def test_grayscale_and_other_sizes(mixed, make_spec):
    root, _, data_dir = mixed
    spec = make_spec(root, channels=1, image_size=12)
    folder.prepare(spec, data_dir, 60)
    x, _ = FORMATS["folder"].load(spec, data_dir, "train")
    assert x.shape[1:] == (1, 12, 12)
    one = Image.open(root / "owl" / "0.png")
    assert any((row == to_network_pixels(one, 1, 12)).all() for row in np.concatenate(
        [x, FORMATS["folder"].load(spec, data_dir, "test")[0]]))


def test_same_folder_same_arrays_and_ready_follows_the_files(mixed):
    root, spec, data_dir = mixed
    assert not folder.ready(spec, data_dir)
    folder.prepare(spec, data_dir, 60)
    dest = folder.prepared_dir(spec, data_dir)
    first = arrays_of(dest)
    assert folder.ready(spec, data_dir)
    again = data_dir.parent / "data2"
    folder.prepare(spec, again, 60)
    for key, array in arrays_of(folder.prepared_dir(spec, again)).items():
        assert np.array_equal(array, first[key]), key

    extra = save(root / "owl" / "9.png", noise("RGB", (32, 32), 50))
    assert not folder.ready(spec, data_dir)
    extra.unlink()
    assert folder.ready(spec, data_dir)
    (root / "dog" / "3.png").unlink()
    assert not folder.ready(spec, data_dir)
    save(root / "dog" / "3.png", noise("L", (8, 50), 8))  # another picture under the same name
    assert not folder.ready(spec, data_dir)
    assert not folder.ready({**spec, "image_size": 16}, data_dir)  # settings matter too


def test_touched_files_rewrite_only_the_manifest(mixed):
    root, spec, data_dir = mixed
    manifest = folder.prepare(spec, data_dir, 60)
    dest = folder.prepared_dir(spec, data_dir)
    arrays = {k: v for k, v in stats_of(dest).items() if k.endswith(".npy")}
    for n, path in enumerate(image_files(root)):
        os.utime(path, ns=(10**18 + n, 10**18 + n))
    assert not folder.ready(spec, data_dir)
    touched = folder.prepare(spec, data_dir, 60)
    assert {k: v for k, v in stats_of(dest).items() if k.endswith(".npy")} == arrays  # not written again
    assert touched["checksum"] == manifest["checksum"] and touched["arrays"] == manifest["arrays"]
    assert touched["files_signature"] != manifest["files_signature"]
    assert folder.ready(spec, data_dir)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*arrays, "manifest.json"])  # no temp files left


def test_changed_bytes_change_the_checksum_and_the_arrays(mixed):
    root, spec, data_dir = mixed
    before = folder.prepare(spec, data_dir, 60)
    old = arrays_of(folder.prepared_dir(spec, data_dir))
    save(root / "owl" / "0.png", noise("RGB", (32, 32), 77))
    assert not folder.ready(spec, data_dir)
    after = folder.prepare(spec, data_dir, 60)
    assert after["checksum"] != before["checksum"]
    new = arrays_of(folder.prepared_dir(spec, data_dir))
    assert not all(np.array_equal(new[k], old[k]) for k in ("train_images", "test_images"))
    assert folder.ready(spec, data_dir)


def test_a_folder_with_its_own_train_and_test(tmp_path, make_spec):
    root = tmp_path / "split"
    for split, count in (("train", 3), ("test", 2)):
        for label, name in enumerate(("x", "y")):
            for n in range(count):
                save(root / split / name / f"{n}.png", noise("L", (10, 10), 100 * label + 10 * n + len(split)))
    spec = make_spec(root)
    assert spec["class_names"] == ["x", "y"]
    manifest = folder.prepare(spec, tmp_path / "data", 60)
    assert manifest["counts"] == {"train": {"x": 3, "y": 3}, "test": {"x": 2, "y": 2}}
    x, y = FORMATS["folder"].load(spec, tmp_path / "data", "test")
    assert y.tolist() == [0, 1, 0, 1]  # by file name within the class folders, then by class
    assert (x[1] == to_network_pixels(Image.open(root / "test" / "y" / "0.png"), 3, 32)).all()

    (root / "test" / "z").mkdir()
    save(root / "test" / "z" / "0.png", noise("L", (10, 10), 1))
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, tmp_path / "data", 60)
    one_line_error(excinfo, root, "only in test/: z")


def test_stratified_split_is_seeded_and_keeps_each_class_share(tmp_path, make_spec):
    root = tmp_path / "many"
    sizes = {"big": 20, "pair": 2, "solo": 1, "mid": 7}
    for c, (name, count) in enumerate(sizes.items()):
        for n in range(count):
            save(root / name / f"{n:02d}.png", noise("L", (6, 6), 1000 * c + n))
    data_dir = tmp_path / "data"

    def test_set(seed: int, fraction: float = 0.25) -> tuple[dict, bytes]:
        spec = make_spec(root, split_seed=seed, test_fraction=fraction)
        manifest = folder.prepare(spec, data_dir, 60)
        return manifest["counts"]["test"], FORMATS["folder"].load(spec, data_dir, "test")[0].tobytes()

    counts, first = test_set(1)
    assert counts == {"big": 5, "mid": 2, "pair": 1, "solo": 0}  # round(0.25 n), at least 1 of two, never all
    assert test_set(1) == (counts, first)
    assert test_set(2)[1] != first
    assert test_set(1, 0.5)[0] == {"big": 10, "mid": 4, "pair": 1, "solo": 0}


def test_classes_of_one_image_each_leave_nothing_to_test_on(tmp_path, make_spec):
    root = tmp_path / "singles"
    for c, name in enumerate(("a", "b", "c")):
        save(root / name / "only.png", noise("L", (6, 6), c))
    with pytest.raises(CnnlabError, match=r"singles: no class has two images.*train/ and test/") as error:
        folder.prepare(make_spec(root), tmp_path / "data", 60)
    assert "\n" not in str(error.value) and not (tmp_path / "data" / "singles" / prepared.MANIFEST).exists()


def test_the_data_module_prepares_and_reads_a_folder(mixed):
    from cnnlab.training.data import ImageDataModule

    root, spec, data_dir = mixed
    module = ImageDataModule({k: v for k, v in spec.items()} | {"val_size": 2}, data_dir=str(data_dir))
    module.prepare_data()
    module.setup("fit")
    assert module.checksum == folder.checksum(spec, data_dir) and module.source == str(root.resolve())
    assert module.train.tensors[0].shape[1:] == (3, 32, 32) and len(module.train) + len(module.val) == 9


# --- bad input: one line naming the file, and nothing half-written ------------------------------------

def test_an_empty_class_folder(mixed):
    root, spec, data_dir = mixed
    for path in (root / "owl").glob("*.png"):
        path.unlink()
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, root / "owl", "add images")
    assert not folder.ready(spec, data_dir) and not data_dir.exists()


def test_fewer_than_two_classes_is_refused(mixed, tmp_path):
    root, spec, data_dir = mixed
    save(tmp_path / "lonely" / "cat" / "0.png", noise("L", (6, 6), 0))
    with pytest.raises(CnnlabError) as excinfo:  # when the config is composed, before any work
        class_folders(str(tmp_path / "lonely"))
    one_line_error(excinfo, "lonely", "one class folder (cat)", "at least two")
    with pytest.raises(CnnlabError) as excinfo:  # a class folder the config does not name
        folder.prepare({**spec, "class_names": ["cat", "dog"], "num_classes": 2}, data_dir, 60)
    one_line_error(excinfo, root, "owl")


def bad_files(root: Path) -> dict[str, bytes]:
    """Files that are no good image: their names and bytes."""
    png = io.BytesIO()
    noise("RGB", (64, 64), 3).save(png, format="PNG")
    jpeg = io.BytesIO()
    noise("RGB", (64, 64), 4).save(jpeg, format="JPEG")
    return {"cut.png": png.getvalue()[:400], "cut.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
            "notes.txt": b"just some words\n", "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4}


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg", "notes.txt", "garbage.png"])
def test_a_damaged_or_foreign_file_is_named(mixed, name):
    root, spec, data_dir = mixed
    (root / "dog" / name).write_bytes(bad_files(root)[name])
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, root / "dog" / name, "data.skip_bad_files=true")
    assert not data_dir.exists()


def test_an_enormous_image_is_refused(mixed, make_spec):
    root, _, data_dir = mixed
    spec = make_spec(root, max_image_pixels=4096)  # the largest of the others is 64x64
    save(root / "dog" / "big.png", noise("L", (80, 60), 1))  # between one and two times the limit
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, root / "dog" / "big.png", "80x60", "data.max_image_pixels=4096")
    (root / "dog" / "big.png").unlink()
    save(root / "dog" / "huge.png", noise("L", (200, 100), 1))  # Pillow's own guard: more than twice
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, root / "dog" / "huge.png", "20000 pixels", "data.max_image_pixels=4096")
    assert Image.MAX_IMAGE_PIXELS != 4096  # Pillow's guard is back as it was


def test_skipped_bad_files_are_listed(mixed, make_spec, caplog):
    root, _, data_dir = mixed
    spec = make_spec(root, skip_bad_files=True, max_image_pixels=4096)
    for name, data in bad_files(root).items():
        (root / "dog" / name).write_bytes(data)
    save(root / "owl" / "big.png", noise("L", (80, 60), 1))
    with caplog.at_level(logging.WARNING, logger="cnnlab.training.folder"):
        manifest = folder.prepare(spec, data_dir, 60)
    assert "5 bad files left out" in caplog.text
    listed = {entry["file"]: entry["reason"] for entry in folder.skipped(spec, data_dir)}
    assert sorted(listed) == ["dog/cut.jpg", "dog/cut.png", "dog/garbage.png", "dog/notes.txt", "owl/big.png"]
    assert all(reason and "\n" not in reason for reason in listed.values())
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == 12
    assert folder.ready(spec, data_dir)

    for path in (root / "owl").glob("[0-9].png"):  # a class left with nothing but a bad file
        path.unlink()
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, root / "owl", "no readable images")


def test_a_failure_leaves_the_prepared_data_as_it_was(mixed):
    root, spec, data_dir = mixed
    folder.prepare(spec, data_dir, 60)
    dest = folder.prepared_dir(spec, data_dir)
    stats, manifest = stats_of(dest), (dest / "manifest.json").read_bytes()
    (root / "cat" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(CnnlabError):
        folder.prepare(spec, data_dir, 60)
    assert stats_of(dest) == stats and (dest / "manifest.json").read_bytes() == manifest
    assert not folder.ready(spec, data_dir)  # the folder changed: a run prepares again (and fails the same way)


def test_a_folder_that_changes_while_it_is_read(mixed, monkeypatch):
    root, spec, data_dir = mixed
    folder.prepare(spec, data_dir, 60)
    dest = folder.prepared_dir(spec, data_dir)
    stats = stats_of(dest)
    save(root / "cat" / "new.png", noise("L", (10, 10), 5))  # prepared again: the copy goes on meanwhile
    decode, calls = folder._decode, []

    def decode_while_copying(path, *args):
        if not calls:
            save(root / "owl" / "late.png", noise("L", (10, 10), 6))
        calls.append(path)
        return decode(path, *args)

    monkeypatch.setattr(folder, "_decode", decode_while_copying)
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, f"{root.resolve()} changed while it was being read (owl/late.png added)", "run again")
    assert stats_of(dest) == stats

    calls.clear()
    monkeypatch.setattr(folder, "_decode", lambda path, *args: (Path(path).unlink(), decode(path, *args))[1])
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, "changed while it was being read", "removed")
    assert stats_of(dest) == stats


@pytest.fixture
def deny(monkeypatch):
    """chmod 000 a file or folder. As root, whom permissions do not stop, also make this process's
    os.scandir and the module's open refuse it as the kernel would refuse anyone else."""
    denied: list[Path] = []
    if os.geteuid() == 0:
        scandir, real_open = os.scandir, open

        def refuse(path):
            if Path(path) in denied:
                raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(os, "scandir", lambda path=".": (refuse(path), scandir(path))[1])
        monkeypatch.setattr(folder, "open", lambda path, *a, **kw: (refuse(path), real_open(path, *a, **kw))[1],
                            raising=False)
        monkeypatch.setattr(folder.Image, "open", lambda path, *a, _open=Image.open, **kw: (refuse(path),
                                                                                        _open(path, *a, **kw))[1])

    def chmod(path: Path, allow: bool = False) -> Path:
        """Refuse `path` to everyone (or, with allow, give it back)."""
        if allow:
            denied.remove(path)
            os.chmod(path, 0o755)
        else:
            denied.append(path)
            os.chmod(path, 0)
        return path

    yield chmod
    for path in denied:
        os.chmod(path, 0o755)


def test_an_unreadable_file(mixed, make_spec, deny):
    root, spec, data_dir = mixed
    locked = deny(root / "dog" / "0.png")
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, locked, "Permission denied", "chmod")
    spec = make_spec(root, skip_bad_files=True)
    folder.prepare(spec, data_dir, 60)
    [entry] = folder.skipped(spec, data_dir)
    assert entry == {"file": "dog/0.png", "reason": "cannot read it (Permission denied)"}


def test_an_unreadable_class_folder(mixed, make_spec, deny):
    root, _, data_dir = mixed
    spec = make_spec(root, skip_bad_files=True)
    locked = deny(root / "cat" / "more")
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, locked, "chmod")
    deny(locked, allow=True)
    locked = deny(root / "owl")
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, locked, "make it readable")
    assert not folder.ready(spec, data_dir)


def test_the_prepared_arrays_never_go_into_the_image_folder(tmp_path, make_spec):
    root = mixed_folder(tmp_path / "data" / "pets")
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(make_spec(root), tmp_path / "data", 60)
    one_line_error(excinfo, "data.name")


@pytest.mark.train
def test_an_export_of_idx_files_trains_exactly_as_the_idx_files(tiny_dataset, tmp_path):
    """The README's claim, on the tiny dataset: IDX files exported as PNGs by the benchmark's
    exporter (files numbered in IDX order, class folders prefixed with their label) become the same
    tensors in the same order, so one seed trains the same model to the same test loss."""
    import sys

    from cnnlab.training.train import train

    from conftest import REPO, compose_cfg, tiny_overrides

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from export_png_folder import export_split
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    pictures = tmp_path / "pictures"
    folders = [f"{label}_digit" for label in range(10)]
    for split in ("train", "test"):
        export_split(tiny_dataset, pictures, split, folders)
    idx = train(compose_cfg(*tiny_overrides(tiny_dataset, tmp_path / "idx")))
    as_folder = train(compose_cfg(*tiny_overrides(tiny_dataset, tmp_path / "folder"), "data=folder",
                                  f"data.path={pictures}", "data.channels=1", "data.image_size=28",
                                  "data.normalize.mean=0.1307", "data.normalize.std=0.3081"))
    assert as_folder["test/loss"] == idx["test/loss"] and as_folder["test/acc"] == idx["test/acc"]
    assert as_folder["val/best_acc"] == idx["val/best_acc"]


@pytest.mark.train
def test_a_run_lists_the_images_it_left_out(tiny_colour_folder, tmp_path):
    """data.skip_bad_files=true: a few bad files among many are left out, and the run says which
    and why (tag data.skipped_files, artifact data/skipped_files.json); its MLflow datasets name
    the folder and the checksum the run read."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from cnnlab.core import keys
    from cnnlab.training.train import train

    from conftest import compose_cfg, tiny_colour_overrides

    pictures = tmp_path / "shapes"
    shutil.copytree(tiny_colour_folder, pictures)
    (pictures / "class_1" / "notes.png").write_text("not a picture")
    good = pictures / "class_2" / "000.png"
    (pictures / "class_2" / "cut.png").write_bytes(good.read_bytes()[:60])
    result = train(compose_cfg(*tiny_colour_overrides(pictures, tmp_path), "data.skip_bad_files=true"))
    run = MlflowClient(mlflow.get_tracking_uri()).get_run(result["mlflow_run_id"])
    assert run.data.tags[keys.DATA_SKIPPED] == "2"
    listed = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{keys.SKIPPED_ARTIFACT}")["skipped"]
    assert sorted(entry["file"] for entry in listed) == ["class_1/notes.png", "class_2/cut.png"]
    assert all(entry["reason"] for entry in listed)
    assert int(run.data.params["data.split.train_size"]) + int(run.data.params["data.split.val_size"]) == 240
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert json.loads(inputs["train"].source)["uri"] == str(pictures.resolve())
    assert inputs["train"].digest == run.data.tags[keys.DATA_CHECKSUM][:len(inputs["train"].digest)]


def test_the_fetch_stage_prepares_an_image_folder(tiny_colour_folder, tmp_path, capsys):
    """`dvc repro fetch` (cnnlab.training.prepare) on a params.yaml composed with data=folder: the
    stage's output, <data_dir>/<folder name>/, holds the arrays and the manifest."""
    from cnnlab.training.prepare import main

    params = tmp_path / "params.yaml"
    params.write_text(compose_params(["data=folder", f"data.path={tiny_colour_folder}",
                                      f"paths.data_dir={tmp_path / 'data'}"]))
    assert main(["--params", str(params)]) == 0
    spec = yaml.safe_load(params.read_text())["data"]
    dest = folder.prepared_dir(spec, tmp_path / "data")
    manifest = prepared.read_manifest(dest)
    assert capsys.readouterr().out.strip() == f"shapes: verified, checksum {folder.checksum(spec, tmp_path / 'data')}"
    assert manifest["counts"]["train"] == {f"class_{i}": 48 for i in range(5)}
    assert dest.parent == tmp_path / "data" / "shapes" and dest.name.startswith("3x32x32-")
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [prepared.MANIFEST, *(prepared.array_file(key) for key in prepared.ARRAYS)])


# --- layouts, OS files, other datasets' folders, what prepare logs -----------------------------------

def two_class_split(root: Path, *splits: str) -> Path:
    for split in splits:
        for c, name in enumerate(("x", "y")):
            for n in range(2):
                save(root / split / name / f"{n}.png", noise("L", (6, 6), 10 * c + n))
    return root


@pytest.mark.parametrize("splits, words", [
    (("train",), ["has train/ but no test/", "/test/<class>/", "data.test_fraction"]),
    (("test",), ["has test/ but no train/", "/train/<class>/"]),
    (("train", "val"), ["has train/ but no test/"]),
    (("train", "test", "val"), ["val/ beside train/ and test/", "data.val_size", "move val/'s"]),
    (("train", "test", "validation"), ["validation/ beside train/ and test/"]),
    (("train", "test", "extra"), ["extra/", "move extra/ into them"]),
])
def test_a_split_layout_needs_train_and_test_and_nothing_else(tmp_path, make_spec, splits, words):
    root = two_class_split(tmp_path / "split", *splits)
    with pytest.raises(CnnlabError) as excinfo:  # when the config is composed
        class_folders(str(root))
    one_line_error(excinfo, root, *words)
    # and when a folder that was fine is prepared after it changed
    ok = two_class_split(tmp_path / "ok", "train", "test")
    spec = make_spec(ok)
    two_class_split(ok, *splits)
    if set(splits) >= {"train", "test"}:
        with pytest.raises(CnnlabError) as excinfo:
            folder.prepare(spec, tmp_path / "data", 60)
        one_line_error(excinfo, ok, *words[:1])


def test_a_folder_named_Train_is_a_class(tmp_path, make_spec):
    root = two_class_split(tmp_path / "cased", "Train", "Test")
    assert class_folders(str(root)) == ["Test", "Train"]


def test_loose_files_beside_the_class_folders_are_left_out_with_one_warning(mixed, caplog):
    root, spec, data_dir = mixed
    (root / "README.txt").write_text("my pets\n")
    (root / "labels.csv").write_text("a,b\n")
    (root / ".hidden").write_text("x")
    (root / "Thumbs.db").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="cnnlab.training.folder"):
        manifest = folder.prepare(spec, data_dir, 60)
    assert sum(manifest["counts"]["train"].values()) + sum(manifest["counts"]["test"].values()) == 12
    warned = [r.getMessage() for r in caplog.records if "in no class" in r.getMessage()]
    assert warned == [f"{root.resolve()}: left out 2 files beside the class folders (in no class): first README.txt"]


def test_loose_files_in_train_and_test_are_left_out(tmp_path, make_spec, caplog):
    root = two_class_split(tmp_path / "split", "train", "test")
    (root / "test" / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="cnnlab.training.folder"):
        folder.prepare(make_spec(root), tmp_path / "data", 60)
    assert any("left out 1 file beside" in r.getMessage() and "test/notes.txt" in r.getMessage()
               for r in caplog.records)


def test_os_metadata_files_in_class_folders_are_skipped(mixed):
    root, spec, data_dir = mixed
    (root / "cat" / "Thumbs.db").write_bytes(b"\0\1 thumbnails")
    (root / "dog" / "DESKTOP.INI").write_text("[.ShellClassInfo]\n")
    (root / "owl" / "thumbs.DB").write_bytes(b"\0")
    manifest = folder.prepare(spec, data_dir, 60)
    assert manifest["skipped"] == [] and manifest["counts"]["train"] == {"cat": 3, "dog": 3, "owl": 3}
    (root / "owl" / "desktop.ini.txt").write_text("not an OS file")
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, "desktop.ini.txt", "not an image")


@pytest.mark.parametrize("manifest, fmt", [
    ({"dataset": "pets", "checksum": "c", "sources": ["x"], "files": {"train_images": {"name": "a.gz"}}}, "idx"),
    ({"dataset": "pets", "format": "cifar10", "checksum": "c"}, "cifar10"),
])
def test_a_folder_never_goes_into_another_formats_dataset(mixed, manifest, fmt):
    root, spec, data_dir = mixed
    dest = data_dir / spec["name"]
    dest.mkdir(parents=True)
    (dest / prepared.MANIFEST).write_text(json.dumps(manifest))
    before = stats_of(dest)
    assert not folder.ready(spec, data_dir) and folder.checksum(spec, data_dir) is None
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, data_dir, 60)
    one_line_error(excinfo, dest, f"holds dataset 'pets' of another format ({fmt}, from", "data.name=")
    assert stats_of(dest) == before


def test_preparing_an_unchanged_folder_again_writes_nothing(mixed, caplog):
    root, spec, data_dir = mixed
    folder.prepare(spec, data_dir, 60)
    dest = folder.prepared_dir(spec, data_dir)
    before = stats_of(dest)
    with caplog.at_level(logging.INFO, logger="cnnlab.training.folder"):
        again = folder.prepare(spec, data_dir, 60)  # `cnnlab fetch` verifies every byte each time
    assert stats_of(dest) == before and again == prepared.read_manifest(dest)
    messages = [r.getMessage() for r in caplog.records]
    assert any("unchanged" in m for m in messages) and not any("touched" in m for m in messages), messages
    assert not any(again["checksum"] in m for m in messages)

    caplog.clear()
    os.utime(root / "owl" / "0.png", ns=(10**18, 10**18))
    with caplog.at_level(logging.INFO, logger="cnnlab.training.folder"):
        folder.prepare(spec, data_dir, 60)
    messages = [r.getMessage() for r in caplog.records]
    assert any("files touched but unchanged; manifest updated" in m for m in messages), messages
    assert not any("checksum" in m for m in messages)


def test_a_class_of_one_image_is_named_in_a_warning(tmp_path, make_spec, caplog):
    root = tmp_path / "few"
    for name, count in (("a", 3), ("b", 1), ("c", 1)):
        for n in range(count):
            save(root / name / f"{n}.png", noise("L", (6, 6), n))
    with caplog.at_level(logging.WARNING, logger="cnnlab.training.folder"):
        manifest = folder.prepare(make_spec(root), tmp_path / "data", 60)
    assert manifest["counts"]["test"] == {"a": 1, "b": 0, "c": 0}
    assert [r.getMessage() for r in caplog.records if "one image" in r.getMessage()] == [
        f"{root.resolve()}: classes b, c have one image each: they are in the training part only, so the test set "
        f"has none of them"]
    (root / "c" / "0.png").rename(root / "a" / "9.png")
    (root / "c").rmdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cnnlab.training.folder"):
        folder.prepare(make_spec(root), tmp_path / "data", 60)
    assert any("class b has one image: it is in the training part only, so the test set has none of it"
               in r.getMessage() for r in caplog.records)


def test_two_ways_of_preparing_one_folder_keep_their_own_arrays(mixed, caplog):
    """A sweep over data.channels converts the folder once per setting, and each setting's runs
    read only their own arrays (parallel jobs never see each other's)."""
    root, spec, data_dir = mixed
    gray = {**spec, "channels": 1}
    folder.prepare(spec, data_dir, 60)
    folder.prepare(gray, data_dir, 60)
    assert folder.prepared_dir(spec, data_dir) != folder.prepared_dir(gray, data_dir)
    assert folder.ready(spec, data_dir) and folder.ready(gray, data_dir)
    assert FORMATS["folder"].load(spec, data_dir, "train")[0].shape[1] == 3
    assert FORMATS["folder"].load(gray, data_dir, "train")[0].shape[1] == 1
    assert folder.checksum(spec, data_dir) != folder.checksum(gray, data_dir)


def test_knobs_that_shaped_nothing_leave_the_checksum_alone(tmp_path, make_spec):
    """data.max_image_pixels with no image that large, or the split knobs of a folder with its own
    train/ and test/, made the same arrays: the same data, the same task."""
    root = tmp_path / "split"
    for split in ("train", "test"):
        for label, name in enumerate(("x", "y")):
            for n in range(3):
                save(root / split / name / f"{n}.png", noise("L", (10, 10), 100 * label + 10 * n + len(split)))
    spec = make_spec(root)
    folder.prepare(spec, tmp_path / "data", 60)
    first = folder.checksum(spec, tmp_path / "data")
    for change in ({"max_image_pixels": 10_000}, {"test_fraction": 0.5, "split_seed": 7}, {"skip_bad_files": True}):
        other = {**spec, **change}
        folder.prepare(other, tmp_path / "data", 60)
        assert folder.checksum(other, tmp_path / "data") == first, change
    other = {**spec, "image_size": 16}
    folder.prepare(other, tmp_path / "data", 60)
    assert folder.checksum(other, tmp_path / "data") != first


def test_copied_arrays_are_still_ready_and_damaged_ones_are_not(mixed):
    """`dvc checkout`, `dvc pull` or `cp -r` give the arrays new mtimes: their bytes are checked
    against the manifest's MD5s, and they are used as they are; a changed byte is not."""
    root, spec, data_dir = mixed
    folder.prepare(spec, data_dir, 60)
    dest = folder.prepared_dir(spec, data_dir)
    for path in dest.glob("*.npy"):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert folder.ready(spec, data_dir)
    target = dest / prepared.array_file("test_images")
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    assert not folder.ready(spec, data_dir)


def test_without_the_image_folder_its_intact_arrays_are_used(mixed, tmp_path, caplog):
    """A teammate who pulls the prepared arrays (the fetch stage's DVC output) without the pictures
    trains on them, warned; a missing folder with no arrays is one line."""
    import shutil

    root, spec, data_dir = mixed
    folder.prepare(spec, data_dir, 60)
    shutil.move(root, tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING, logger="cnnlab.training.folder"):
        assert folder.ready(spec, data_dir)
    assert any("is not here" in r.getMessage() for r in caplog.records)
    assert FORMATS["folder"].load(spec, data_dir, "test")[0].shape[1:] == (3, 32, 32)
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, tmp_path / "other-data", 60)
    one_line_error(excinfo, "data.path", str(root), "not a folder")


def test_arrays_never_go_inside_the_image_folder(mixed, tmp_path):
    root, spec, _ = mixed
    with pytest.raises(CnnlabError) as excinfo:
        folder.prepare(spec, root / "cache", 60)
    one_line_error(excinfo, str(root), "data.name")
    assert not (root / "cache").exists()
