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
CELEBA_SIZE = (178, 218)


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
        raise DataError(_unfit(width, height, crop or "celeba", crop_size, (left, top, size)))
    return left, top, size


def largest_crop_size(width: int, height: int, crop: str | None) -> int:
    """The largest crop_size whose box (crop_box) fits in a width x height image; < 1 when none does (the celeba box
    of an image that does not hold the CelebA box's centre)."""
    if crop == "center":
        return min(width, height)
    left, top, size = CELEBA_BOX
    # Kept on the box's centre, a box of side s starts at left + (size - s) // 2 and ends at left + (size + s) // 2.
    return min(size + 2 * min(left, top), 2 * (width - left) - size + 1, 2 * (height - top) - size + 1)


def _unfit(width: int, height: int, crop: str, crop_size: int | None, box: tuple[int, int, int]) -> str:
    """crop_box's message for a box that does not fit: what is wrong, then what fits. The flags are named as two
    scripts' own: evaluate.py, which reaches this through a run's crop, has none to give."""
    left, top, size = box
    if size > width or size > height:
        said = (
            f"a {width}x{height} image is smaller than the {crop} crop box of {size}x{size} at left {left}, top {top}"
        )
    else:  # no larger than the image, yet not inside it: the celeba box, placed where CelebA's faces are
        said = f"the {crop} crop box of {size}x{size} at left {left}, top {top} falls outside a {width}x{height} image"
    largest = largest_crop_size(width, height, crop)
    flags = "(train.py and prepare_celeba.py: "
    if crop == "center":
        return f"{said}; a centred box of at most {largest}x{largest} fits it {flags}--crop-size {largest} or less)"
    placed = f"{said}: the celeba box is placed for the {CELEBA_SIZE[0]}x{CELEBA_SIZE[1]} aligned CelebA images"
    center = "--crop center" if crop_size is None else "--crop center without --crop-size"
    if largest < 1:
        return f"{placed}, and no celeba box of any size fits this one; the centred square does {flags}{center})"
    return (
        f"{placed}; one of at most {largest}x{largest} fits this one, as does the centred square "
        f"{flags}--crop-size {largest} or less, or {center})"
    )


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
