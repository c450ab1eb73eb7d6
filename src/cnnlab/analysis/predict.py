"""`cnnlab predict`: classify image files (PNG, JPEG, any size) or IDX files with a trained model.

The model is a checkpoint (`models/model.ckpt`) or an MLflow model URI (`runs:/<run id>/model`,
`models:/<name>@champion`, `models:/<name>/3`). Each image is made to look like the training
data before it is classified: for a model trained on IDX data (MNIST-style), one grayscale
channel, light on dark (a dark drawing on white paper is inverted; on a transparent background,
dark ink is), padded to a square and resized to the model's input size (`to_training_look`); for
a model trained on an image folder or CIFAR-10, converted exactly as those training images were
(cnnlab.training.images.to_network_pixels: colour or grayscale as the model takes, no inversion).
Pixel values are in [0, 1]; the model itself applies the data's normalisation (heads.FromPixels).
Prints one line per input (its class and that class's probability) or writes them as CSV/JSON.
An input that cannot be read gets its own `error:` line; the others are still classified, and
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnlab.core import keys
from cnnlab.core.errors import CnnlabError, command, one_line, show
from cnnlab.core.files import csv_text, write_atomic
from cnnlab.training.idx import MAGIC_UBYTE, read_idx

if TYPE_CHECKING:  # torch is imported where a model is loaded: `cnnlab predict --help` does not wait for it
    from torch import nn

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "file:", "s3:", "gs:", "wasbs:", "http:", "https:")
DARK_BACKGROUND = 0.5  # an image whose border is brighter than this is dark-on-light: inverted


@dataclass
class Predictor:
    """A model that takes pixel values in [0, 1], shaped (N, channels, size, size), and returns
    probabilities; with the names of its classes."""
    model: nn.Module
    class_names: list[str]
    input_shape: tuple[int, int, int]
    pixels: str = keys.PIXELS_LIGHT_ON_DARK  # how a picture is made to look like the training images

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities, one row per image, one column per class (a sigmoid model's single
        output p becomes the two columns 1 - p, p)."""
        import torch

        with torch.inference_mode():
            probs = self.model(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))).float()
        if probs.shape[1] == 1:
            probs = torch.cat([1 - probs, probs], dim=1)
        return probs.numpy()


def load_predictor(source: str) -> Predictor:
    """A checkpoint file, else an MLflow model URI; anything else is one line saying which is which."""
    path = Path(source)
    if path.is_file():
        return _from_checkpoint(path)
    if source.startswith(MLFLOW_SCHEMES):
        return _from_mlflow(source)
    raise CnnlabError(f"--model {source}: no such checkpoint file, and not an MLflow model URI "
                      f"(runs:/<run id>/model, models:/<name>@<alias>)")


def _from_checkpoint(path: Path) -> Predictor:
    from cnnlab.training.heads import FromPixels, WithProbabilities
    from cnnlab.training.images import pixels_of
    from cnnlab.training.trained import load_weights, rebuild, recorded_data_spec

    net, head, _, weights = rebuild(path)
    probabilities = WithProbabilities(net, head)  # net.* and head.*, as in the LightningModule's state dict
    load_weights(probabilities, weights, path)
    spec = recorded_data_spec(path)
    model = FromPixels(probabilities, *spec.normalize.per_channel(spec.channels)).eval()
    return Predictor(model, head.class_names(spec.class_names), (spec.channels, spec.image_size, spec.image_size),
                     pixels_of(spec.format))


