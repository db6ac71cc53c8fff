"""The GPU-resident data set: every image in device memory as uint8, batches gathered on the device.

Layout: one (N, 3, S, S) uint8 tensor (NCHW). A batch is a gather along dim 0, which is then already the
(B, 3, S, S) layout the model reads: no transpose per step. uint8 keeps CelebA at 64 px in 2.5 GB (202,599 x
12,288 bytes); the conversion to float happens on the B gathered images only.

Order: BatchOrder's, as the torch and DALI loaders read (epochs of a permutation, this rank's slice of each
global batch, flips keyed by the step; data/sampler.py), so every image comes once per epoch, the loaders give the
same batches for one seed, and a resumed run, on any number of ranks, goes on as the others do. Per step the host
stages this rank's B indices and flips (2 x B int64, from pinned memory, non-blocking) into a device buffer; the
gather, the flip and the conversion read that buffer and can be captured in a CUDA graph, so a step is one small
copy and one graph replay.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from began_fast.data.errors import DataError
from began_fast.data.sampler import BatchOrder

# The share of free memory the images may take: the rest is for the model, its activations and the optimizer.
MEMORY_SHARE = 0.5


def fits(num_images: int, image_size: int, device: torch.device | str) -> bool:
    """Whether num_images uint8 images of 3 x S x S fit in MEMORY_SHARE of the device's free memory."""
    device = torch.device(device)
    needed = num_images * 3 * image_size * image_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return needed <= MEMORY_SHARE * free


class GpuResidentSet:
    """All images of a source (or an array) as one (N, 3, S, S) uint8 tensor on `device`.

    source_or_uint8_array: a data source (data/__init__.py; its `as_uint8()` when it has one, else its items
    stacked), a uint8 tensor or numpy array of shape (N, 3, S, S), or of shape (N, S, S, 3) (NHWC, as HDF5 files store
    it).
    """

    def __init__(self, source_or_uint8_array, device: torch.device | str):
        self.device = torch.device(device)
        images = source_or_uint8_array
        self.description = images.describe() if hasattr(images, "describe") else "array"
        if hasattr(images, "as_uint8"):
            images = images.as_uint8()
        elif hasattr(images, "__getitem__") and not isinstance(images, (torch.Tensor, np.ndarray)):
            images = torch.stack([images[i] for i in range(len(images))])
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or 3 not in (images.shape[1], images.shape[3]):
            raise DataError(
                f"GpuResidentSet needs uint8 images (N, 3, S, S) or (N, S, S, 3), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        if images.shape[2] != images.shape[3] or len(images) == 0:
            raise DataError(f"GpuResidentSet needs a non-empty set of square images, got {tuple(images.shape)}")
        self.images = images.contiguous().to(self.device)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def gather_into(self, out: torch.Tensor, indices: torch.Tensor, flips: torch.Tensor) -> None:
        """Fill `out`, a float (B, 3, S, S) tensor on the device, with images `indices` (B,) in [-1, 1], mirrored
        left-right where `flips` (B,) is true. Both on the device; reads no value back (capturable)."""
        images = self.images.index_select(0, indices)
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        out.copy_(images).div_(127.5).sub_(1.0)  # x = u8 / 127.5 - 1

    def describe(self) -> str:
        megabytes = self.images.numel() / 2**20
        return f"{self.device.type}-resident uint8 NCHW ({megabytes:.0f} MiB) of {self.description}"


class GpuResidentStream:
    """Iterator of this rank's (B, 3, S, S) float32 batches from a GpuResidentSet, in the order of `order`, a
    BatchOrder over its images (see the module docstring).

    Eagerly, `next()` gives the next batch. In a CUDA graph (CudaGraphStep's `stream`), `sample_into(buffer)` is
    captured and each step calls `stage()` before the replay: the graph then gathers the batch staged for it.
    """

    def __init__(self, images: GpuResidentSet, order: BatchOrder, *, flip: bool = True):
        order.check_covers(len(images))
        self.images, self.order, self.batch_size, self.flip = images, order, order.batch_size, flip
        self.step = order.start_step  # the step whose batch stage() stages next
        self._staged = torch.zeros(2, self.batch_size, dtype=torch.int64, device=images.device)  # indices; flips (0/1)

    def stage(self) -> None:
        """Stage the next step's indices and flips in the device buffer sample_into reads, behind the work already
        queued (a graph replay still reading the last step's)."""
        indices, flips = self.order.batch(self.step)
        rows = torch.stack([indices, (flips & self.flip).long()])
        if self._staged.is_cuda:
            rows = rows.pin_memory()  # the caching host allocator keeps it until the copy has run
        self._staged.copy_(rows, non_blocking=True)
        self.step += 1

    def sample_into(self, out: torch.Tensor) -> None:
        """The staged batch into `out`, a float (B, 3, S, S) tensor on the device (capturable)."""
        self.images.gather_into(out, self._staged[0], self._staged[1].bool())

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        self.stage()
        out = torch.empty(self.batch_size, 3, self.images.image_size, self.images.image_size, device=self.images.device)
        self.sample_into(out)
        return out

    def describe(self) -> str:
        rank, world_size = self.order.rank, self.order.world_size
        shard = f", rank {rank}'s share of a {world_size}-rank global batch" if world_size > 1 else ""
        order = f"batch {self.batch_size}, in the torch loader's order{shard}"
        return f"{self.images.device.type}-side gather ({order}) over {self.images.describe()}"
