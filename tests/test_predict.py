"""Using the winner: `cnnlab predict` on image and IDX files, `cnnlab register` into the MLflow
Model Registry, and the registered model served by `mlflow models serve` over real HTTP."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnlab.analysis.predict import _from_mlflow, load_predictor, predict, read_inputs, to_training_look
from cnnlab.analysis.register import _input_and_output, register
from cnnlab.core import keys
from cnnlab.core.errors import CnnlabError
from cnnlab.training.callbacks import model_metadata
from cnnlab.training.config import load
from cnnlab.training.data import ImageDataModule
from cnnlab.training.heads import build_head
from cnnlab.training.idx import read_idx, write_idx
from cnnlab.training.images import to_mode, to_network_pixels
from cnnlab.training.module import Classifier
from cnnlab.training.network import build_network
from cnnlab.training.train import train
from cnnlab.training.trained import recorded_data_spec

from conftest import FILE_NAMES, compose_cfg, free_port, http_server, tiny_overrides

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """Two trainings in one store: a good one (3 epochs) and a poor one (a learning rate too small
    to learn anything in one epoch). Yields (store URI, good result, poor result, workdir)."""
    workdir = tmp_path_factory.mktemp("predict")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    results = []
    for name, extra in (("good", ["trainer.max_epochs=3"]), ("poor", ["optimizer.lr=1e-7"])):
        cfg = compose_cfg(*tiny_overrides(tiny_dataset, workdir / name, model=True), f"tracking.uri={uri}", *extra)
        results.append(train(cfg))
    return uri, results[0], results[1], workdir


@pytest.fixture
def store(runs):
    mlflow.set_tracking_uri(runs[0])  # the autouse fixture points each test at its own store
    return runs


def tiny_test_images(tiny_dataset) -> tuple[np.ndarray, np.ndarray]:
    return tuple(read_idx(tiny_dataset / FILE_NAMES[f"test_{kind}"])[:6] for kind in ("images", "labels"))


def checkpoint_classes(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    """What the trained network says about the IDX images themselves, normalised as in training."""
    module, norm = Classifier.restore(checkpoint), recorded_data_spec(checkpoint).normalize
    x = (torch.from_numpy(images.astype(np.float32) / 255)[:, None] - norm.mean) / norm.std
    with torch.no_grad():
        return module(x).argmax(1).numpy()


def test_an_image_of_any_size_or_polarity_is_made_to_look_like_the_training_data(tiny_dataset, tmp_path):
    images, _ = tiny_test_images(tiny_dataset)
    original = images[0].astype(np.float32) / 255
    big = Image.fromarray(images[0]).resize((84, 84), Image.Resampling.BICUBIC)   # 3x larger
    inverted = Image.fromarray(255 - images[0]).resize((112, 112))               # dark on white
    for picture in (big, inverted, inverted.convert("RGB")):
        pixels = to_training_look(picture, 28)
        assert pixels.shape == (28, 28) and pixels.min() >= 0 and pixels.max() <= 1
        assert np.abs(pixels - original).mean() < 0.06  # same polarity, same place, same scale
    wide = Image.new("L", (56, 28), 0)
    wide.paste(Image.fromarray(images[0]), (14, 0))  # not square: padded to a square, aspect kept
    pixels = to_training_look(wide, 28)
    assert np.abs(pixels[7:21, 7:21] - to_training_look(Image.fromarray(images[0]), 14)).mean() < 0.06


def transparent_pictures(image: np.ndarray, folder: Path) -> dict[Path, np.ndarray]:
    """PNG files that draw a light-on-dark 28x28 image on a transparent background, the ways a
    drawing program may store it, each with the image the model should get from it: the ink's
    opacity as the drawing (white or black ink), or the bright strokes as opaque pixels, light or
    dark, with transparent pixels of either colour around them."""
    full = np.full_like(image, 255)
    stroke = image >= 128
    masked = np.where(stroke, image, 0).astype(np.uint8)
    opaque = np.where(stroke, 255, 0).astype(np.uint8)
    rgba = {  # name: (colour of every pixel, opacity), what it should become
        "white_ink_alpha": (full, image, image),
        "black_ink_alpha": (np.zeros_like(image), image, image),
        "light_on_clear_black": (masked, opaque, masked),
        "light_on_clear_white": (np.where(stroke, image, 255), opaque, masked),
        "dark_on_clear_white": (np.where(stroke, 255 - image, 255), opaque, masked),
        "dark_on_clear_black": (np.where(stroke, 255 - image, 0), opaque, masked),
    }
    pictures = {}
    for name, (colour, alpha, expected) in rgba.items():
        path = folder / f"{name}.png"
        Image.merge("RGBA", [Image.fromarray(colour.astype(np.uint8))] * 3 + [Image.fromarray(alpha)]).save(path)
        pictures[path] = expected
    path = folder / "white_ink_alpha_la.png"  # grayscale with alpha
    Image.merge("LA", [Image.fromarray(full), Image.fromarray(image)]).save(path)
    pictures[path] = image
    return pictures


def test_a_drawing_on_a_transparent_background_keeps_its_ink_whatever_its_colour(tiny_dataset, tmp_path):
    """Transparency is the background: light ink on it stays, dark ink on it is inverted, and
    neither is erased by compositing on a colour the ink has."""
    images, _ = tiny_test_images(tiny_dataset)
    for path, expected in transparent_pictures(images[0], tmp_path).items():
        with Image.open(path) as picture:
            pixels = to_training_look(picture, 28)
        np.testing.assert_allclose(pixels, expected / 255, atol=1 / 255, err_msg=path.name)


def test_a_16_bit_grayscale_picture_looks_as_its_8_bit_version(tmp_path):
    """A 16-bit PNG is scaled to 8 bits, not clipped at 255 (which would make it all white)."""
    pattern = np.zeros((40, 40), dtype=np.uint8)
    pattern[10:30, 15:25] = np.linspace(60, 255, 20, dtype=np.uint8)[:, None]  # a graded bar on black
    Image.fromarray(pattern).save(tmp_path / "8.png")
    Image.fromarray(pattern.astype(np.uint16) * 257).save(tmp_path / "16.png")  # the same picture in 16 bits
    with Image.open(tmp_path / "8.png") as eight, Image.open(tmp_path / "16.png") as sixteen:
        assert sixteen.mode.startswith("I")
        expected, got = to_training_look(eight, 28), to_training_look(sixteen, 28)
    assert expected.max() > 0.5
    np.testing.assert_allclose(got, expected, atol=1 / 255)


def test_a_float_picture_of_intensities_in_0_1_is_not_black():
    # 0.5 * 255 = 127.5, which rounds half to even: 128.
    assert np.asarray(to_mode(Image.new("F", (4, 3), 0.5), 1)).tolist() == [[128] * 4] * 3
    assert np.asarray(to_mode(Image.new("F", (2, 2), 1.0), 3)).tolist() == [[[255] * 3] * 2] * 2
    # values beyond 1 are still 0..255 (or 0..65535) data
    assert np.asarray(to_mode(Image.new("F", (2, 2), 100.0), 1)).tolist() == [[100] * 2] * 2
    assert np.asarray(to_mode(Image.new("F", (2, 2), 65535.0), 1)).tolist() == [[255] * 2] * 2


def test_a_version_description_lists_at_most_20_class_names():
    """MLflow keeps a description in 5000 characters; the class_names tag holds every name."""
    names = [f"class_{i:03d}_with_a_rather_long_folder_name" for i in range(300)]
    text = _input_and_output({"class_names": names, "input_shape": [3, 64, 64],
                              keys.MODEL_PIXELS: keys.PIXELS_AS_PREPARED})
    assert len(text) < 2000 and "probabilities of 300 classes: class_000" in text
    assert "class_019" in text and "class_020" not in text
    assert text.endswith("... and 280 more.")
    few = _input_and_output({"class_names": ["cat", "dog"]})
    assert few.endswith("probabilities of 2 classes: cat, dog.")


@pytest.mark.train
def test_predict_classifies_png_jpeg_and_idx_files_as_the_checkpoint_does(store, tiny_dataset, tmp_path):
    _, good, _, workdir = store
    checkpoint = workdir / "good" / "run" / keys.CHECKPOINT
    images, labels = tiny_test_images(tiny_dataset)
    expected = checkpoint_classes(checkpoint, images)
    assert (expected == labels).mean() >= 0.8  # the good run has learnt the bars
    paths = []
    for i, image in enumerate(images):
        picture = Image.fromarray(image).resize((56 + 28 * (i % 3),) * 2, Image.Resampling.BICUBIC)
        if i % 2:  # every other one dark on light, as a JPEG
            picture = Image.fromarray(255 - np.asarray(picture)).convert("RGB")
        path = tmp_path / (f"img{i}.jpg" if i % 2 else f"img{i}.png")
        picture.save(path, quality=95)
        paths.append(path)
    write_idx(tmp_path / "some-images.gz", images)
    rows, errors = predict(load_predictor(str(checkpoint)), [*paths, tmp_path / "some-images.gz"])
    assert errors == [] and len(rows) == 2 * len(images)
    assert [r["class"] for r in rows[:6]] == [str(c) for c in expected]  # the files
    assert [r["class"] for r in rows[6:]] == [str(c) for c in expected]  # the IDX file, image by image
    assert rows[6]["input"].endswith("some-images.gz[0]")
    for row in rows:
        assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert row["probability"] == max(row["probabilities"].values())


@pytest.mark.train
def test_predict_classifies_drawings_on_transparent_backgrounds_as_the_checkpoint_does(store, tiny_dataset,
                                                                                      tmp_path):
    _, _, _, workdir = store
    checkpoint = workdir / "good" / "run" / keys.CHECKPOINT
    images, _ = tiny_test_images(tiny_dataset)
    pictures = {}
    for i, image in enumerate(images):
        folder = tmp_path / str(i)
        folder.mkdir()
        pictures.update(transparent_pictures(image, folder))
    rows, errors = predict(load_predictor(str(checkpoint)), list(pictures))
    assert errors == [] and len(rows) == len(pictures)
    expected = checkpoint_classes(checkpoint, np.stack(list(pictures.values())))
    assert [r["class"] for r in rows] == [str(c) for c in expected]


@pytest.mark.train
def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares its size and holds no pixels: what Pillow's size guard reads first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_a_bad_file_gets_its_own_line_and_the_others_are_still_classified(store, tiny_dataset, tmp_path):
    _, _, _, workdir = store
    images, _ = tiny_test_images(tiny_dataset)
    Image.fromarray(images[0]).save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])
    (tmp_path / "notes.txt").write_text("not an image")
    write_idx(tmp_path / "labels.gz", np.arange(5, dtype=np.uint8))
    write_idx(tmp_path / "small.gz", np.zeros((2, 8, 8), dtype=np.uint8))
    png_header_only(tmp_path / "bomb.png", 20_000, 20_000)  # 400 M pixels: Pillow refuses to decode it
    inputs = ["good.png", "truncated.png", "notes.txt", "missing.png", "labels.gz", "small.gz", "bomb.png"]
    out = tmp_path / "predictions.csv"
    result = subprocess.run([str(BIN / "cnnlab"), "predict", *inputs, "--model",
                             str(workdir / "good" / "run" / keys.CHECKPOINT), "--output", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 6 and "Traceback" not in result.stderr and "Warning" not in result.stderr
    for name, words in (("truncated.png", "broken image"), ("notes.txt", "not an image"),
                        ("missing.png", "No such file"), ("labels.gz", "not images"), ("small.gz", "8x8"),
                        ("bomb.png", "decompression bombs")):
        assert any(name in e and words in e for e in errors), (name, errors)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("input,class,probability,p_0") and len(lines) == 2 and lines[1].startswith("good.png,")


def test_a_model_that_is_neither_a_file_nor_an_mlflow_uri_is_one_line(tmp_path):
    with pytest.raises(CnnlabError, match=r"--model nothing\.ckpt: no such checkpoint file, and not an MLflow"):
        load_predictor("nothing.ckpt")


@pytest.mark.train
def test_register_puts_the_best_run_by_validation_under_an_alias(store):
    uri, good, poor, _ = store
    assert good[keys.BEST_VAL_ACC] > poor[keys.BEST_VAL_ACC]
    done = register("tiny-cnn", "champion", uri=uri)
    assert done["run_id"] == good["mlflow_run_id"] and done["version"] == 1
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("tiny-cnn", "champion")
    assert version.run_id == good["mlflow_run_id"] and int(version.version) == 1
    assert float(version.tags[f"metric.{keys.BEST_VAL_ACC}"]) == pytest.approx(good[keys.BEST_VAL_ACC], rel=1e-5)
    assert float(version.tags[f"metric.{keys.TEST_ACC}"]) == pytest.approx(good[keys.TEST_ACC], rel=1e-5)
    assert version.tags[keys.MODEL_NAME] == "cnn" and "by val/best_acc" in version.description
    assert json.loads(version.tags["class_names"]) == [str(c) for c in range(10)]  # the model's classes, on its page
    assert "grayscale, light on dark, shaped (N, 1, 28, 28); output: probabilities of 10 classes: 0, 1," in (
        version.description)
    # A given run, under another alias; the champion stays where it was.
    other = register("tiny-cnn", "challenger", run_id=poor["mlflow_run_id"], uri=uri)
    assert other["version"] == 2 and int(client.get_model_version_by_alias("tiny-cnn", "champion").version) == 1
    with pytest.raises(CnnlabError, match="the test set never selects a model"):
        register("tiny-cnn", metric=keys.TEST_ACC, uri=uri)
    with pytest.raises(CnnlabError, match="--run nope: no such run"):
        register("tiny-cnn", run_id="nope", uri=uri)


@pytest.mark.train
def test_predict_from_mlflow_uris_gives_the_checkpoints_probabilities(store, tiny_dataset, tmp_path):
    uri, good, _, workdir = store
    images, _ = tiny_test_images(tiny_dataset)
    write_idx(tmp_path / "images.gz", images)
    register("tiny-cnn-uris", "champion", run_id=good["mlflow_run_id"], uri=uri)
    local, _ = predict(load_predictor(str(workdir / "good" / "run" / keys.CHECKPOINT)), [tmp_path / "images.gz"])
    for model in (f"runs:/{good['mlflow_run_id']}/model", "models:/tiny-cnn-uris@champion"):
        rows, errors = predict(load_predictor(model), [tmp_path / "images.gz"])
        assert errors == [] and [r["class"] for r in rows] == [r["class"] for r in local]
        for a, b in zip(rows, local):
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    out = tmp_path / "p.json"
    result = subprocess.run([str(BIN / "cnnlab"), "predict", str(tmp_path / "images.gz"), "--model",
                             "models:/tiny-cnn-uris@champion", "--tracking-uri", uri, "--output", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [r["class"] for r in json.loads(out.read_text())] == [r["class"] for r in local]
    assert "Downloading artifacts" not in result.stderr  # MLflow's progress bars: the answer only


@pytest.mark.e2e
def test_the_registered_model_serves_probabilities_over_http(store, tiny_dataset, tmp_path):
    """`mlflow models serve -m models:/<name>@champion` on 127.0.0.1; a batch posted to /invocations
    comes back as probabilities, the same as the checkpoint's."""
    uri, good, _, workdir = store
    register("tiny-cnn-served", "champion", run_id=good["mlflow_run_id"], uri=uri)
    images, _ = tiny_test_images(tiny_dataset)
    pixels = (images.astype(np.float32) / 255)[:, None]
    expected = load_predictor(str(workdir / "good" / "run" / keys.CHECKPOINT))(pixels)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/tiny-cnn-served@champion", "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    # a loaded 2-core machine: imports and model loading take a while
    with http_server(cmd, f"http://127.0.0.1:{port}", tmp_path / "serve.log", ready="/ping", answer=None, env=env,
                     startup_s=180, name="mlflow models serve"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": pixels.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = np.array(json.loads(response.read())["predictions"])
    assert answer.shape == (len(images), 10)
    np.testing.assert_allclose(answer.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(answer, expected, atol=1e-5)


# --- models trained on colour data (CIFAR-10, image folders): pictures converted as their training images -----

def untrained_checkpoint(path: Path, *overrides: str, seed: int = 0) -> Path:
    """A checkpoint as `cnnlab train` writes it (the module's architecture and weights, the data
    module's hyperparameters), of an untrained network: what predict reads, without a training."""
    config = load(compose_cfg(*overrides))
    data, head = config.data, build_head(config.model, config.data.num_classes)
    torch.manual_seed(seed)
    net = build_network(config.model, data.channels, data.image_size, head.num_outputs)
    shape = [data.channels, data.image_size, data.image_size]
    module = Classifier(net, head, optimizer=None, architecture={"model": config.as_dict()["model"],
                                                                 "input_shape": shape, "num_labels": data.num_classes})
    datamodule = ImageDataModule(data, str(path.parent / "data"))
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "datamodule_hyper_parameters": dict(datamodule.hparams)}, path)
    return path