def _from_mlflow(uri: str) -> Predictor:
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException

    from cnnlab.tracking.store import default_http_settings

    default_http_settings()  # MLflow's own would wait minutes on a dead server
    try:
        info = mlflow.models.get_model_info(uri)
        metadata = info.metadata or {}
        if metadata.get(keys.MODEL_INPUT) != keys.MODEL_INPUT_PIXELS:
            raise CnnlabError(f"--model {uri}: this model does not say it takes pixel values (logged by an older "
                              f"cnnlab?); use its checkpoint instead")
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
        if isinstance(model, torch.export.ExportedProgram):  # MLflow 3's torch.export format
            model = model.module()
    except MlflowException as exc:
        raise CnnlabError(f"--model {uri}: cannot load it from {mlflow.get_tracking_uri()} "
                          f"({one_line(exc)[:200]})") from None
    # Models logged before the key existed were all trained on IDX data: light on dark.
    pixels = metadata.get(keys.MODEL_PIXELS, keys.PIXELS_LIGHT_ON_DARK)
    if pixels not in (keys.PIXELS_LIGHT_ON_DARK, keys.PIXELS_AS_PREPARED):
        raise CnnlabError(f"--model {uri}: its metadata {keys.MODEL_PIXELS}={pixels!r} is not a kind of picture "
                          f"this cnnlab knows ({keys.PIXELS_LIGHT_ON_DARK}, {keys.PIXELS_AS_PREPARED}); "
                          f"use a newer cnnlab")
    return Predictor(model, [str(n) for n in metadata["class_names"]], tuple(metadata["input_shape"]), pixels)


# --- inputs ------------------------------------------------------------------------------------------

def to_training_look(image, size: int) -> np.ndarray:
    """A PIL image as MNIST-style IDX data looks: grayscale, light on dark, square, `size` x `size`,
    values in [0, 1]. Transparent parts count as background."""
    from cnnlab.training.images import pad_to_square, resize, to_mode

    alpha = None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255
        image = rgba.convert("RGB")  # the colour of the opaque pixels, without their alpha
    gray = np.asarray(to_mode(image, 1), dtype=np.float32) / 255  # 16-bit gray scaled, not clipped at 255
    if alpha is not None and alpha.min() < 1:
        # Transparency is the background whatever colour the ink is, so the opaque pixels are the
        # drawing: light ink stays light, dark ink is inverted, each weighted by its opacity (the
        # background becomes 0). Compositing on a fixed colour and judging the border would erase
        # ink of that colour.
        ink = float((alpha * gray).sum() / alpha.sum()) if alpha.sum() > 0 else 1.0
        gray = alpha * (gray if ink > DARK_BACKGROUND else 1 - gray)
    else:
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        if border.mean() > DARK_BACKGROUND:
            gray = 1 - gray  # MNIST-style data is light on dark
    # Padded to a square (the aspect ratio kept) with the border's colour, and resized with
    # Pillow's antialiasing filter, on 8-bit values as the IDX files hold them: the same steps as
    # the image-folder preparation (cnnlab.training.images).
    pixels = resize(pad_to_square(np.round(gray * 255).astype(np.uint8)), size)
    return pixels.astype(np.float32) / 255


def as_prepared(image, channels: int, size: int) -> np.ndarray:
    """A PIL image as an image folder's (or CIFAR-10's) training images were prepared: Pillow's
    conversion to `channels` channels, padded to a square, resized; (channels, size, size) in [0, 1]."""
    from cnnlab.training.images import to_network_pixels

    return to_network_pixels(image, channels, size).astype(np.float32) / 255


