"""Image-folder sources: the aligned CelebA JPEGs, and any folder of images (searched recursively).

Corrupt files. When the source is opened every file gets a cheap check, run on a thread pool (I/O bound): PIL parses
its header (this rejects non-images with an image extension and gives the size, upright by the EXIF orientation,
which is checked against the crop box), and a JPEG must end with its end-of-image marker FFD9 and a PNG with its
IEND chunk (this rejects truncated downloads without decoding; a file whose last bytes are something else, such as a
JPEG with data appended after the marker, is decoded in full instead); a PNG's chunk checksums are verified too (a
damaged PNG would otherwise stop DALI's decoder). Files that fail are left out and ONE SkippedImagesWarning names
the count (another counts those PIL refuses to open, above twice its Image.MAX_IMAGE_PIXELS, and one warning names
those above it, slow to decode); if every file fails the source raises DataError. A file that passes but still fails
to decode later (say, it was deleted or damaged mid-run) is replaced by the next image of its range (the training
images, or the held-out ones), with one warning per such file, so a long run does not die on one bad JPEG. Which
files were warned about is kept in shared memory, so the DataLoader's worker processes warn once between them rather
than once each. A JPEG damaged inside but whole at its ends can decode without an error, to a partly grey image: the
check does not decode every file, and such an image is trained on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import ExifTags, Image

from began_fast.data.errors import DataError, SkippedImagesWarning, check_folder_there, warn_undecodable
from began_fast.data.images import IMAGE_EXTENSIONS, crop_box, largest_crop_size, load_image, pil_size_warning_off
from began_fast.wording import counted

TRAILERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}  # by the format PIL reads, not the file's extension
TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def find_images(root: str | Path) -> list[str]:
    """All files under `root` (recursively) with an image extension, sorted so the order is the same everywhere.

    A folder that cannot be listed (no permission to read it) is said: DataError when no image was found elsewhere
    (the folder is not empty, only unreadable), else one SkippedImagesWarning names how many folders were left out.
    """
    found, visited, unreadable = [], set(), []
    for directory, subdirectories, names in os.walk(root, followlinks=True, onerror=unreadable.append):
        real = os.path.realpath(directory)
        if real in visited:  # a link back up the tree, or a second link to a folder already listed
            subdirectories.clear()
            continue
        visited.add(real)
        found += [os.path.join(directory, name) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]
    if unreadable:
        folder, why = unreadable[0].filename, unreadable[0].strerror
        if folder == os.fspath(root):
            raise DataError(f"cannot read the image folder {folder} ({why})")
        if not found:
            raise DataError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}: {counted(len(unreadable), 'folder')} "
                f"under it cannot be read (first: {folder}, {why})"
            )
        warnings.warn(
            f"skipped {counted(len(unreadable), 'folder')} under {root} that cannot be read (first: {folder}, {why}): "
            "their images are left out",
            SkippedImagesWarning,
            stacklevel=3,
        )
    return sorted(found)


def _image_size(path: str) -> tuple[int, int] | Exception:
    """(width, height) from the header, or the error when the file is not a whole image (see the module docstring)
    or has more pixels than PIL opens (Image.DecompressionBombError)."""
    try:
        with Image.open(path) as image:
            size, trailer = image.size, TRAILERS.get(image.format)
            if image.format == "PNG":
                image.verify()  # every chunk's CRC, the compressed pixels' included
        with Image.open(path) as image:  # again: a verified image cannot be read further
            if image.getexif().get(ExifTags.Base.Orientation) in TURNED:
                size = size[::-1]
        if trailer is not None:
            with open(path, "rb") as f:
                f.seek(-len(trailer) - 2, os.SEEK_END)  # some encoders pad a byte or two after the marker
                if trailer not in f.read():
                    with Image.open(path) as image:
                        image.load()  # raises when the file is cut short
        return size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # verify raises SyntaxError
        return error


def _unreadable(error: Exception | tuple[int, int]) -> bool:
    """Whether _image_size's result is an error of the file system (no permission, gone), not of the image: PIL's
    errors for a file that is not a whole image are OSErrors too, without an errno."""
    return isinstance(error, OSError) and error.errno is not None and bool(error.strerror)


def scan_images(
    files: list[str], crop: str | None, crop_size: int | None, image_size: int
) -> tuple[list[str], frozenset[str]]:
    """(the files that pass the check, in order; those of them above PIL's Image.MAX_IMAGE_PIXELS). Warns once about
    the others, once about those above the limit, and once about those whose crop is smaller than image_size
    (upscaled, as an HDF5 file of smaller images is, with its warning).

    Raises DataError when none pass, or when an image is smaller than the crop box.
    """
    with pil_size_warning_off(), ThreadPoolExecutor(max_workers=16) as pool:  # said once below, with a file's name
        sizes = list(pool.map(_image_size, files, chunksize=64))
    good, too_large, undecodable = [], [], []
    for path, size in zip(files, sizes, strict=True):
        if isinstance(size, tuple):
            good.append((path, size))
        elif isinstance(size, Image.DecompressionBombError):
            too_large.append(path)
        else:
            undecodable.append((path, size))
    if not good:  # files that cannot be read (no permission) are not corrupt: the first file's error says which
        if _unreadable(sizes[0]):
            raise DataError(
                f"none of the {len(files)} image files could be read (first: {files[0]}, {sizes[0].strerror})"
            )
        raise DataError(f"none of the {len(files)} image files could be decoded (first: {files[0]})")
    limit = Image.MAX_IMAGE_PIXELS  # PIL warns above it and refuses above twice it; None (set by a user): no limit
    large = [(path, size) for path, size in good if limit and size[0] * size[1] > limit]
    if large:
        path, (width, height) = large[0]
        warnings.warn(
            f"{len(large)} of {len(good)} images have more than {limit:,} pixels (first: {path}, "
            f"{width}x{height}): each is decoded whole whenever it is read, which is slow; shrink them",
            stacklevel=3,
        )
    small, unfit = [], []
    for path, (width, height) in good:
        try:
            _, _, side = crop_box(width, height, crop, crop_size)
        except DataError as error:
            unfit.append((largest_crop_size(width, height, crop), path, error))
            continue
        if side < image_size:
            small.append(path)
    if unfit:  # the one fewest crop sizes fit (its advice fits them all), and how many: a stray one is better out
        _, path, error = min(unfit, key=lambda item: item[0])
        raise DataError(
            f"{path}: {error}, or take out of the folder the {len(unfit)} of {len(good)} images the box does not fit"
        )
    if small:
        warnings.warn(
            f"{len(small)} of {len(good)} images are smaller, once cropped, than the {image_size}x{image_size} they "
            f"are resized to (first: {small[0]}): each is upscaled, so a model trained on them learns blurred images",
            stacklevel=3,
        )
    if too_large:  # PIL refuses them, as it would a decompression bomb
        warnings.warn(
            f"skipped {len(too_large)} of {len(files)} image files that have more than {2 * limit:,} pixels, "
            f"PIL's limit (first: {too_large[0]}): shrink them to train on them",
            SkippedImagesWarning,
            stacklevel=3,
        )
    if undecodable:
        path, error = undecodable[0]
        read = "read or " if any(_unreadable(failure) for _, failure in undecodable) else ""
        why = f", {error.strerror}" if _unreadable(error) else ""
        warnings.warn(
            f"skipped {len(undecodable)} of {len(files)} image files that could not be {read}decoded "
            f"(first: {path}{why})",
            SkippedImagesWarning,
            stacklevel=3,
        )
    return [path for path, _ in good], frozenset(path for path, _ in large)


def default_crop(kind: str) -> str:
    """The crop an image folder of `kind` takes when none is given: the CelebA box for a CelebA folder, the centred
    square for another."""
    return "celeba" if kind == "celeba" else "center"


class ImageFolder(torch.utils.data.Dataset):
    """The images of a folder, decoded on demand: item i is a (3, S, S) uint8 tensor (CHW), cropped and resized.

    kind: "celeba" (default crop: the CelebA box) or "folder" (default crop: the centred square).
    files: the paths that passed the scan, in sorted order.
    """

    def __init__(self, root: str, image_size: int, crop: str | None, crop_size: int | None, kind: str):
        self.root, self.image_size, self.kind = root, image_size, kind
        self.crop = crop or default_crop(kind)
        self.crop_size = crop_size
        files = find_images(root)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self.files, self.large = scan_images(files, self.crop, crop_size, image_size)
        # Which files were warned about, seen by every worker (shared memory, under fork or spawn).
        self._warned = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()

    def _first_failure(self, index: int) -> int:
        """How many files have failed so far (in any worker), this one included, when file `index` fails here for
        the first time, marking it; 0 when it failed before. Tested, set and counted under a lock on the folder
        (flock, taken on a descriptor of this call's own, so it holds between processes), so that two workers that
        meet a broken file at once warn once between them, and each failure has a count of its own. Where the lock
        cannot be had (a file system without flock), it goes on without: at worst a second warning."""
        with contextlib.ExitStack() as held:
            with contextlib.suppress(OSError):
                folder = os.open(self.root, os.O_RDONLY)
                held.callback(os.close, folder)  # closing the descriptor releases the lock
                fcntl.flock(folder, fcntl.LOCK_EX)
            if self._warned[index]:
                return 0
            self._warned[index] = True
            return int(self._warned.sum())

    def failed(self, index: int, error: Exception) -> None:
        """File `index` failed to decode or to be read: one warning, the first time any reader of this folder (a
        DataLoader worker, DALI's reader, the pictures' reads) meets it."""
        failures = self._first_failure(index)
        if failures:
            warn_undecodable(self.files[index], error, failures)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.read(index, range(len(self.files)))

    def read(self, index: int, within: range) -> torch.Tensor:
        """Image `index` of `within` (a range of the files), or, when it cannot be decoded, the next one of
        `within` that can (so a broken training image is never replaced by a held-out one)."""
        index = within[index]  # IndexError past the end, as a sequence must
        for k in range(len(within)):
            i = within[(index - within.start + k) % len(within)]
            try:
                path = self.files[i]
                array = load_image(path, self.image_size, self.crop, self.crop_size, path in self.large)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                check_folder_there(self.root)
                self.failed(i, error)
                continue
            return torch.from_numpy(array).permute(2, 0, 1).contiguous()
        raise DataError(f"none of the {len(within)} images under {self.root} can be decoded any more")

    def describe(self) -> str:
        box = f"{self.crop} crop" + (f" {self.crop_size}px" if self.crop_size else "")
        kind = "CelebA folder" if self.kind == "celeba" else "image folder"
        return f"{kind} {self.root}: {counted(len(self.files), 'image')}, {box}, resized to {self.image_size}px"