def colour_pictures(folder: Path) -> dict[str, Path]:
    """The same 40x24 picture (not square: padded) as RGB, RGBA, palette and grayscale PNGs."""
    rng = np.random.default_rng(3)
    rgb = np.zeros((24, 40, 3), dtype=np.uint8)
    rgb[..., 0] = np.linspace(0, 255, 40, dtype=np.uint8)[None]  # red grows left to right
    rgb[4:20, 10:30, 2] = 220                                    # a blue box
    rgb += rng.integers(0, 30, rgb.shape, dtype=np.uint8)
    picture = Image.fromarray(rgb, "RGB")
    alpha = np.full((24, 40), 255, dtype=np.uint8)
    alpha[:, :5] = 0
    made = {"rgb": picture, "rgba": Image.merge("RGBA", [*picture.split(), Image.fromarray(alpha)]),
            "palette": picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
            "gray": picture.convert("L")}
    paths = {}
    for name, image in made.items():
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    return paths


def by_hand(checkpoint: Path, pictures: list[Path]) -> np.ndarray:
    """The trained module on each picture as the preparation converts it, normalised per channel by hand."""
    module, spec = Classifier.restore(checkpoint).eval(), recorded_data_spec(checkpoint)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in spec.normalize.per_channel(spec.channels))
    pixels = []
    for path in pictures:
        with Image.open(path) as image:
            pixels.append(to_network_pixels(image, spec.channels, spec.image_size))
    x = torch.from_numpy(np.stack(pixels).astype(np.float32) / 255)
    with torch.no_grad():
        return torch.softmax(module((x - mean) / std), dim=1).numpy()


