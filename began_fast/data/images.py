"""Decoding, cropping and resizing one image file: shared by the folder sources and scripts/prepare_celeba.py.

Every image is turned upright by its EXIF orientation (as DALI's decoders and image viewers do), becomes RGB
(grayscale, palette, CMYK and RGBA are converted by PIL; alpha is dropped; 16-bit grayscale keeps its 8 high bits,
as 16-bit colour does in PIL and DALI), is cropped to a square box and resized with an antialiased Lanczos filter
to S x S.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
from PIL import Image, ImageOps

from began_fast.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of a 16-bit grayscale PNG

# The aligned CelebA faces are 178 x 218; carpedm20/BEGAN-tensorflow keeps the 128 x 128 box at top 50, left 25,
# which holds the face and little background. Its centre (89, 114) is kept when another crop_size is asked for.
CELEBA_BOX = (25, 50, 128)


def crop_box(width: int, height: int, crop: str | None, crop_size: int | None) -> tuple[int, int, int]:
    """The square box (left, top, size) cut out of a width x height image.

    crop None or "celeba": the CelebA box (left 25, top 50, size 128); with crop_size, a box of that size with the
    same centre. "center": the centred square of crop_size (the short side if None).
    Raises DataError when the box does not fit in the image.
    """
    if crop in (None, "celeba"):
        left, top, size = CELEBA_BOX
        if crop_size is not None:
            left, top, size = left + (size - crop_size) // 2, top + (size - crop_size) // 2, crop_size
    elif crop == "center":
        size = min(width, height) if crop_size is None else crop_size
        left, top = (width - size) // 2, (height - size) // 2
    else:
        raise DataError(f"crop must be 'celeba', 'center' or None, got {crop!r}")
    if left < 0 or top < 0 or left + size > width or top + size > height:
        advice = "--crop center or a smaller --crop-size"
        if crop == "center":
            advice = f"a --crop-size of at most {min(width, height)}"
        raise DataError(
            f"a {width}x{height} image is smaller than the {crop or 'celeba'} crop box of {size}x{size} at "
            f"left {left}, top {top}; use {advice}"
        )
    return left, top, size


def resize_square(image: Image.Image, image_size: int) -> np.ndarray:
    """Antialiased (Lanczos) resize of a square PIL image to an (S, S, 3) uint8 array."""
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.array(image, dtype=np.uint8)


def load_image(path: str, image_size: int, crop: str | None, crop_size: int | None, large: bool = False) -> np.ndarray:
    """Decode `path`, convert to RGB, crop (see crop_box) and resize: an (S, S, 3) uint8 array (HWC).

    large: the file has more pixels than PIL's Image.MAX_IMAGE_PIXELS, which a folder's scan warned about once,
    naming it: PIL's own warning, on each decode, is left out. Only then: changing the warning filters makes Python
    forget which warnings it has shown, so each would be shown again after every read.
    Raises OSError (or a PIL error) when the file cannot be decoded, DataError when it is smaller than the box.
    """
    with pil_size_warning_off() if large else contextlib.nullcontext():  # crop() warns too, in Pillow 10
        with Image.open(path) as image:
            image = upright_rgb(image)
        left, top, size = crop_box(image.width, image.height, crop, crop_size)
        return resize_square(image.crop((left, top, left + size, top + size)), image_size)


@contextlib.contextmanager
def pil_size_warning_off():
    """Inside, PIL's warning about an image above Image.MAX_IMAGE_PIXELS is left out (a folder's scan says it once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def upright_rgb(image: Image.Image) -> Image.Image:
    """`image` turned by its EXIF orientation and converted to 8-bit RGB (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_GREY:  # PIL's convert("RGB") would clip these at 255, not scale them
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    return image.convert("RGB")
