"""Held-out images: real images the run never trains on, for D's reconstruction error (an autoencoder's error on
its own training images says how well it memorised them, not how well it reconstructs faces).

A file source (image folder, CelebA folder, HDF5) holds them out with `DataConfig.holdout = N`: the run trains
on its first len - N images, in the source's order (sorted file names; HDF5 rows), and the last N are held out.
For the aligned CelebA folder, N = 19962 holds out exactly the official test partition (182638.jpg to 202599.jpg),
when the scan skipped no file. The built-in faces are drawn per (seed, index), so the faces after the training
set's are never trained on: they are held out without taking any image from training.
"""

from __future__ import annotations

import torch

from began_fast.data.builtin import BuiltinFaces
from began_fast.data.errors import DataError


class TrainingImages(torch.utils.data.Dataset):
    """The first len(source) - holdout images of a file source: what the run trains on.

    Reads as the source does (its kind, path, crop, stored size: what the loaders use), with the shorter length and
    `files`; `source` is the whole set, whose last `holdout` images are held out.
    """

    def __init__(self, source, holdout: int):
        if not 0 < holdout < len(source):
            raise DataError(
                f"--holdout {holdout} must leave training images: the data set holds {len(source)} "
                f"({source.describe()})"
            )
        self.source, self.holdout, self.count = source, holdout, len(source) - holdout
        self.files = source.files[: self.count]

    def __getattr__(self, name: str):
        # "source": not set yet while unpickling (no recursion). Special names are this object's own: Python 3.10's
        # pickle looks __getstate__ up through here, and the source's (Hdf5Images') would pickle the source's state.
        if name == "source" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return _read(self.source, index, range(self.count))

    def as_uint8(self) -> torch.Tensor:
        """The training images, (N, 3, S, S) uint8."""
        if hasattr(self.source, "as_uint8"):
            return self.source.as_uint8()[: self.count]
        return torch.stack([self[i] for i in range(self.count)])

    def describe(self) -> str:
        return f"{self.source.describe()}; training on the first {self.count}, the last {self.holdout} held out"


def held_out_images(training, num: int) -> torch.Tensor | None:
    """Up to `num` held-out images, (n, 3, S, S) uint8, for a run that trains on `training` (the source that
    open_source gives); None when the run trains on every image of its data set (no --holdout)."""
    if isinstance(training, BuiltinFaces):
        return BuiltinFaces(num, training.image_size, training.seed, first=training.first + training.count).images
    if isinstance(training, TrainingImages):
        held_out = range(training.count, len(training.source))
        return torch.stack([_read(training.source, i, held_out) for i in range(min(num, training.holdout))])
    return None


def _read(source, index: int, within: range) -> torch.Tensor:
    """Image `index` of the images `within` of `source`; an image folder replaces one it cannot decode by the next
    of the same range (ImageFolder.read), so training and held-out images never stand in for each other."""
    if hasattr(source, "read"):
        return source.read(index, within)
    return source[within[index]]