def test_a_colour_model_classifies_rgb_rgba_palette_and_gray_pictures_as_prepared(tmp_path):
    checkpoint = untrained_checkpoint(tmp_path / "model.ckpt", "data=cifar10")
    predictor = load_predictor(str(checkpoint))
    assert predictor.input_shape == (3, 32, 32) and predictor.pixels == keys.PIXELS_AS_PREPARED
    assert predictor.model.mean.shape == predictor.model.std.shape == (1, 3, 1, 1)
    pictures = colour_pictures(tmp_path)
    for name, path in pictures.items():
        (_, pixels), = read_inputs(path, predictor.input_shape, predictor.pixels)
        with Image.open(path) as image:
            expected = to_network_pixels(image, 3, 32).astype(np.float32) / 255
        assert pixels.shape == (3, 32, 32), name
        np.testing.assert_array_equal(pixels, expected, err_msg=name)  # no inversion, colour kept
    with Image.open(pictures["gray"]) as image:  # a grayscale picture: the same value in R, G and B
        gray = to_network_pixels(image, 3, 32)
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    rows, errors = predict(predictor, list(pictures.values()))
    assert errors == [] and [r["input"] for r in rows] == [str(p) for p in pictures.values()]
    expected = by_hand(checkpoint, list(pictures.values()))
    for row, p in zip(rows, expected):
        np.testing.assert_allclose(list(row["probabilities"].values()), p, atol=1e-5)
        assert row["class"] == recorded_data_spec(checkpoint).class_names[int(p.argmax())]
    # the colours matter: the RGB picture and its gray version are different inputs
    assert not np.allclose(expected[0], expected[3], atol=1e-7)