def read_inputs(path: Path, shape: tuple[int, int, int],
                pixels: str = keys.PIXELS_LIGHT_ON_DARK) -> list[tuple[str, np.ndarray]]:
    """(name, pixels shaped `shape`) for each image in the file: one for a PNG/JPEG, one per image
    of an IDX images file (named file[i]). `pixels` says how a picture is made to look like the
    training images (Predictor.pixels). A file that cannot be used raises one CnnlabError line."""
    channels, size, _ = shape
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CnnlabError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if head[:3] == MAGIC_UBYTE or path.name.endswith(".gz"):
        if channels != 1:
            raise CnnlabError(f"{path}: IDX files hold grayscale images, and this model takes {channels}-channel "
                              f"(colour) images; give it PNG or JPEG files")
        images = read_idx(path)
        if images.ndim != 3:
            raise CnnlabError(f"{path}: an IDX file of shape {images.shape}, not images (a labels file?)")
        if images.shape[1:] != (size, size):
            raise CnnlabError(f"{path}: IDX images are {images.shape[1]}x{images.shape[2]}, the model takes "
                              f"{size}x{size}")
        values = images.astype(np.float32) / 255
        return [(f"{path}[{i}]", p[None]) for i, p in enumerate(values)]
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow warns about a large image before it refuses a larger one
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            image.load()
            if pixels == keys.PIXELS_AS_PREPARED:
                values = as_prepared(image, channels, size)
            else:
                values = to_training_look(image, size)[None].repeat(channels, 0)
    except Image.DecompressionBombError as exc:
        raise CnnlabError(f"{path}: {one_line(exc)[:150]} (Pillow's guard against decompression bombs); "
                          f"shrink the picture") from None
    except UnidentifiedImageError:
        raise CnnlabError(f"{path}: not an image Pillow can read (PNG, JPEG, ...) nor an IDX file") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
        raise CnnlabError(f"{path}: a broken image file ({one_line(exc)[:150]})") from None
    return [(str(path), values)]


def predict(predictor: Predictor, paths: list[str | Path], batch_size: int = 256) -> tuple[list[dict], list[str]]:
    """Classify every image in `paths`: rows of input, class, probability and every class's
    probability; and the one-line errors of the files that could not be read."""
    inputs, errors = [], []
    for path in map(Path, paths):
        try:
            inputs.extend(read_inputs(path, predictor.input_shape, predictor.pixels))
        except CnnlabError as exc:
            errors.append(str(exc))
    rows = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        probs = predictor(np.stack([pixels for _, pixels in chunk]))
        for (name, _), p in zip(chunk, probs):
            best = int(p.argmax())
            rows.append({"input": name, "class": predictor.class_names[best], "probability": round(float(p[best]), 6),
                         "probabilities": {c: round(float(v), 6) for c, v in zip(predictor.class_names, p)}})
    return rows, errors


def _as_text(rows: list[dict], kind: str, class_names: list[str]) -> str:
    if kind == "json":
        return json.dumps(rows, indent=2) + "\n"
    flat = [{**{k: v for k, v in r.items() if k != "probabilities"},
             **{f"p_{c}": v for c, v in r["probabilities"].items()}} for r in rows]
    return csv_text(["input", "class", "probability", *(f"p_{c}" for c in class_names)], flat)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnlab predict", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="PNG/JPEG image files or IDX image files (.gz or plain)")
    parser.add_argument("--model", default=keys.CHECKPOINT,
                        help="a checkpoint file or an MLflow model URI: runs:/<run id>/model, "
                             "models:/<name>@<alias> (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the predictions to this .csv or .json file instead of printing them")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store of runs:/ and models:/ URIs (default: $MLFLOW_TRACKING_URI, else the "
                             "project's sqlite:///mlflow.db)")
    args = parser.parse_args(argv)
    kind = args.output.suffix.lower().lstrip(".") if args.output else None
    if kind not in (None, "csv", "json"):
        raise CnnlabError(f"--output {args.output}: expected a .csv or .json file name")
    if args.model.startswith(("runs:/", "models:/")):
        import mlflow

        from cnnlab.tracking.store import existing_store

        # Runs and registered models from the same store; an absent one is an error, never a new file.
        store = existing_store(args.tracking_uri)
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
    if args.model.startswith(MLFLOW_SCHEMES):
        from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

        if not MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.defined:  # a user who set it keeps the bars
            MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)  # the answer, not the model's download
    predictor = load_predictor(args.model)
    rows, errors = predict(predictor, args.inputs)
    for error in errors:
        show(error)
    if args.output:
        write_atomic(args.output, _as_text(rows, kind, predictor.class_names))
        print(f"wrote {len(rows)} predictions to {args.output}")
    else:
        width = max((len(r["input"]) for r in rows), default=0)
        for r in rows:
            print(f"{r['input']:<{width}}  {r['class']}  {r['probability']:.4f}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
