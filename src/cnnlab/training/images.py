"""One picture to the pixels a network sees: its mode to 1 or 3 channels, padded to a square
(the aspect ratio kept) and resized. The image-folder preparation (cnnlab.training.folder) and
`cnnlab predict` use the same function, so a picture is classified as its training images looked.

Modes follow torchvision's ImageFolder and Keras' image_dataset_from_directory: Pillow's own
conversion to "L" or "RGB" (a palette is expanded, alpha is dropped), except 16- and 32-bit
grayscale, which Pillow would clip at 255 rather than scale: those are scaled to 8 bits here (a
32-bit float image whose values are all <= 1 is taken as intensities in [0, 1]).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cnnlab.core import keys

_WIDE_GRAY = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # more than 8 bits per pixel


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """The image as 8-bit grayscale (channels 1) or RGB (channels 3)."""
    if image.mode in _WIDE_GRAY:
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.max(initial=0) <= 1.0:
            top = 1.0  # floating-point intensities in [0, 1]
        else:
            top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when a palette with transparency goes straight to RGB
    return image.convert("L" if channels == 1 else "RGB")


def pad_to_square(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) pixels padded to a square, centred, with the median colour of the
    image's border (so the padding looks like the background it continues)."""
    h, w = pixels.shape[:2]
    if h == w:
        return pixels
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).reshape(-1, *pixels.shape[2:])
    background = np.median(border, axis=0).astype(pixels.dtype)
    side = max(h, w)
    square = np.empty((side, side, *pixels.shape[2:]), dtype=pixels.dtype)
    square[...] = background
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = pixels
    return square


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 pixels to `size` x `size` with Pillow's antialiasing filter; unchanged when they are that size."""
    if pixels.shape[0] == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS))


def to_network_pixels(image: Image.Image, channels: int, size: int) -> np.ndarray:
    """uint8 (channels, size, size): mode, then padding to a square, then resizing."""
    pixels = resize(pad_to_square(np.asarray(to_mode(image, channels))), size)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def pixels_of(data_format: str) -> str:
    """How a picture is made to look like the training images of data in `data_format` (a logged
    model's metadata keys.MODEL_PIXELS, what `cnnlab predict` follows): IDX data is grayscale and
    light on dark; image folders and CIFAR-10 were converted by to_network_pixels."""
    return keys.PIXELS_LIGHT_ON_DARK if data_format == "idx" else keys.PIXELS_AS_PREPARED