def test_an_idx_file_for_a_colour_model_is_one_line(tmp_path):
    predictor = load_predictor(str(untrained_checkpoint(tmp_path / "model.ckpt", "data=cifar10")))
    write_idx(tmp_path / "images.gz", np.zeros((2, 32, 32), dtype=np.uint8))
    rows, errors = predict(predictor, [tmp_path / "images.gz"])
    assert rows == [] and len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(f"{tmp_path / 'images.gz'}: IDX files hold grayscale images")


def test_an_idx_model_still_sees_pictures_light_on_dark(tmp_path):
    checkpoint = untrained_checkpoint(tmp_path / "model.ckpt")  # data=mnist: format idx
    predictor = load_predictor(str(checkpoint))
    assert predictor.pixels == keys.PIXELS_LIGHT_ON_DARK and predictor.input_shape == (1, 28, 28)
    picture = np.full((28, 28), 255, dtype=np.uint8)
    picture[8:20, 12:16] = 0  # a dark bar on white paper
    Image.fromarray(picture).save(tmp_path / "bar.png")
    (_, pixels), = read_inputs(tmp_path / "bar.png", predictor.input_shape, predictor.pixels)
    np.testing.assert_array_equal(pixels[0], (255 - picture) / 255)  # inverted


def test_a_colour_model_logged_to_mlflow_says_how_its_pictures_look(tmp_path):
    """The logged model's metadata (callbacks.model_metadata) tells predict to convert pictures
    as prepared; a model logged without the key (older cnnlab) is light on dark."""
    import mlflow.pytorch

    checkpoint = untrained_checkpoint(tmp_path / "model.ckpt", "data=cifar10")
    local = load_predictor(str(checkpoint))
    metadata = model_metadata(local.class_names, local.input_shape, "cifar10")
    assert metadata[keys.MODEL_PIXELS] == keys.PIXELS_AS_PREPARED
    assert model_metadata(["a", "b"], (1, 28, 28), "idx")[keys.MODEL_PIXELS] == keys.PIXELS_LIGHT_ON_DARK
    example = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    for name, meta in (("new", metadata), ("old", {k: v for k, v in metadata.items() if k != keys.MODEL_PIXELS})):
        with torch.inference_mode():
            mlflow.pytorch.save_model(local.model, str(tmp_path / name), metadata=meta, input_example=example,
                                      pip_requirements=["torch"])
    logged = _from_mlflow(str(tmp_path / "new"))
    assert logged.pixels == keys.PIXELS_AS_PREPARED and logged.input_shape == (3, 32, 32)
    np.testing.assert_allclose(logged(example), local(example), atol=1e-5)
    pictures = list(colour_pictures(tmp_path).values())
    rows, errors = predict(logged, pictures)
    assert errors == []
    for row, p in zip(rows, by_hand(checkpoint, pictures)):
        np.testing.assert_allclose(list(row["probabilities"].values()), p, atol=1e-5)
    assert _from_mlflow(str(tmp_path / "old")).pixels == keys.PIXELS_LIGHT_ON_DARK
