"""HDF5 source: a prepared data set of cropped, square uint8 images (scripts/prepare_celeba.py writes it).

Layouts read: dataset `images`, uint8, (N, S, S, 3) (ours, NHWC as image libraries write it), or the earlier
TensorFlow implementation's (N, 64*64*3), rows of flattened 64 x 64 x 3 images. The stored images are already
cropped, so the crop settings do not apply; a stored size other than the model's is resized (Lanczos) on read.

A row that cannot be read (a damaged chunk) stops the run with one DataError line naming the file and the row, in
every loader: unlike a folder's file, no image stands in for it, since the GPU-resident loader reads the whole file
at once, and the file is prepared data, made again from its folder by scripts/prepare_celeba.py.
"""

from __future__ import annotations

import os
import re
import warnings

import h5py
import numpy as np
import torch
from PIL import Image

from began_fast.data.errors import DataError
from began_fast.data.images import resize_square
from began_fast.wording import counted

DATASET = "images"
FLAT_SIZE = 64  # the flattened layout's image size
# Images read and resized at a time by as_uint8 from a file stored at another size: the host holds one chunk of
# stored images, not the whole file's (CelebA's 202,599 at 256 px are 40 GB; resized to 64 px, 2.5 GB).
RESIZE_CHUNK = 1024
# HDF5's reason in h5py's message for a failed read: "Can't synchronously read data (filter returned failure during
# read)" (HDF5 2.0), "... (inflate() failed)" (1.14): from the first parenthesis to the last.
HDF5_REASON = re.compile(r"\((.+)\)\s*$")


def _first_unreadable(stored: h5py.Dataset, start: int, stop: int) -> tuple[int, int]:
    """(first, last) row of the first stored chunk in rows start to stop - 1 that cannot be read, read a chunk at a
    time (every row of a damaged chunk fails); (start, stop - 1) when each can (the failure was not the data's)."""
    step = stored.chunks[0] if stored.chunks else RESIZE_CHUNK
    for first in range(start - start % step, stop, step):
        rows = max(first, start), min(first + step, stop)
        try:
            stored[rows[0] : rows[1]]
        except OSError:
            return rows[0], rows[1] - 1
    return start, stop - 1


def _check_layout(path: str) -> tuple[int, int, bool]:
    """(count, stored size, flat?) of the file's `images` dataset; DataError when it is not a layout we read."""
    try:
        with h5py.File(path, "r") as f:
            if DATASET not in f or not isinstance(f[DATASET], h5py.Dataset):
                raise DataError(f"{path} has no dataset {DATASET!r}; expected uint8 images of shape (N, S, S, 3)")
            shape, dtype = f[DATASET].shape, f[DATASET].dtype
    except OSError as error:
        raise DataError(f"cannot read {path} as HDF5: {error}") from None
    if dtype != np.uint8:
        raise DataError(f"{path}:{DATASET} has dtype {dtype}; expected uint8")
    if len(shape) == 4 and shape[1] == shape[2] > 0 and shape[3] == 3:
        return shape[0], shape[1], False
    if len(shape) == 2 and shape[1] == FLAT_SIZE * FLAT_SIZE * 3:
        return shape[0], FLAT_SIZE, True
    raise DataError(f"{path}:{DATASET} has shape {shape}; expected (N, S, S, 3) or (N, {FLAT_SIZE * FLAT_SIZE * 3})")


class Hdf5Images(torch.utils.data.Dataset):
    """Item i is a (3, S, S) uint8 tensor (CHW) read from the file's `images` dataset.

    The h5py file is opened lazily in each process that reads (h5py handles do not survive a fork), so the
    object can be handed to DataLoader workers.
    """

    kind = "hdf5"
    files: list[str] = []

    def __init__(self, path: str, image_size: int):
        self.path, self.image_size = path, image_size
        self.count, self.stored_size, self.flat = _check_layout(path)
        if self.count == 0:
            raise DataError(f"{path}:{DATASET} holds no images")
        if self.stored_size < image_size:
            warnings.warn(
                f"{path} stores {self.stored_size}x{self.stored_size} images, smaller than the {image_size}x"
                f"{image_size} they are resized to: each is upscaled, so a model trained on them learns blurred "
                f"images; prepare the data set at {image_size}px or more",
                stacklevel=2,
            )
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return self.count

    def _images(self) -> h5py.Dataset:
        if self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file[DATASET]

    def _to_chw(self, rows: np.ndarray) -> torch.Tensor:
        """(n, ...) stored rows -> (n, 3, S, S) uint8, resized when the stored size differs."""
        rows = rows.reshape(-1, self.stored_size, self.stored_size, 3)
        if self.stored_size != self.image_size:
            rows = np.stack([resize_square(Image.fromarray(row), self.image_size) for row in rows])
        return torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2).contiguous()

    def __getitem__(self, index: int) -> torch.Tensor:
        index = range(self.count)[index]  # IndexError past the end, as a sequence must; a row's number to name
        return self._to_chw(self._rows(self._images(), index, index + 1))[0]

    def as_uint8(self) -> torch.Tensor:
        """All images, (N, 3, S, S) uint8, read in one pass (RESIZE_CHUNK at a time where they are resized)."""
        with h5py.File(self.path, "r") as f:
            stored = f[DATASET]
            if self.stored_size == self.image_size:
                return self._to_chw(self._rows(stored, 0, self.count))
            images = torch.empty((self.count, 3, self.image_size, self.image_size), dtype=torch.uint8)
            for start in range(0, self.count, RESIZE_CHUNK):
                stop = min(start + RESIZE_CHUNK, self.count)
                images[start:stop] = self._to_chw(self._rows(stored, start, stop))
            return images

    def _rows(self, stored: h5py.Dataset, start: int, stop: int) -> np.ndarray:
        """Stored rows start to stop - 1. DataError naming the first that cannot be read: a damaged chunk (bytes
        overwritten in a compressed file) fails HDF5's decompression in a message that names neither the file nor
        the row, and would fail every read of it again, in whichever loader: the run stops at it."""
        try:
            return stored[start:stop]
        except OSError as error:
            first, last = _first_unreadable(stored, start, stop)
            rows = f"row {first}" if first == last else f"rows {first} to {last}"
            reason = HDF5_REASON.search(str(error))
            raise DataError(
                f"{self.path}:{DATASET} {rows} cannot be read ({reason[1] if reason else error}): the file is "
                "damaged; re-create it with scripts/prepare_celeba.py"
            ) from None

    def describe(self) -> str:
        resize = "" if self.stored_size == self.image_size else f", resized from {self.stored_size}px"
        layout = "flat 64x64x3 rows" if self.flat else "NHWC"
        return f"hdf5 {self.path}: {counted(self.count, 'image')} at {self.image_size}px ({layout}{resize})"

    def __getstate__(self):
        # Pickled into spawned workers without the open handle; each reopens the file itself.
        return {**self.__dict__, "_file": None, "_pid": None}
